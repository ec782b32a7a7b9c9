#!/usr/bin/env python
"""One command on one CUDA GPU: QLoRA 4-bit scoring, exact gradients, the speed-up, peak memory.

    python benchmarks/gpu_check.py --out DIR           # CUDA: a ~1.2B Llama, vocab 49,152, NF4 + LoRA r=8
    python benchmarks/gpu_check.py --smoke --out DIR   # the same pipeline on CPU with a tiny model (tests)

What it does, in order (all with a plain ``transformers.Trainer``, so TRL is not needed):

1. Builds a Llama-architecture model from a config in memory (random weights, no download), saves
   it, loads it 4-bit NF4 through bitsandbytes (bf16 compute) and adds LoRA r=8 on all linear
   layers. Without bitsandbytes it says so and trains the unquantised model.
2. Exactness: (a) a scoring pass leaves the next training step's LoRA gradients unchanged;
   (b) one pruned optimizer step's gradient (25 % x 50 %, batch 4 x GA 2) equals the mean
   cross-entropy over the kept tokens of the kept samples, each recomputed alone, unpadded,
   from the decision the callback took (relative error, within bf16 tolerance on CUDA).
3. Speed: full SFT, Q-Tuning 25 % x 50 % and 12.5 % x 50 %, at the paper's batch (8 x GA 4),
   at each sequence length; arms interleaved over rounds (the order rotates); the epoch ratio to
   full SFT per round, the floor (scoring seconds + r_s x full step) / full step, the scoring
   share of a step.
4. Memory: ``torch.cuda.max_memory_allocated`` of each training arm, and of one scoring pass
   above what was allocated before it.
5. Writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out``.

A packed (padding-free) arm waits for scoring packed rows as they come (issue "Scoring inside
the model's own forward"); until then the script has none.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

ARMS = {"full": None, "qt-25x50": (0.25, 0.5), "qt-12.5x50": (0.125, 0.5)}
FULL_SIZE = dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096)
SMOKE_SIZE = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, one short round: checks the pipeline")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="measured optimizer steps per arm and round (after 1 warm-up)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=4)
    args = p.parse_args(argv)
    if args.smoke:
        args.seq_lens, args.rounds, args.steps, args.batch, args.grad_accum = [64], 1, 1, 4, 2
    return args


# ---------------------------------------------------------------------- model and data

def build_model(args, device: str):
    import transformers

    size = SMOKE_SIZE if args.smoke else FULL_SIZE
    config = transformers.LlamaConfig(**size, tie_word_embeddings=False)
    torch.manual_seed(0)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    path = tempfile.mkdtemp()
    model.save_pretrained(path)
    del model
    try:
        import bitsandbytes  # noqa: F401

        quantization = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32 if args.smoke else torch.bfloat16)
        how = "4-bit NF4 (bitsandbytes)"
    except ImportError:
        quantization, how = None, "none (bitsandbytes is not installed)"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, quantization_config=quantization, device_map={"": device})
    import peft

    if quantization is not None:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return peft.get_peft_model(model, lora), n_params, how, size["vocab_size"]


def make_rows(n: int, seq_len: int, vocab: int, seed: int) -> list[dict]:
    """Random token rows of 3/4 to all of ``seq_len`` tokens, the first quarter a prompt (-100)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(3 * seq_len // 4, seq_len + 1, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        prompt = length // 4
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def make_trainer(model, rows, args, callbacks, steps: int, device: str, bf16: bool):
    import transformers

    targs = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.grad_accum, max_steps=steps, learning_rate=1e-4, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
        report_to=[], seed=0, bf16=bf16, use_cpu=device == "cpu", dataloader_drop_last=True, max_grad_norm=0.0,
        remove_unused_columns=False)
    return transformers.Trainer(model=model, args=targs, train_dataset=rows,
                                data_collator=lambda features: _pad(features, "cpu"), callbacks=callbacks)


# ---------------------------------------------------------------------- exactness

def lora_grads(model, batch):
    model.train()
    model.zero_grad()
    model(**batch).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


def rel_error(got: dict, want: dict) -> float:
    num = sum(float((got[n].float() - want[n].float()).norm() ** 2) for n in want)
    den = sum(float(want[n].float().norm() ** 2) for n in want)
    return (num / max(den, 1e-30)) ** 0.5


def check_exactness(model, args, device: str, vocab: int, bf16: bool) -> dict:
    from transformers import TrainerCallback

    from qtuning_plugin import QTuning
    from qtuning_plugin.core import score_batch, scoring_mode

    seq_len = min(args.seq_lens)
    rows = make_rows(8, seq_len, vocab, seed=1)
    batch = _pad(rows[:2], device)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16)
    with autocast:
        before = lora_grads(model, batch)
        with scoring_mode(model):
            score_batch(model, batch)
        after = lora_grads(model, batch)
    scoring_untouched = rel_error(after, before)

    class Capture(TrainerCallback):
        grads = None

        def on_pre_optimizer_step(self, args_, state, control, model=None, **kw):
            if self.grads is None:
                self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    class Recording(QTuning):
        step = None

        def on_step_end(self, args_, state, control, **kw):
            super().on_step_end(args_, state, control, **kw)
            result = self.last_step
            if self.step is None and result is not None:
                self.step = ([{k: v.detach().clone() for k, v in b.items()} for b in result.scored],
                             [k.clone() for k in result.decision.keep],
                             [t.clone() for t in result.decision.token_keep])

    small = argparse.Namespace(**{**vars(args), "batch": 4, "grad_accum": 2})
    capture, qt = Capture(), Recording(sample_ratio=0.25, token_ratio=0.5)
    trainer = make_trainer(model, rows, small, [capture, qt], steps=1, device=device, bf16=bf16)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    with torch.no_grad():  # back to the weights the captured gradient was taken at
        for n, p in model.named_parameters():
            if n in start:
                p.copy_(start[n])
    batches, keep, token_keep = qt.step
    model.train()
    model.zero_grad()
    count = sum(int(t[:, 1:].sum()) for t in token_keep)
    for b, k, t in zip(batches, keep, token_keep):
        for row in k.nonzero().squeeze(1).tolist():
            cols = b["attention_mask"][row].nonzero().squeeze(1)
            ids = b["input_ids"][row, cols][None]
            labels = torch.where(t[row, cols], b["labels"][row, cols], -100)
            with autocast:
                logits = model(input_ids=ids).logits[0, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits, labels[1:], reduction="sum", ignore_index=-100) / count
            loss.backward()
    want = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    pruned_step = rel_error(capture.grads, want)
    tolerance = 2e-2 if bf16 else 1e-5
    return {"scoring_leaves_gradients_rel_error": scoring_untouched,
            "scoring_leaves_gradients_ok": scoring_untouched < 1e-6,
            "pruned_step_rel_error": pruned_step, "pruned_step_tolerance": tolerance,
            "pruned_step_ok": pruned_step < tolerance, "pruned_step_kept_rows": int(sum(int(k.sum()) for k in keep)),
            "pruned_step_kept_tokens": count}


def _pad(rows, device):
    """input_ids / attention_mask / labels of pre-tokenised rows, right-padded (pad id 0, label -100)."""
    width = max(len(r["input_ids"]) for r in rows)
    return {k: torch.tensor([r[k] + [fill] * (width - len(r[k])) for r in rows], device=device)
            for k, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", -100))}


# ---------------------------------------------------------------------- speed and memory

def time_arm(model, arm: str, rows, args, device: str, bf16: bool) -> dict:
    from transformers import TrainerCallback

    from qtuning_plugin import QTuning

    cuda = device == "cuda"
    steps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **kw):
            if cuda:
                torch.cuda.synchronize()
            steps.append(time.perf_counter() - self.start)

    spec = ARMS[arm]
    qt = QTuning(sample_ratio=spec[0], token_ratio=spec[1]) if spec else None
    trainer = make_trainer(model, rows, args, [Clock()] + ([qt] if qt else []), steps=args.steps + 1, device=device,
                           bf16=bf16)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"arm": arm, "step_seconds": steps[1:],  # the first step warms up
            "score_seconds": [h.get("qtuning/score_seconds", 0.0) for h in logs][1:],
            "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def scoring_memory(model, rows, args, device: str, bf16: bool) -> float | None:
    """MB allocated by one scoring pass over one micro-batch, above what was allocated before it."""
    if device != "cuda":
        return None
    from qtuning_plugin.core import score_batch, scoring_mode

    batch = _pad(rows[: args.batch], device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=bf16), scoring_mode(model):
        score_batch(model, batch)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def summarise(runs: list[dict]) -> dict:
    full = [r for r in runs if r["arm"] == "full"]
    table = {}
    for arm in ARMS:
        rs = [r for r in runs if r["arm"] == arm]
        step = statistics.median(s for r in rs for s in r["step_seconds"])
        score = [s for r in rs for s in r["score_seconds"]]
        row = {"step_median_s": step, "score_median_s": statistics.median(score) if score else 0.0,
               "peak_mb": max((r["peak_mb"] or 0) for r in rs) or None}
        row["score_share"] = row["score_median_s"] / step
        ratios = [sum(r["step_seconds"]) / sum(f["step_seconds"]) for r, f in zip(rs, full)]
        row["epoch_ratio"] = statistics.median(ratios)
        row["epoch_ratio_min"], row["epoch_ratio_max"] = min(ratios), max(ratios)
        if ARMS[arm]:
            full_step = statistics.median(s for r in full for s in r["step_seconds"])
            row["floor"] = (row["score_median_s"] + ARMS[arm][0] * full_step) / full_step
        table[arm] = row
    return table


