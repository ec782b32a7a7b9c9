"""``qtuning demo``: LoRA fine-tuning with Q-Tuning through TRL's SFTTrainer, the way users run it,
on a small dataset, printing what was kept at every step.

Writes to ``--out``: ``decisions.jsonl`` (the decision log), ``decisions.png`` (EU plane over
training and what was kept per step), ``eu-plane-last-step.png`` (the last pool, kept vs
dropped), ``summary.json``, the LoRA adapter (``adapter/``) and, where tensorboard is installed,
``tensorboard/``: the run's metrics and the live EU-plane picture every ``--plot-every`` steps
(``tensorboard --logdir OUT/tensorboard``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

from .callback import QTuning
from .cli_options import given_options
from .core import QTuningConfig, score_batch, scoring_mode
from .core.step import decide_step
from .data import DataError, check_token_ids, detect_format, encode, load_records, to_batch
from .decision_log import read_log, sample_id
from .models import load
from .decision_plots import plot_decisions
from .plots import plot_scores, pool_ratio, reproduces_kept
from .precision import describe_precision, native_bf16

N_HELD_OUT = 32


def _to_trl(record: dict, fmt: str, has_template: bool) -> dict:
    """A record in one of TRL's prompt / completion formats (the completion is what is trained)."""
    if fmt == "messages":
        msgs = record.get("messages", record.get("conversations"))
        last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=None)
        if last is None:
            raise DataError("a chat record has no assistant message to train on")
        return {"prompt": msgs[:last], "completion": [msgs[last]]}
    if fmt == "alpaca":
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        if has_template:
            return {"prompt": [{"role": "user", "content": user}],
                    "completion": [{"role": "assistant", "content": record["output"]}]}
        return {"prompt": f"### Instruction:\n{user}\n\n### Response:\n", "completion": record["output"]}
    return {"prompt": record["prompt"], "completion": record["completion"]}


