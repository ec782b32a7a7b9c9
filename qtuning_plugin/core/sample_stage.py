"""Sample stage of Q-Tuning (docs/method.md §2): triage a selection pool on the Error-Uncertainty plane.

Error is the response perplexity (PPL), uncertainty the mean predictive entropy (Ent).

| quadrant | PPL  | Ent  | name                   | action                  |
|----------|------|------|------------------------|-------------------------|
| Q1       | high | high | harmful noise          | drop                    |
| Q2       | high | low  | valuable misconception | keep, prune its tokens  |
| Q3       | low  | low  | redundant knowledge    | drop                    |
| Q4       | low  | high | calibration data       | keep every token        |

The paper bisects one quantile level a shared by both axes. Between the levels where a quantile
passes a data value the quadrant sets are constant, so this module walks those breakpoints
exactly, in rank form: with m samples per tail, Q2_m = top-m PPL ∩ bottom-m Ent and
Q4_m = bottom-m PPL ∩ top-m Ent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from .config import OPTIONS

Q1, Q2, Q3, Q4 = 1, 2, 3, 4
QUADRANT_NAMES = {Q1: "harmful noise", Q2: "misconception", Q3: "redundant", Q4: "calibration"}
_SAMPLE_RATIO = next(o for o in OPTIONS if o.name == "sample_ratio")  # checks the argument as the config does


@dataclass(frozen=True)
class Triage:
    """Decision for one pool of n samples.

    - ``keep``: bool [n], exactly K = max(1, floor(r_s n')) True, n' the samples without a NaN
      score (fewer when fewer are eligible; none when n' = 0).
    - ``prune_tokens``: bool [n], True for kept samples whose tokens are pruned (core Q2 and
      topped-up Q2-like samples); implies ``keep``.
    - ``level``: the quantile level a = m / n' of the core set (0.0 when the core is empty).
    - ``core``: bool [n], the samples of Q2_m ∪ Q4_m (the rest of ``keep`` is the top-up).
    """

    keep: torch.Tensor
    prune_tokens: torch.Tensor
    level: float
    core: torch.Tensor

    @property
    def k(self) -> int:
        return int(self.keep.sum())


def scored_mask(ppl: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    """bool [n]: the samples of a pool that have a score (neither PPL nor Ent is NaN). A row without
    one (no trainable token, or a numerically broken forward) is no sample: never kept, not
    counted in K."""
    return ~(torch.isnan(ppl) | torch.isnan(entropy))


def share_of(n: int, ratio: float) -> int:
    """floor(ratio n), exact for the ratio as written in decimal: ``0.29`` is read as 29/100 (the
    shortest decimal that round-trips the float), so 0.29 x 100 is 29, where ``int(0.29 * 100)``
    gives 28."""
    return math.floor(Fraction(repr(float(ratio))) * n)


def kept_count(n: int, sample_ratio: float) -> int:
    """K = max(1, floor(r_s n)) for a pool of n >= 1 samples (0 for an empty pool), exact for
    decimal ratios (:func:`share_of`)."""
    if n <= 0:
        return 0
    return max(1, share_of(n, sample_ratio))


def ascending_ranks(x: torch.Tensor) -> torch.Tensor:
    """Rank of each element in a stable ascending sort (of equal values, the earlier ranks lower)."""
    order = torch.sort(x, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(x.numel(), device=x.device)
    return ranks


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """Min-max normalise to [0, 1] over the finite values; +inf -> 1; all zeros when the finite
    values are all equal. One infinite score does not flatten the others (docs/method.md §2: the
    finite values are normalised among themselves, not all set to 0)."""
    inf = torch.isposinf(x)
    finite = torch.isfinite(x)
    out = torch.zeros_like(x)
    if finite.any():
        lo, hi = x[finite].min(), x[finite].max()
        if hi > lo:
            out = torch.where(finite, (x - lo) / (hi - lo), out)
    return torch.where(inf, torch.ones_like(out), out)


def triage(ppl: torch.Tensor, entropy: torch.Tensor, sample_ratio: float,
           groups: torch.Tensor | None = None, eligible: torch.Tensor | None = None) -> Triage:
    """Pick the samples to train from one pool (docs/method.md §2, rank form).

    ``ppl`` and ``entropy`` are 1-D tensors of the pool's n >= 1 samples. A sample whose PPL or
    Ent is NaN (no trainable token, or a numerically broken forward) is not a candidate: it is
    never kept and the others are triaged as if it were not there, so K = max(1, floor(r_s n'))
    over the n' scored samples (none kept when n' = 0). +inf counts as the highest value.
    K samples are kept: the core Q2_m ∪ Q4_m for the largest m in 1..floor(n'/2) with at most K
    members, topped up in descending order of |p - e| (PPL and Ent min-max normalised over
    their finite values, +inf -> 1), ties to the earlier sample.

    ``groups`` (long [n], ids 0..G-1; ``pool: global``): the pool is every rank's samples and
    group g is rank g's. Ranks, quantile levels and the normalisation of the top-up score come
    from the whole pool; m is the largest level at which *every* group's core fits its own
    K_g = max(1, floor(r_s n_g)); each group is then topped up within itself, so that each
    keeps exactly K_g. With one group this is the plain triage.

    ``eligible`` (bool [n]; the rules beyond the paper, :mod:`qtuning_plugin.core.rules`): a
    sample marked False is never kept and is triaged as if it were not there, but its slot
    stays: K still counts it, and the other samples fill it (K_g = min(K_g, the group's eligible
    samples)).
    """
    if ppl.ndim != 1 or ppl.shape != entropy.shape:
        raise ValueError(f"triage: ppl and entropy must be 1-D of one length, got {tuple(ppl.shape)} "
                         f"and {tuple(entropy.shape)}")
    n = ppl.numel()
    if n == 0:
        raise ValueError("triage: the pool is empty")
    _SAMPLE_RATIO.check(sample_ratio, label="triage: sample_ratio")
    if groups is None:
        groups = torch.zeros(n, dtype=torch.long, device=ppl.device)
    elif groups.shape != ppl.shape or groups.dtype != torch.long or int(groups.min()) < 0:
        raise ValueError("triage: groups must be a long tensor of group ids >= 0, one per sample")
    if eligible is not None and (eligible.shape != ppl.shape or eligible.dtype != torch.bool):
        raise ValueError("triage: eligible must be a bool tensor, one entry per sample")
    scored = scored_mask(ppl, entropy)
    none = torch.zeros(n, dtype=torch.bool, device=ppl.device)
    # K_g over each group's scored samples, ineligible ones included (their slots stay).
    counts = torch.bincount(groups[scored], minlength=int(groups.max()) + 1)
    k = torch.tensor([kept_count(int(c), sample_ratio) for c in counts.tolist()], dtype=torch.long,
                     device=ppl.device)
    if eligible is not None:
        scored = scored & eligible.to(ppl.device)
    if not scored.any():
        return Triage(keep=none, prune_tokens=none.clone(), level=0.0, core=none.clone())
    idx = scored.nonzero().squeeze(1)
    k = torch.minimum(k, torch.bincount(groups[idx], minlength=k.numel()))
    keep, prune_tokens, core, level = _triage_scored(ppl[idx].to(torch.float64), entropy[idx].to(torch.float64),
                                                     groups[idx], k)
    out = [none.clone().index_put_((idx,), x) for x in (keep, prune_tokens, core)]
    return Triage(keep=out[0], prune_tokens=out[1], level=level, core=out[2])


def _triage_scored(ppl: torch.Tensor, entropy: torch.Tensor, groups: torch.Tensor, k: torch.Tensor):
    """:func:`triage` on n >= 1 samples without NaN, keeping k[g] of group g (k long [G]):
    (keep, prune_tokens, core, level)."""
    n = ppl.numel()

    # Sample i joins Q2_m from m2 = max(n - rank_ppl, rank_ent + 1) on (top-m PPL, bottom-m Ent),
    # and Q4_m from m4 = max(rank_ppl + 1, n - rank_ent) on. For m <= n/2 it can't be in both.
    rp, re = ascending_ranks(ppl), ascending_ranks(entropy)
    m2 = torch.maximum(n - rp, re + 1)
    m4 = torch.maximum(rp + 1, n - re)
    joins = torch.minimum(m2, m4)
    # |core_m ∩ group g| grows with m; find the largest m <= n // 2 at which every group's fits its K_g.
    counts = torch.zeros(k.numel(), n // 2 + 2, dtype=torch.long, device=ppl.device)
    counts.index_put_((groups, joins.clamp(max=n // 2 + 1)), torch.ones_like(joins), accumulate=True)
    sizes = counts.cumsum(1)
    ok = (sizes[:, 1 : n // 2 + 1] <= k[:, None]).all(0).nonzero()
    m = int(ok[-1]) + 1 if ok.numel() else 0
    core = joins <= m
    core_q2 = core & (m2 <= m)

    # Top-up each group to exactly K_g by |p - e|, descending; a stable sort of -|p - e| breaks
    # ties to the earlier sample.
    p, e = _minmax(ppl), _minmax(entropy)
    keep = core.clone()
    prune_tokens = core_q2.clone()
    for g in range(k.numel()):
        rest = (~core & (groups == g)).nonzero().squeeze(1)
        if rest.numel() == 0:
            continue
        gap = (p[rest] - e[rest]).abs()
        extra = rest[torch.sort(-gap, stable=True).indices[: int(k[g]) - int((core & (groups == g)).sum())]]
        keep[extra] = True
        prune_tokens[extra] = p[extra] >= e[extra]
    return keep, prune_tokens, core, m / n


def median_quadrants(ppl: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    """Quadrant (1-4) of each sample by the pool's medians, for reporting and plots only.

    High means strictly above the (lower) median; NaN counts as +inf. Selection itself uses
    :func:`triage`, whose thresholds depend on the sample ratio.
    """
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=ppl.device)
    ppl = torch.where(torch.isnan(ppl), inf, ppl.to(torch.float64))
    entropy = torch.where(torch.isnan(entropy), inf, entropy.to(torch.float64))
    high_err = ppl > ppl.median()
    high_unc = entropy > entropy.median()
    q = torch.full_like(ppl, Q3, dtype=torch.long)
    q[high_err & high_unc] = Q1
    q[high_err & ~high_unc] = Q2
    q[~high_err & high_unc] = Q4
    return q