# ---------------------------------------------------------------------- report

def markdown(result: dict) -> str:
    m, e = result["meta"], result["exactness"]
    lines = [f"`{m['command']}` ({m['date']}; {m['device_name']}; torch {m['torch']}, transformers "
             f"{m['transformers']}, peft {m['peft']}, bitsandbytes {m['bitsandbytes']})", "",
             f"Model: Llama architecture, {m['params'] / 1e9:.2f} B parameters, vocab {m['vocab']}, random weights; "
             f"quantisation {m['quantization']}; LoRA r=8 on all linear layers; {m['precision']}; batch "
             f"{m['batch']} x GA {m['grad_accum']}; {m['rounds']} rounds x {m['steps']} measured steps per arm, "
             f"arms interleaved.", "",
             "Exactness:", "",
             f"- a scoring pass leaves the next step's LoRA gradients unchanged: relative difference "
             f"{e['scoring_leaves_gradients_rel_error']:.2e} "
             f"({'ok' if e['scoring_leaves_gradients_ok'] else 'FAILED'})",
             f"- one pruned step (25 % x 50 %, batch 4 x GA 2, {e['pruned_step_kept_rows']} rows and "
             f"{e['pruned_step_kept_tokens']} label tokens kept): gradient vs the mean CE over the kept tokens, "
             f"relative error {e['pruned_step_rel_error']:.2e} (tolerance {e['pruned_step_tolerance']:.0e}: "
             f"{'ok' if e['pruned_step_ok'] else 'FAILED'})", ""]
    for seq_len, block in result["speed"].items():
        lines += [f"Sequence length {seq_len} (rows of 3/4 to all of it); one scoring pass over a micro-batch "
                  f"allocates {_mb(block['scoring_mb'])} above the model:", "",
                  "| arm | step median (s) | epoch / full (min-max) | floor | scoring (s/step) | scoring share | "
                  "peak memory (MB) |", "|---|---|---|---|---|---|---|"]
        for arm, r in block["table"].items():
            floor = f"{r['floor']:.3f}" if "floor" in r else "-"
            lines.append(f"| {arm} | {r['step_median_s']:.3f} | {r['epoch_ratio']:.3f} ({r['epoch_ratio_min']:.3f}-"
                         f"{r['epoch_ratio_max']:.3f}) | {floor} | {r['score_median_s']:.3f} | "
                         f"{100 * r['score_share']:.0f} % | {_mb(r['peak_mb'])} |")
        lines.append("")
    return "\n".join(lines)


def _mb(x):
    return "-" if x is None else f"{x:.0f} MB"


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --smoke for the CPU pipeline check)")
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    t0 = time.perf_counter()
    model, n_params, quantization, vocab = build_model(args, device)
    print(f"model: {n_params / 1e9:.3f} B parameters, quantisation {quantization} ({time.perf_counter() - t0:.0f} s)",
          flush=True)
    exactness = check_exactness(model, args, device, vocab, bf16)
    print(f"exactness: {exactness}", flush=True)
    speed = {}
    for seq_len in args.seq_lens:
        rows = make_rows((args.steps + 1) * args.batch * args.grad_accum, seq_len, vocab, seed=seq_len)
        runs = []
        arms = list(ARMS)
        for rnd in range(args.rounds):
            for arm in arms[rnd % len(arms):] + arms[:rnd % len(arms)]:
                runs.append(time_arm(model, arm, rows, args, device, bf16))
                print(f"L={seq_len} round {rnd} {arm}: steps {['%.3f' % s for s in runs[-1]['step_seconds']]}",
                      flush=True)
        speed[str(seq_len)] = {"runs": runs, "table": summarise(runs),
                               "scoring_mb": scoring_memory(model, rows, args, device, bf16)}
    import peft
    import transformers

    try:
        import bitsandbytes
        bnb_version = bitsandbytes.__version__
    except ImportError:
        bnb_version = "-"
    meta = {"command": " ".join(["python", "benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
            "date": time.strftime("%Y-%m-%d"), "device_name": torch.cuda.get_device_name() if device == "cuda"
            else f"CPU ({platform.processor() or platform.machine()})", "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "bitsandbytes": bnb_version,
            "params": n_params, "vocab": vocab, "quantization": quantization,
            "precision": "bf16 autocast" if bf16 else "fp32", "batch": args.batch, "grad_accum": args.grad_accum,
            "rounds": args.rounds, "steps": args.steps, "seconds": time.perf_counter() - t0}
    result = {"meta": meta, "exactness": exactness, "speed": speed}
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (out / "gpu_check.md").write_text(text + "\n")
    print(text)
    if not (exactness["scoring_leaves_gradients_ok"] and exactness["pruned_step_ok"]):
        raise SystemExit("gpu_check: an exactness check failed (see above)")


if __name__ == "__main__":
    main()
