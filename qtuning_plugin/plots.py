"""Pictures of the Error-Uncertainty plane (matplotlib, Agg: no display needed).

- :func:`plot_scores`: one pool (a scored dataset) on the EU plane, coloured by quadrant, with the
  median lines and the thresholds of a sample ratio's triage.
- :func:`plot_decisions`: a decision log over training: EU-plane panels by step range (kept samples
  filled, dropped ones hollow) above the quadrant shares and the kept share per step.

Axes follow the paper: error = perplexity of the response, drawn as log PPL (the mean NLL of the
response tokens, nats), uncertainty = mean predictive entropy of the response tokens (nats).
"""

from __future__ import annotations

import math
import os
import textwrap
from collections import defaultdict
from typing import Sequence

import torch

from .core.triage import QUADRANT_NAMES, triage

QUADRANT_COLOURS = {1: "tab:red", 2: "tab:orange", 3: "tab:gray", 4: "tab:blue"}
X_LABEL = "error: log perplexity of the response (mean NLL, nats)"
Y_LABEL = "uncertainty: mean predictive entropy (nats)"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def quadrant_label(q: int) -> str:
    return f"Q{q} {QUADRANT_NAMES[q]}"


def triage_thresholds(ppl: Sequence[float], entropy: Sequence[float], sample_ratio: float) -> dict:
    """The level a = m/n that :func:`~qtuning_plugin.core.triage` reaches on this pool and the
    values that bound its core: Q2_m = PPL >= ``ppl_high`` and Ent <= ``entropy_low``; Q4_m =
    PPL <= ``ppl_low`` and Ent >= ``entropy_high``. Also the kept mask."""
    p = torch.tensor(list(ppl), dtype=torch.float64)
    e = torch.tensor(list(entropy), dtype=torch.float64)
    result = triage(p, e, sample_ratio)
    n, m = p.numel(), round(result.level * p.numel())
    out = {"level": result.level, "keep": result.keep.tolist(), "prune_tokens": result.prune_tokens.tolist()}
    if m >= 1:
        ps, es = p.nan_to_num(math.inf).sort().values, e.nan_to_num(math.inf).sort().values
        out.update(ppl_low=float(ps[m - 1]), ppl_high=float(ps[n - m]),
                   entropy_low=float(es[m - 1]), entropy_high=float(es[n - m]))
    return out


def _finite_points(rows):
    return [r for r in rows if r.get("ppl") is not None and r.get("entropy") is not None
            and math.isfinite(r["ppl"]) and r["ppl"] > 0 and math.isfinite(r["entropy"])]


def _scatter_quadrants(ax, rows, kept_key: str | None = None, size: float = 14) -> None:
    for q in (1, 2, 3, 4):
        in_q = [r for r in rows if r["quadrant"] == q]
        groups = [(in_q, True)] if kept_key is None else [
            ([r for r in in_q if r[kept_key]], True), ([r for r in in_q if not r[kept_key]], False)]
        for pts, filled in groups:
            if not pts:
                continue
            label = quadrant_label(q) + ("" if kept_key is None else (" kept" if filled else " dropped"))
            ax.scatter([math.log(r["ppl"]) for r in pts], [r["entropy"] for r in pts], s=size, alpha=0.75,
                       label=label, linewidths=0.8,
                       **({"c": QUADRANT_COLOURS[q]} if filled else
                          {"facecolors": "none", "edgecolors": QUADRANT_COLOURS[q]}))
    ax.set_xlabel(X_LABEL)
    ax.set_ylabel(Y_LABEL)
    ax.grid(alpha=0.3, which="both")