@torch.no_grad()
def held_out_loss(model, encoded, pad_id: int, batch_size: int = 8) -> float:
    """Mean NLL per response token (nats) over ``encoded`` [(input_ids, labels)]."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with scoring_mode(model):
        for i in range(0, len(encoded), batch_size):
            batch = to_batch(encoded[i:i + batch_size], pad_id)
            s = score_batch(model, {k: v.to(device) for k, v in batch.items()})
            total += float(s.nll[s.trainable].sum())
            count += int(s.trainable.sum())
    return total / max(1, count)


def _line(step: int, total: int, logs: dict) -> str:
    q = [logs.get(f"qtuning/share_{k}") for k in ("q1_noise", "q2_misconception", "q3_redundant", "q4_calibration")]
    parts = [f"step {step:>3}/{total}", f"loss {logs['loss']:.4f}" if isinstance(logs.get("loss"), float) else ""]
    if "qtuning/kept_samples" in logs:
        parts.append(f"kept {logs['qtuning/kept_samples']:.0f}/{logs['qtuning/pool_samples']:.0f} samples")
        parts.append("pool " + " ".join(f"Q{i + 1} {100 * v:3.0f}%" for i, v in enumerate(q) if v is not None))
        parts.append(f"label tokens kept {100 * logs['qtuning/kept_tokens_ratio']:.0f}%")
        parts.append(f"scoring {logs['qtuning/score_seconds']:.1f} s")
    return " | ".join(p for p in parts if p)


def run_demo(args) -> int:
    import datasets
    from peft import LoraConfig
    from transformers import ProgressCallback, TrainingArguments
    from trl import SFTConfig, SFTTrainer

    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = load_records(args.data)
    fmt = detect_format(records, args.data)
    if len(records) < 2:
        raise DataError(f"{args.data}: the demo needs at least 2 samples (one held out)")
    model, tok, description = load(args.model)
    has_template = bool(getattr(tok, "chat_template", None))
    n_eval = min(N_HELD_OUT, max(1, len(records) // 10))
    train_records, eval_records = records[:-n_eval], records[-n_eval:]
    eval_encoded = [encode(r, tok, fmt, args.max_length) for r in eval_records]
    check_token_ids(eval_encoded, model.get_input_embeddings().num_embeddings, args.data)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    preset = getattr(args, "preset", "paper")
    settings = QTuningConfig.from_dict({"preset": preset, **given_options(args),
                                        "log_decisions": str(out / "decisions.jsonl")})
    reporters = _tensorboard(out / "tensorboard", settings.plot_every)
    print(f"qtuning demo: {description}, LoRA r=8, Q-Tuning preset {preset}, sample ratio {settings.sample_ratio:g} x "
          f"token ratio {settings.token_ratio:g}; {len(train_records)} training samples of {args.data} ({fmt}), "
          f"{n_eval} held out; "
          f"{args.steps} steps of {args.batch_size} x {args.grad_accum} samples", file=sys.stderr)
    on_cpu = not torch.cuda.is_available()
    device = "cpu" if on_cpu else "cuda"
    bf16 = args.model != "tiny" and native_bf16(device)  # emulated bf16 is 15-50x slower on CPUs without it
    print(describe_precision(device) if args.model != "tiny" else "precision: fp32 (the tiny model)",
          file=sys.stderr)
    loss_before = held_out_loss(model, eval_encoded, pad_id)

    rows = [{**_to_trl(r, fmt, has_template), **({"kind": r["kind"]} if "kind" in r else {})}
            for r in train_records]
    config = SFTConfig(
        output_dir=str(out / "trainer"), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, max_steps=args.steps, learning_rate=args.lr,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", seed=0,
        use_cpu=on_cpu, bf16=bf16,
        max_length=args.max_length, dataloader_drop_last=True, disable_tqdm=False,
        # TRL's default (checkpointing on), by its new name where transformers has it: no FutureWarning
        **({"activation_checkpointing": True} if "activation_checkpointing" in
           {f.name for f in dataclasses.fields(TrainingArguments)} else {}),
    )
    qtuning = _ComparedWithThePaper(settings)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # PEFT (0.21) reads model.is_gradient_checkpointing, a name recent transformers deprecates:
        # a warning about a library's internals that the demo's reader can do nothing about.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        trainer = SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok, peft_config=lora, callbacks=reporters)
    qtuning.attach(trainer)  # the documented path (README): refusals at once, the trainer handed over

    class Progress(ProgressCallback):  # the usual bar, with one readable line per step instead of a dict
        def on_log(self, args_, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.write(_line(state.global_step, state.max_steps, logs))

    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(Progress())
    result = trainer.train()
    try:  # the Trainer makes its output_dir; nothing is saved in it (save_strategy "no")
        (out / "trainer").rmdir()
    except OSError:  # not empty: leave what is there
        pass
    train_seconds = result.metrics.get("train_runtime", float("nan"))
    loss_after = held_out_loss(trainer.model, eval_encoded, pad_id)
    trainer.save_model(str(out / "adapter"))

    # Pictures from the decision log, each sample with its kind (where the data has one) and what
    # the paper's Algorithm 1 would have kept from the same pool (when the settings are not the paper's)
    log = _annotated(trainer, read_log(out / "decisions.jsonl"), qtuning.paper_keep)
    pictures = [plot_decisions(log, out / "decisions.png",
                               title=f"Q-Tuning on {Path(args.data).name} with {description}")]
    last = max(r["step"] for r in log)
    pool = [r for r in log if r["step"] == last]
    pictures.append(plot_scores(pool, out / "eu-plane-last-step.png", sample_ratio=pool_ratio(pool),
                                thresholds=reproduces_kept(pool),
                                title=f"EU plane of the last step's pool (step {last}; quadrants by its medians; "
                                      "hollow = dropped)"))

    totals = qtuning.totals
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary = {
        "model": description, "data": str(args.data), "steps": trainer.state.global_step,
        "preset": preset, "settings": settings.decisions(),
        "sample_ratio": settings.sample_ratio, "token_ratio": settings.token_ratio,
        "held_out_loss_before": loss_before, "held_out_loss_after": loss_after,
        "train_loss_first_step": losses[0] if losses else None, "train_loss_last_step": losses[-1] if losses else None,
        "samples_seen": int(totals["pool_samples"]), "samples_trained": int(totals["kept_samples"]),
        "label_tokens_seen": int(totals["label_tokens"]), "label_tokens_trained": int(totals["kept_label_tokens"]),
        "train_seconds": train_seconds, "scoring_seconds": totals["score_seconds"],
        "total_seconds": time.perf_counter() - started,
        "kept_by_kind": _kept_by_kind(log),
        # what the paper's Algorithm 1 would have kept from the same pools (same scores), if the
        # preset is not the paper
        "paper_would_keep_by_kind": _kept_by_kind(log, "paper_kept") if qtuning.paper_keep else None,
        "pictures": pictures,
        "tensorboard": str(out / "tensorboard") if reporters else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _print_summary(summary, out)
    return 0


class _ComparedWithThePaper(QTuning):
    """QTuning that also takes, after every step, the paper's decision from the same scores
    (:attr:`QTuning.last_step`; the same config without its rules, :meth:`QTuningConfig.paper`), so
    the summary can set the two side by side."""

    def __init__(self, config: QTuningConfig, **kw):
        super().__init__(config, **kw)
        paper = config.paper()
        self._paper = None if paper == config else paper
        self.paper_keep: dict[int, list[bool]] = {}  # step -> keep over the pool, in decision-log order

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        if self._paper is not None and self.last_step is not None:
            paper = decide_step(self.last_step.scores, self._paper, rules=[])
            self.paper_keep[state.global_step] = torch.cat(paper.keep).tolist()


def _tensorboard(folder: Path, plot_every: int) -> list:
    """A TensorBoard reporter writing to ``folder`` (the live EU-plane picture every ``plot_every``
    steps, and the metrics), where tensorboard is installed and ``plot_every`` > 0; else none, said
    in one line."""
    from transformers.integrations import TensorBoardCallback, is_tensorboard_available

    if not plot_every:
        return []
    if not is_tensorboard_available():
        print("qtuning demo: tensorboard is not installed (pip install tensorboard), so --plot-every draws no live "
              "picture; the pictures below are drawn from the decision log", file=sys.stderr)
        return []
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from tensorboardX import SummaryWriter

    print(f"qtuning demo: the live EU-plane picture every {plot_every} steps and the metrics go to {folder} "
          f"(tensorboard --logdir {folder})", file=sys.stderr)
    return [TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(folder)))]


def _annotated(trainer, log: list[dict], paper_keep: dict[int, list[bool]]) -> list[dict]:
    """The decision log's rows with ``kind`` (if the data has a ``kind`` column, as the shipped demo
    data does) and ``paper_kept`` (if ``paper_keep``, step -> the paper's keep over that pool)."""
    ds = trainer.train_dataset
    kinds = {sample_id(ids): k for ids, k in zip(ds["input_ids"], ds["kind"])} if "kind" in ds.column_names else None
    position: Counter = Counter()
    out = []
    for r in log:
        r = dict(r)
        if kinds is not None:
            r["kind"] = kinds.get(r["id"], "?")
        if paper_keep:
            r["paper_kept"] = bool(paper_keep[r["step"]][position[r["step"]]])
            position[r["step"]] += 1
        out.append(r)
    return out


def _kept_by_kind(log: list[dict], kept: str = "kept") -> dict | None:
    """Per kind of sample (rows annotated by :func:`_annotated`), seen and kept (``kept``: the field
    to count, ``paper_kept`` for what the paper would keep); None when the kinds are unknown."""
    if not log or "kind" not in log[0]:
        return None
    seen, count = Counter(r["kind"] for r in log), Counter(r["kind"] for r in log if r[kept])
    return {k: {"seen": seen[k], "kept": count[k]} for k in sorted(seen)}


def _print_summary(s: dict, out: Path) -> None:
    def pct(a, b):
        return f"{100 * a / b:.1f} %" if b else "n/a"

    lines = [
        "",
        f"Q-Tuning demo: {s['steps']} steps with {s['model']}",
        f"  held-out loss (NLL per response token): {s['held_out_loss_before']:.4f} before -> "
        f"{s['held_out_loss_after']:.4f} after",
    ]
    if s["train_loss_first_step"] is not None:
        lines.append(f"  training loss: {s['train_loss_first_step']:.4f} at step 1 -> "
                     f"{s['train_loss_last_step']:.4f} at step {s['steps']}")
    lines += [
        f"  trained {s['samples_trained']} of {s['samples_seen']} samples ({pct(s['samples_trained'], s['samples_seen'])})"
        f" and {s['label_tokens_trained']} of {s['label_tokens_seen']} label tokens "
        f"({pct(s['label_tokens_trained'], s['label_tokens_seen'])})",
        f"  time: {s['train_seconds']:.1f} s training, of which {s['scoring_seconds']:.1f} s scoring "
        f"({pct(s['scoring_seconds'], s['train_seconds'])}); {s['total_seconds']:.0f} s in all",
    ]
    if s["kept_by_kind"]:
        lines.append(f"  kept by kind of sample ({s['preset']}): " + ", ".join(
            f"{k} {v['kept']}/{v['seen']} ({pct(v['kept'], v['seen'])})" for k, v in s["kept_by_kind"].items()))
    if s.get("paper_would_keep_by_kind"):
        lines.append("  the paper's Algorithm 1 on the same pools would keep: " + ", ".join(
            f"{k} {v['kept']}/{v['seen']} ({pct(v['kept'], v['seen'])})"
            for k, v in s["paper_would_keep_by_kind"].items()))
    lines += [f"  pictures: {', '.join(s['pictures'])}"
              + (f"; live EU planes: tensorboard --logdir {s['tensorboard']}" if s.get("tensorboard") else ""),
              f"  summary: {out / 'summary.json'}, adapter: {out / 'adapter'}"]
    print("\n".join(lines))
    if not math.isfinite(s["held_out_loss_after"]):
        print("warning: the held-out loss is not finite", file=sys.stderr)
