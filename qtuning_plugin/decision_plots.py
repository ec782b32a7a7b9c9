"""A decision log over training, in one picture (:func:`plot_decisions`): EU-plane panels by step
range (kept samples filled, dropped ones hollow, those a rule kept out crossed;
samples of a known kind, such as the demo's wrong answers, ringed) above the kept samples by
quadrant, one bar per step, and, where kinds are known, the wrong answers kept per step (beside
those the paper's Algorithm 1 would keep, when the rows carry ``paper_kept``)."""

from __future__ import annotations

import os
import textwrap
from typing import Sequence

from .plots import QUADRANT_COLOURS, _finite_points, _pyplot, draw_pool, quadrant_label


def plot_decisions(rows: Sequence[dict], path: str | os.PathLike, panels: int = 4, title: str = "") -> str:
    """A decision log over training. Top: ``panels`` pools spread over training (first to last
    step; rank 0's where there are several), each on its own EU plane framed on its bulk, with its
    median lines (the quadrants) and, where the paper's triage reproduces what was kept, its
    triage level; the samples a rule kept out (any rule's decision-log field) are crossed.
    Bottom: the kept samples by quadrant per step, and the share of their label tokens kept (token
    pruning); rows of several ranks all count there."""
    plt = _pyplot()
    steps = sorted({r["step"] for r in rows})
    if not steps:
        raise ValueError("the decision log has no rows")
    panels = max(1, min(panels, len(steps)))
    shown = sorted({steps[round(i * (len(steps) - 1) / max(1, panels - 1))] for i in range(panels)})
    fig = plt.figure(figsize=(4.2 * max(panels, 2) + 1.5, 8.6), layout="constrained")
    grid = fig.add_gridspec(2, len(shown), height_ratios=[1.3, 1])
    rank = min(r.get("rank", 0) for r in rows)
    several = len({r.get("rank", 0) for r in rows}) > 1
    legend: dict = {}
    for i, step in enumerate(shown):
        ax = fig.add_subplot(grid[0, i])
        pool = _finite_points([r for r in rows if r["step"] == step and r.get("rank", 0) == rank])
        drawn = draw_pool(ax, pool)
        if drawn is None:
            ax.set_title(f"step {step}: no scored sample", fontsize=10)
            continue
        level = drawn[1]
        ax.set_title(f"step {step}{f' (rank {rank})' if several else ''}: {len(pool)} samples, "
                     f"{sum(bool(r['kept']) for r in pool)} kept" + (f", a = {level:.2f}" if level else ""),
                     fontsize=10)
        ax.set_xlabel("error: log PPL (mean NLL, nats)", fontsize=9)
        if i:
            ax.set_ylabel("")
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    order = sorted(legend, key=lambda k: (not k.startswith("Q"), k))
    fig.legend([legend[k] for k in order], order, loc="outside right upper", fontsize=7)

    half = max(1, (2 * len(shown)) // 3)
    _kept_by_quadrant(fig.add_subplot(grid[1, :half]), rows, steps)
    if half < len(shown):
        ax = fig.add_subplot(grid[1, half:])
        if any("kind" in r for r in rows):
            _wrong_kept(ax, rows, steps)
        else:
            _tokens_kept(ax, rows, steps)
    fig.suptitle(textwrap.fill(title or f"Q-Tuning decisions over training ({len(steps)} steps, "
                               f"{len(rows)} sample-steps)", 120))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _step_axis(ax, steps, xlabel: str = "optimizer step") -> None:
    ax.set_xlabel(xlabel)
    ax.set_xlim(steps[0] - 0.6, steps[-1] + 0.6)
    if len(steps) <= 30:
        ax.set_xticks(steps)
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3, axis="y")


def _kept_by_quadrant(ax, rows, steps) -> None:
    """Per step, one bar: the kept samples by the quadrant of their pool, in % of the kept."""
    counts = {s: [0] * 5 for s in steps}  # per step: kept in Q1-4, all kept
    for r in rows:
        if r["kept"]:
            counts[r["step"]][r["quadrant"]] += 1
            counts[r["step"]][0] += 1
    bottom = [0.0] * len(steps)
    for q in (1, 2, 3, 4):
        share = [100 * counts[s][q] / max(1, counts[s][0]) for s in steps]
        ax.bar(steps, share, bottom=bottom, width=0.8, color=QUADRANT_COLOURS[q], alpha=0.7, label=quadrant_label(q))
        bottom = [b + x for b, x in zip(bottom, share)]
    ax.set(ylabel="% of the kept samples", ylim=(0, 100), title="the kept samples, by quadrant of their pool")
    _step_axis(ax, steps)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _tokens_kept(ax, rows, steps) -> None:
    """Per step: the share of the kept samples' label tokens left in the loss (token pruning)."""
    tokens = {s: [0, 0] for s in steps}
    for r in rows:
        if r["kept"] and "kept_tokens" in r and "n_tokens" in r:
            tokens[r["step"]][0] += r["kept_tokens"]
            tokens[r["step"]][1] += r["n_tokens"]
    ax.bar(steps, [100 * tokens[s][0] / max(1, tokens[s][1]) for s in steps], width=0.8, color="0.35")
    ax.set(ylabel="% of their label tokens", ylim=(0, 105), title="label tokens kept in the kept samples")
    _step_axis(ax, steps)


def _wrong_kept(ax, rows, steps) -> None:
    """Per step, where the samples' kinds are known: the wrong answers in the pool, those kept, and
    (rows with ``paper_kept``) those the paper's Algorithm 1 would have kept from the same pool."""
    seen = {s: 0 for s in steps}
    kept = {s: 0 for s in steps}
    paper = {s: 0 for s in steps}
    for r in rows:
        if r.get("kind") == "wrong":
            seen[r["step"]] += 1
            kept[r["step"]] += bool(r["kept"])
            paper[r["step"]] += bool(r.get("paper_kept"))
    compare = any("paper_kept" in r for r in rows)
    width = 0.4 if compare else 0.8
    ax.bar(steps, [seen[s] for s in steps], width=0.9, color="0.85", label="wrong answers in the pool")
    ax.bar([s - width / 2 if compare else s for s in steps], [kept[s] for s in steps], width=width,
           color="crimson", label="kept")
    if compare:
        ax.bar([s + width / 2 for s in steps], [paper[s] for s in steps], width=width, color="tab:orange",
               label="the paper's Algorithm 1 would keep")
    total = (sum(kept.values()), sum(seen.values()))
    ax.set(ylabel="samples", title=f"wrong answers kept: {total[0]} of {total[1]}"
           + (f" (the paper: {sum(paper.values())})" if compare else ""))
    ax.yaxis.get_major_locator().set_params(integer=True)
    _step_axis(ax, steps)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