def plot_scores(rows: Sequence[dict], path: str | os.PathLike, sample_ratio: float | None,
                title: str = "") -> str:
    """EU plane of one scored pool (rows with ppl, entropy, quadrant; ``kept`` if present).
    Draws the median lines (the quadrants) and the triage thresholds of ``sample_ratio``
    (``None``: rows from several pools, neither medians nor thresholds are drawn)."""
    plt = _pyplot()
    pts = _finite_points(rows)
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    _scatter_quadrants(ax, pts, kept_key="kept" if pts and "kept" in pts[0] else None)
    if pts and sample_ratio is not None:
        ppl = sorted(r["ppl"] for r in pts)
        ent = sorted(r["entropy"] for r in pts)
        mid = (len(pts) - 1) // 2  # the lower median, as median_quadrants
        ax.axvline(math.log(ppl[mid]), color="k", ls=":", lw=1, label="medians (quadrants)")
        ax.axhline(ent[mid], color="k", ls=":", lw=1)
        th = triage_thresholds([r["ppl"] for r in pts], [r["entropy"] for r in pts], sample_ratio)
        if "ppl_high" in th:
            a = th["level"]
            for x in (th["ppl_low"], th["ppl_high"]):
                ax.axvline(math.log(x), color="tab:green", ls="--", lw=1)
            for y in (th["entropy_low"], th["entropy_high"]):
                ax.axhline(y, color="tab:green", ls="--", lw=1)
            ax.plot([], [], color="tab:green", ls="--", lw=1,
                    label=f"triage thresholds, r_s={sample_ratio:g} (quantiles {a:.2f} / {1 - a:.2f})")
    ax.set_title(textwrap.fill(title or f"Error-Uncertainty plane ({len(pts)} samples)", 70), fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def plot_decisions(rows: Sequence[dict], path: str | os.PathLike, panels: int = 4, title: str = "") -> str:
    """A decision log over training: ``panels`` EU-plane panels by step range, then quadrant shares
    (stacked, % of the pool) and the kept share per step."""
    plt = _pyplot()
    steps = sorted({r["step"] for r in rows})
    if not steps:
        raise ValueError("the decision log has no rows")
    panels = max(1, min(panels, len(steps)))
    bounds = [steps[round(i * len(steps) / panels)] for i in range(panels)] + [steps[-1] + 1]
    fig = plt.figure(figsize=(4.2 * panels, 8.2))
    grid = fig.add_gridspec(2, panels, height_ratios=[1.25, 1])
    pts = _finite_points(rows)
    first = None
    for i in range(panels):
        ax = fig.add_subplot(grid[0, i], sharex=first, sharey=first)
        first = first or ax
        lo, hi = bounds[i], bounds[i + 1]
        _scatter_quadrants(ax, [r for r in pts if lo <= r["step"] < hi], kept_key="kept", size=10)
        ax.set_title(f"steps {lo}-{hi - 1}" if hi - 1 > lo else f"step {lo}", fontsize=10)
        ax.set_xlabel("error: log PPL (mean NLL, nats)", fontsize=9)
        if i:
            ax.set_ylabel("")
    first.legend(fontsize=6, loc="best", ncol=2)

    counts: dict[int, list[int]] = defaultdict(lambda: [0] * 6)  # per step: quadrants 1-4, kept, n
    for r in rows:
        c = counts[r["step"]]
        c[r["quadrant"]] += 1
        c[5] += 1
        c[0] += bool(r["kept"])
    ax = fig.add_subplot(grid[1, :])
    n = [counts[s][5] for s in steps]
    ax.stackplot(steps, *[[100 * counts[s][q] / m for s, m in zip(steps, n)] for q in (1, 2, 3, 4)],
                 labels=[quadrant_label(q) for q in (1, 2, 3, 4)],
                 colors=[QUADRANT_COLOURS[q] for q in (1, 2, 3, 4)], alpha=0.55)
    ax.plot(steps, [100 * counts[s][0] / m for s, m in zip(steps, n)], "k-", lw=2, label="kept")
    kept_tokens = defaultdict(lambda: [0, 0])
    for r in rows:
        if "kept_tokens" in r and "n_tokens" in r and r["kept"]:
            kept_tokens[r["step"]][0] += r["kept_tokens"]
            kept_tokens[r["step"]][1] += r["n_tokens"]
    if kept_tokens:
        ax.plot(steps, [100 * kept_tokens[s][0] / max(1, kept_tokens[s][1]) for s in steps], "k--", lw=1.5,
                label="label tokens kept, in kept samples")
    ax.set(xlabel="optimizer step", ylabel="% of the pool's samples", ylim=(0, 100))
    if len(steps) > 1:
        ax.set_xlim(steps[0], steps[-1])
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(alpha=0.3)
    fig.suptitle(textwrap.fill(title or f"Q-Tuning decisions over training ({len(steps)} steps, "
                               f"{len(rows)} sample-steps)", 120))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
