"""Pictures of the Error-Uncertainty plane (matplotlib, Agg: no display needed).

- :func:`plot_scores`: one pool (a scored dataset) on the EU plane, coloured by quadrant, with the
  median lines and the thresholds of a sample ratio's triage.
- :func:`~qtuning_plugin.decision_plots.plot_decisions`: a decision log over training (its own module).
- :func:`pool_figure`: the latest pool on the EU plane as a matplotlib figure, for the trackers
  (:mod:`qtuning_plugin.live`).

Axes follow the paper: error = perplexity of the response, drawn as log PPL (the mean NLL of the
response tokens, nats), uncertainty = mean predictive entropy of the response tokens (nats).
"""

from __future__ import annotations

import math
import os
import textwrap
from typing import Sequence

import torch

from .core import QUADRANT_NAMES, triage

QUADRANT_COLOURS = {1: "tab:red", 2: "tab:orange", 3: "tab:gray", 4: "tab:blue"}
# Samples of a known kind (a ``kind`` field on the rows: the demo's data has one), ringed on the plane.
KIND_MARKERS = {"wrong": ("D", "crimson", "wrong answer"), "garbled": ("s", "purple", "garbled answer"),
                "redundant": ("o", "black", "duplicate")}
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


def bulk_limits(values: Sequence[float], fence: float = 3.0, pad: float = 0.06) -> tuple[float, float]:
    """Axis limits that frame the bulk of ``values``: the data range cut at Tukey's far-out fences
    (quartiles -/+ ``fence`` x the interquartile range), padded. A few garbled samples far out no
    longer squash the other points into a corner; they are drawn at the edge (see ``_scatter``)."""
    v = sorted(values)
    if not v:
        return 0.0, 1.0
    q1, q3 = v[(len(v) - 1) // 4], v[(3 * (len(v) - 1) + 3) // 4]
    iqr = q3 - q1
    lo, hi = (v[0], v[-1]) if iqr <= 0 else (max(v[0], q1 - fence * iqr), min(v[-1], q3 + fence * iqr))
    span = hi - lo or max(abs(hi), 1.0) * 0.1
    return lo - pad * span, hi + pad * span


def _scatter_quadrants(ax, rows, kept_key: str | None = None, size: float = 14) -> int:
    """Points by quadrant (filled = kept, hollow = dropped when ``kept_key``), the axes framed on the
    bulk; points beyond the frame are drawn on its edge as triangles pointing out. Returns their number."""
    xs = [math.log(r["ppl"]) for r in rows]
    ys = [r["entropy"] for r in rows]
    (x0, x1), (y0, y1) = bulk_limits(xs), bulk_limits(ys)
    outside = 0
    for q in (1, 2, 3, 4):
        in_q = [(x, y, r) for x, y, r in zip(xs, ys, rows) if r["quadrant"] == q]
        groups = [(in_q, True)] if kept_key is None else [
            ([p for p in in_q if p[2][kept_key]], True), ([p for p in in_q if not p[2][kept_key]], False)]
        for pts, filled in groups:
            inside = [(x, y) for x, y, _ in pts if x0 <= x <= x1 and y0 <= y <= y1]
            label = quadrant_label(q) + ("" if kept_key is None else (" kept" if filled else " dropped"))
            style = ({"c": QUADRANT_COLOURS[q]} if filled else {"facecolors": "none", "edgecolors": QUADRANT_COLOURS[q]})
            if pts:
                ax.scatter([x for x, _ in inside], [y for _, y in inside], s=size, alpha=0.75, label=label,
                           linewidths=0.8, **style)
            for x, y, _ in pts:
                if x0 <= x <= x1 and y0 <= y <= y1:
                    continue
                outside += 1
                marker = ">" if x > x1 else "<" if x < x0 else "^" if y > y1 else "v"
                ax.scatter([min(max(x, x0), x1)], [min(max(y, y0), y1)], s=size * 2.5, marker=marker, alpha=0.9,
                           linewidths=0.8, clip_on=False, zorder=3, **style)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    if outside:
        ax.text(0.99, 0.01, f"{outside} beyond the frame, drawn on its edge", transform=ax.transAxes,
                ha="right", va="bottom", fontsize=7, color="0.3")
    ax.set_xlabel(X_LABEL)
    ax.set_ylabel(Y_LABEL)
    ax.grid(alpha=0.3, which="both")
    return outside


def _quadrant_lines(ax, rows, sample_ratio: float | None) -> float | None:
    """The pool's median lines (its quadrants) and, for ``sample_ratio``, the triage thresholds
    (returns their level a, None when not drawn)."""
    ppl = sorted(r["ppl"] for r in rows)
    ent = sorted(r["entropy"] for r in rows)
    mid = (len(rows) - 1) // 2  # the lower median, as median_quadrants
    ax.axvline(math.log(ppl[mid]), color="k", ls=":", lw=1, label="medians (the quadrants)")
    ax.axhline(ent[mid], color="k", ls=":", lw=1)
    if sample_ratio is None:
        return None
    th = triage_thresholds([r["ppl"] for r in rows], [r["entropy"] for r in rows], sample_ratio)
    if "ppl_high" in th:
        a = th["level"]
        for x in (th["ppl_low"], th["ppl_high"]):
            ax.axvline(math.log(x), color="tab:green", ls="--", lw=1)
        for y in (th["entropy_low"], th["entropy_high"]):
            ax.axhline(y, color="tab:green", ls="--", lw=1)
        ax.plot([], [], color="tab:green", ls="--", lw=1, label="triage thresholds: quantiles a and 1 - a")
        return a
    return None


def plot_scores(rows: Sequence[dict], path: str | os.PathLike, sample_ratio: float | None,
                title: str = "", thresholds: bool = True) -> str:
    """EU plane of one scored pool (rows with ppl, entropy, quadrant; ``kept`` if present), framed
    on its bulk. Draws the median lines (the quadrants) and, with ``thresholds``, the triage
    thresholds of ``sample_ratio`` (``None``: rows from several pools, no line is drawn)."""
    plt = _pyplot()
    pts = _finite_points(rows)
    fig, ax = plt.subplots(figsize=(9.5, 5.5))
    _scatter_quadrants(ax, pts, kept_key="kept" if pts and "kept" in pts[0] else None)
    _mark_kept_out(ax, pts)
    _mark_kinds(ax, pts)
    if pts and sample_ratio is not None:
        level = _quadrant_lines(ax, pts, sample_ratio if thresholds else None)
        if level is not None and not title:
            title = f"Error-Uncertainty plane ({len(pts)} samples; r_s = {sample_ratio:g}: triage level a = {level:.2f})"
    ax.set_title(textwrap.fill(title or f"Error-Uncertainty plane ({len(pts)} samples)", 70), fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def pool_ratio(rows: Sequence[dict]) -> float:
    """A sample ratio that reproduces the pool's kept count K: (K + 1/2) / n (floor gives K)."""
    return (sum(bool(r["kept"]) for r in rows) + 0.5) / len(rows)


def reproduces_kept(pool: Sequence[dict]) -> bool:
    """Whether the paper's triage, at the ratio that gives the pool's K, keeps what the log says was
    kept (not so under the reference guard, say): only then are its thresholds drawn."""
    ratio = pool_ratio(pool)
    return triage_thresholds([r["ppl"] for r in pool], [r["entropy"] for r in pool], ratio)["keep"] == [
        bool(r["kept"]) for r in pool]


def _mark_kept_out(ax, rows, size: float = 14) -> int:
    """Cross the samples a rule against wrong labels kept out (decision-log fields ``excluded``,
    ``suspect``), on the frame's edge when beyond it. Returns their number."""
    flagged = [r for r in rows if r.get("excluded") or r.get("suspect")]
    if flagged:
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        ax.scatter([min(max(math.log(r["ppl"]), x0), x1) for r in flagged],
                   [min(max(r["entropy"], y0), y1) for r in flagged], marker="x", c="black", s=size * 1.6,
                   linewidths=0.9, clip_on=False, zorder=4, label="kept out as a suspected wrong label")
    return len(flagged)


def _mark_kinds(ax, rows, size: float = 14) -> None:
    """Ring the samples of a known kind (:data:`KIND_MARKERS`), on the frame's edge when beyond it."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    for kind, (marker, colour, label) in KIND_MARKERS.items():
        of_kind = [r for r in rows if r.get("kind") == kind]
        if of_kind:
            ax.scatter([min(max(math.log(r["ppl"]), x0), x1) for r in of_kind],
                       [min(max(r["entropy"], y0), y1) for r in of_kind], marker=marker, s=size * 4,
                       facecolors="none", edgecolors=colour, linewidths=1.1, clip_on=False, zorder=5,
                       label=f"{label} (ringed)")


def draw_pool(ax, rows, size: float = 14) -> tuple[int, float | None] | None:
    """One pool on ``ax``: points by quadrant (filled kept, hollow dropped), the samples a rule kept
    out crossed, known kinds ringed, the median lines and, where the paper's triage reproduces
    what was kept, its thresholds. Returns (finite points drawn, the triage level or None), or
    None when no point is finite."""
    pool = _finite_points(rows)
    if not pool:
        return None
    _scatter_quadrants(ax, pool, kept_key="kept", size=size)
    _mark_kept_out(ax, pool, size=size)
    _mark_kinds(ax, pool, size=size)
    return len(pool), _quadrant_lines(ax, pool, pool_ratio(pool) if reproduces_kept(pool) else None)


def pool_figure(rows: Sequence[dict], title: str):
    """The EU plane of one pool as a matplotlib figure (the caller closes it)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.0, 4.6))
    if draw_pool(ax, rows) is None:
        ax.text(0.5, 0.5, "no scored sample", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(textwrap.fill(title, 80), fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig
