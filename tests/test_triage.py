"""Sample stage (docs/method.md §2): hand-worked pools and properties over random pools."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qtuning_plugin.core import kept_count, median_quadrants, triage
from qtuning_plugin.core.sample_stage import Triage, ascending_ranks, share_of

INF, NAN = math.inf, math.nan


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def idx(mask):
    return mask.nonzero().squeeze(1).tolist()


def test_six_sample_pool_worked_by_hand():
    # sample:     0    1    2    3    4    5
    ppl = t(5.0, 1.0, 4.0, 2.0, 6.0, 3.0)
    ent = t(1.0, 2.0, 6.0, 5.0, 3.0, 4.0)
    # r_s = 0.5 -> K = 3.  Highest PPL first: 4, 0, 2, 5, 3, 1.  Lowest Ent first: 0, 1, 4, 5, 3, 2.
    # m = 1: Q2 = {4} ∩ {0} = {}, Q4 = {1} ∩ {2} = {}                    -> core {}       (0)
    # m = 2: Q2 = {4,0} ∩ {0,1} = {0}, Q4 = {1,3} ∩ {2,3} = {3}          -> core {0, 3}   (2 <= 3)
    # m = 3: Q2 = {4,0,2} ∩ {0,1,4} = {0,4}, Q4 = {1,3,5} ∩ {2,3,5} = {3,5} -> 4 > K: stop at m = 2.
    # Top-up one from {1, 2, 4, 5} by |p - e|, p = (ppl - 1) / 5, e = (ent - 1) / 5:
    #   1: |0 - 0.2| = 0.2   2: |0.6 - 1| = 0.4   4: |1 - 0.4| = 0.6   5: |0.4 - 0.6| = 0.2  -> sample 4,
    #   p >= e so it prunes tokens (Q2-like).
    result = triage(ppl, ent, 0.5)
    assert idx(result.core) == [0, 3]
    assert idx(result.keep) == [0, 3, 4]
    assert idx(result.prune_tokens) == [0, 4]
    assert result.level == pytest.approx(2 / 6)
    assert result.k == 3

    # r_s = 0.7 -> K = 4: the m = 3 core {0, 3, 4, 5} fits exactly, no top-up.
    result = triage(ppl, ent, 0.7)
    assert idx(result.keep) == [0, 3, 4, 5] and idx(result.core) == [0, 3, 4, 5]
    assert idx(result.prune_tokens) == [0, 4]  # Q2_3 = {0, 4}; Q4_3 = {3, 5} keep all tokens
    assert result.level == pytest.approx(3 / 6)

    # r_s = 0.25 -> K = 1: m = 1 (empty core) is the largest level that fits; the top-up ranks all
    # six: |p - e| = 0.8, 0.2, 0.4, 0.6, 0.6, 0.2 -> sample 0, Q2-like (p = 0.8 >= e = 0).
    result = triage(ppl, ent, 0.25)
    assert idx(result.keep) == [0] and idx(result.prune_tokens) == [0] and not result.core.any()
    assert result.level == pytest.approx(1 / 6)


def test_top_up_of_a_q4_like_sample_keeps_its_tokens():
    # Three samples, K = 1, core empty (m = 1: top PPL is 2, lowest Ent is 0).
    # p = [0, 0.5, 1], e = [0, 1, 0.5]: |p - e| = [0, 0.5, 0.5]; tie between 1 and 2 -> earlier (1);
    # p < e for sample 1: a calibration-like top-up, kept whole.
    result = triage(t(1.0, 2.0, 3.0), t(0.0, 2.0, 1.0), 0.5)
    assert idx(result.keep) == [1] and not result.prune_tokens.any()


def test_single_sample_pool():
    result = triage(t(7.0), t(0.3), 0.1)
    assert idx(result.keep) == [0] and idx(result.prune_tokens) == [0]  # p = e = 0 -> Q2-like
    assert result.level == 0.0 and not result.core.any()


def test_all_equal_scores_tie_to_the_earlier_sample():
    result = triage(torch.ones(8), torch.ones(8), 0.25)
    # Equal values rank by position: "highest PPL" are the last ones, "lowest Ent" the first ones,
    # so the cores stay empty up to m = 4; the top-up (all gaps 0) takes the earliest two.
    assert idx(result.keep) == [0, 1] and idx(result.prune_tokens) == [0, 1]
    assert result.level == pytest.approx(4 / 8)


def test_nan_samples_are_not_candidates_and_inf_normalises_to_one():
    """A NaN score (no trainable token, a broken forward) takes no slot and moves no one else:
    the finite samples kept are those of the pool without it, and K counts only the others."""
    ppl = t(NAN, 1.0, INF, 2.0, 1.5, 1.2, 3.0)
    ent = t(1.0, NAN, 1.0, 1.0, 0.5, 0.7, 0.2)
    result = triage(ppl, ent, 0.5)
    without = triage(t(INF, 2.0, 1.5, 1.2, 3.0), t(1.0, 1.0, 0.5, 0.7, 0.2), 0.5)
    assert result.k == 2 == without.k  # floor(0.5 * 5), not floor(0.5 * 7)
    assert not result.keep[:2].any()
    assert torch.equal(result.keep[2:], without.keep)
    assert torch.equal(result.prune_tokens[2:], without.prune_tokens)
    assert result.level == without.level
    assert bool((result.prune_tokens <= result.keep).all())


def test_a_pool_without_any_scored_sample_keeps_nothing():
    result = triage(t(NAN, NAN), t(1.0, NAN), 0.5)
    assert result.k == 0 and not result.prune_tokens.any() and result.level == 0.0


def test_one_huge_score_does_not_flatten_the_others_in_the_top_up():
    """Min-max over the finite values only: an infinite PPL no longer maps every finite PPL to 0."""
    from qtuning_plugin.core.sample_stage import _minmax

    x = t(1.0, 3.0, INF, 2.0)
    assert _minmax(x).tolist() == [0.0, 1.0, 1.0, 0.5]
    assert _minmax(t(2.0, 2.0, INF)).tolist() == [0.0, 0.0, 1.0]


def test_sample_ratio_one_keeps_everything():
    ppl, ent = torch.rand(13, dtype=torch.float64), torch.rand(13, dtype=torch.float64)
    result = triage(ppl, ent, 1.0)
    assert bool(result.keep.all())


@pytest.mark.parametrize("bad", [0.0, 1.5, -1])
def test_bad_ratio(bad):
    with pytest.raises(ValueError, match=rf"triage: sample_ratio must be a number in \(0, 1\], got {bad!r}"):
        triage(t(1.0, 2.0), t(1.0, 2.0), bad)


def test_shape_errors():
    with pytest.raises(ValueError, match="1-D"):
        triage(t(1.0, 2.0), t(1.0), 0.5)
    with pytest.raises(ValueError, match="empty"):
        triage(t(), t(), 0.5)


def test_median_quadrants():
    q = median_quadrants(t(5.0, 1.0, 4.0, 2.0), t(1.0, 2.0, 6.0, 5.0))
    # medians (lower): PPL 2, Ent 2; high = strictly above
    assert q.tolist() == [2, 3, 1, 4]


# ---------------------------------------------------------------- properties over random pools

ratios = st.floats(min_value=1e-3, max_value=1.0, allow_nan=False)


@st.composite
def pools(draw, distinct=False, max_n=300):
    n = draw(st.integers(1, max_n))
    if distinct:
        ppl = draw(st.permutations(range(n)))
        ent = draw(st.permutations(range(n)))
    else:  # small integer range: many ties
        hi = draw(st.integers(0, 40))
        ppl = draw(st.lists(st.integers(0, hi), min_size=n, max_size=n))
        ent = draw(st.lists(st.integers(0, hi), min_size=n, max_size=n))
    return torch.tensor(ppl, dtype=torch.float64), torch.tensor(ent, dtype=torch.float64)


@settings(max_examples=300, deadline=None)
@given(pools(), ratios)
def test_exactly_k_kept_core_within_k_prune_implies_keep(pool, r):
    ppl, ent = pool
    result = triage(ppl, ent, r)
    n = ppl.numel()
    assert result.k == kept_count(n, r) == max(1, math.floor(Fraction(repr(r)) * n))
    assert int(result.core.sum()) <= result.k
    assert bool((result.prune_tokens <= result.keep).all())
    assert bool((result.core <= result.keep).all())
    assert 0.0 <= result.level <= 0.5


INCREASING = {"exp": lambda x: torch.exp(x / 7), "cube": lambda x: x**3 - 5, "log1p": torch.log1p,
              "affine": lambda x: 3 * x + 100}


@settings(max_examples=200, deadline=None)
@given(pools(), ratios, st.sampled_from(sorted(INCREASING)))
def test_rank_invariance_under_increasing_transforms(pool, r, name):
    """The core (the quantile stage) depends on ranks only. The top-up ranks by |p - e| of
    min-max normalised raw values (docs/method.md §2, step 4), which only an affine map preserves:
    so `keep` is invariant under any increasing map when no top-up is needed, and always under
    a positive affine map."""
    ppl, ent = pool
    f = INCREASING[name]
    base = triage(ppl, ent, r)
    for moved in (triage(f(ppl), ent, r), triage(ppl, f(ent), r), triage(f(ppl), f(ent), r)):
        assert torch.equal(moved.core, base.core) and moved.level == base.level
        if name == "affine" or int(base.core.sum()) == base.k:
            assert torch.equal(moved.keep, base.keep)
            assert torch.equal(moved.prune_tokens, base.prune_tokens)


def test_top_up_follows_raw_values_not_ranks():
    # Spec section 7 flags this: with one extreme PPL, min-max squashes the rest to p ~ 0, so the
    # top-up follows entropy. Same ranks, different raw gaps -> a different top-up.
    # K = 1, core empty. e = [0, 1, 0.5, 0.125].
    ent = t(0.1, 0.9, 0.5, 0.2)
    # p = [0, 1/3, 2/3, 1]: |p - e| = [0, 0.67, 0.17, 0.875] -> sample 3 (highest error)
    assert idx(triage(t(1.0, 2.0, 3.0, 4.0), ent, 0.25).keep) == [3]
    # p ~ [0, 1e-6, 2e-6, 1]: |p - e| ~ [0, 1.0, 0.5, 0.875] -> sample 1 (highest uncertainty)
    assert idx(triage(t(1.0, 2.0, 3.0, 1e6), ent, 0.25).keep) == [1]


def _quantile_sets(ppl, ent, a):
    """The paper's sets at quantile level a (numpy linear quantiles)."""
    p, e = ppl.numpy(), ent.numpy()
    q2 = (p > np.quantile(p, 1 - a)) & (e <= np.quantile(e, a))
    q4 = (p <= np.quantile(p, a)) & (e > np.quantile(e, 1 - a))
    return torch.from_numpy(q2 | q4)


@settings(max_examples=300, deadline=None)
@given(pools(distinct=True), ratios)
def test_core_equals_the_papers_quantile_sets_between_breakpoints(pool, r):
    ppl, ent = pool
    n = ppl.numel()
    result = triage(ppl, ent, r)
    m = round(result.level * n)
    if m == 0:  # even the first level holds more than K samples (or n = 1): empty core
        assert not result.core.any()
        assert n == 1 or int(_quantile_sets(ppl, ent, 0.5 / (n - 1)).sum()) > result.k
        return
    # (m - 1/2) / (n - 1) lies strictly between the breakpoints (m-1)/(n-1) and m/(n-1), where
    # "PPL above its (1-a)-quantile" is exactly "among the m highest PPL" (and so on).
    a = (m - 0.5) / (n - 1)
    assert torch.equal(result.core, _quantile_sets(ppl, ent, a))
    if m < n // 2:  # the next level no longer fits in K: the bisection would stop at m
        assert int(_quantile_sets(ppl, ent, (m + 0.5) / (n - 1)).sum()) > result.k


def _reference(ppl, ent, r):
    """A literal, loop-by-loop reading of docs/method.md §2, for cross-checking (NaN samples are
    left out of the pool; the top-up normalises over finite values, +inf -> 1)."""
    ids = [i for i in range(len(ppl)) if not (math.isnan(ppl[i]) or math.isnan(ent[i]))]
    if not ids:
        return set(), set(), 0.0
    ppl, ent = [ppl[i] for i in ids], [ent[i] for i in ids]
    n = len(ppl)
    k = max(1, math.floor(Fraction(repr(r)) * n))
    by_ppl = sorted(range(n), key=lambda i: (ppl[i], i))
    by_ent = sorted(range(n), key=lambda i: (ent[i], i))
    core2, core4, level = set(), set(), 0
    for m in range(1, n // 2 + 1):
        q2 = set(by_ppl[n - m:]) & set(by_ent[:m])
        q4 = set(by_ppl[:m]) & set(by_ent[n - m:])
        if len(q2 | q4) <= k:
            core2, core4, level = q2, q4, m

    def norm(x):
        finite = [v for v in x if v != INF]
        lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
        return [1.0 if v == INF else 0.0 if hi == lo else (v - lo) / (hi - lo) for v in x]

    p, e = norm(ppl), norm(ent)
    rest = sorted((i for i in range(n) if i not in core2 | core4), key=lambda i: (-abs(p[i] - e[i]), i))
    top = rest[: k - len(core2 | core4)]
    keep = core2 | core4 | set(top)
    prune = core2 | {i for i in top if p[i] >= e[i]}
    return {ids[i] for i in keep}, {ids[i] for i in prune}, level / n


@settings(max_examples=300, deadline=None)
@given(pools(max_n=60), ratios, st.lists(st.sampled_from([NAN, INF]), max_size=3))
def test_matches_a_literal_reference(pool, r, specials):
    ppl, ent = pool
    ppl, ent = ppl.tolist(), ent.tolist()
    for j, s in enumerate(specials):  # sprinkle NaN / inf in both axes
        ppl[(7 * j) % len(ppl)] = s
        ent[(3 * j + 1) % len(ent)] = s
    keep, prune, level = _reference(ppl, ent, r)
    result = triage(torch.tensor(ppl, dtype=torch.float64), torch.tensor(ent, dtype=torch.float64), r)
    assert set(idx(result.keep)) == keep
    assert set(idx(result.prune_tokens)) == prune
    assert result.level == pytest.approx(level)


# ---------------------------------------------------------------- pool: global (groups = ranks)

@settings(max_examples=200, deadline=None)
@given(pools(), ratios)
def test_one_group_is_the_plain_triage(pool, r):
    ppl, ent = pool
    plain = triage(ppl, ent, r)
    grouped = triage(ppl, ent, r, groups=torch.zeros(ppl.numel(), dtype=torch.long))
    assert torch.equal(plain.keep, grouped.keep) and torch.equal(plain.prune_tokens, grouped.prune_tokens)
    assert torch.equal(plain.core, grouped.core) and plain.level == grouped.level


@settings(max_examples=200, deadline=None)
@given(pools(max_n=40), ratios, st.integers(1, 4))
def test_groups_each_keep_exactly_their_k_at_one_shared_level(pool, r, n_groups):
    ppl, ent = pool
    n = ppl.numel()
    groups = torch.arange(n) % n_groups
    result = triage(ppl, ent, r, groups=groups)
    m = round(result.level * n)
    for g in range(n_groups):
        own = groups == g
        if own.any():
            assert int((result.keep & own).sum()) == kept_count(int(own.sum()), r)
            assert int((result.core & own).sum()) <= kept_count(int(own.sum()), r)
    assert not (result.prune_tokens & ~result.keep).any()
    # The level is the largest at which every group's core fits: one more and some group overflows.
    if m < n // 2:
        # core_m by hand (rank form of docs/method.md §2 over the whole pool)
        rp = torch.sort(ppl.nan_to_num(INF), stable=True).indices.argsort()
        re = torch.sort(ent.nan_to_num(INF), stable=True).indices.argsort()
        joins = torch.minimum(torch.maximum(n - rp, re + 1), torch.maximum(rp + 1, n - re))
        assert torch.equal(result.core, joins <= m)
        overflow = [int(((joins <= m + 1) & (groups == g)).sum()) > kept_count(int((groups == g).sum()), r)
                    for g in range(n_groups) if (groups == g).any()]
        assert any(overflow)


def test_a_degenerate_group_still_keeps_its_k():
    ppl = t(1.0, 1.0, 1.0, 1.0, 2.0, 9.0, 3.0, 7.0)  # group 0: four identical samples
    ent = t(0.5, 0.5, 0.5, 0.5, 0.1, 0.2, 0.9, 0.4)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    result = triage(ppl, ent, 0.5, groups=groups)
    assert int(result.keep[:4].sum()) == 2 and int(result.keep[4:].sum()) == 2


@settings(max_examples=200, deadline=None)
@given(pools(max_n=40), ratios, st.integers(0, 39), st.sampled_from(["ppl", "entropy", "both"]))
def test_one_nan_sample_changes_nothing_for_the_others(pool, r, where, axis):
    ppl, ent = pool
    n = ppl.numel()
    i = where % (n + 1)
    nan = torch.tensor([NAN], dtype=torch.float64)
    ppl2 = torch.cat([ppl[:i], nan if axis != "entropy" else t(5.0), ppl[i:]])
    ent2 = torch.cat([ent[:i], nan if axis != "ppl" else t(5.0), ent[i:]])
    plain, with_nan = triage(ppl, ent, r), triage(ppl2, ent2, r)
    others = torch.arange(n + 1) != i
    assert not with_nan.keep[i]
    assert torch.equal(with_nan.keep[others], plain.keep)
    assert torch.equal(with_nan.prune_tokens[others], plain.prune_tokens)


@settings(max_examples=500, deadline=None)
@given(st.integers(1, 999), st.integers(1, 5000))
def test_k_is_exact_for_decimal_ratios(thousandths, n):
    """K = max(1, floor(r_s n)) with r_s read as the decimal the user wrote: 0.29 x 100 = 29
    (int(0.29 * 100) is 28), 0.57 x 100 = 57 (not 56)."""
    r = thousandths / 1000
    assert kept_count(n, r) == max(1, math.floor(Fraction(thousandths, 1000) * n))


def test_k_for_the_decimal_ratios_that_floats_get_wrong():
    assert kept_count(100, 0.29) == 29 and kept_count(100, 0.57) == 57
    assert triage(torch.arange(100.0), torch.arange(100.0).flip(0), 0.29).k == 29


def test_share_of_and_ascending_ranks():
    """The two helpers the rules share with the triage: floor(ratio n) exact for the decimal
    written, and stable ascending ranks (of equal values the earlier ranks lower)."""
    assert share_of(100, 0.29) == 29 and share_of(100, 0.57) == 57 and share_of(8, 0.25) == 2
    assert share_of(0, 0.5) == 0 and share_of(7, 0.0) == 0 and share_of(3, 1.0) == 3
    assert ascending_ranks(t(3.0, 1.0, 3.0, 2.0, 1.0)).tolist() == [3, 0, 4, 2, 1]
    assert ascending_ranks(t(INF, 0.0)).tolist() == [1, 0]


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 5000), st.integers(0, 1000))
def test_share_of_is_floor_of_the_decimal(n, thousandths):
    assert share_of(n, thousandths / 1000) == math.floor(Fraction(thousandths, 1000) * n)


def test_the_triage_is_the_papers_alone():
    """The options beyond the paper are rules (tests/test_rules.py): the triage takes none of them,
    and its decision carries no exclusion mask."""
    import inspect

    assert list(inspect.signature(triage).parameters) == ["ppl", "entropy", "sample_ratio", "groups", "eligible"]
    assert [f for f in Triage.__dataclass_fields__] == ["keep", "prune_tokens", "level", "core"]


# ---------------------------------------------------------------- eligible (the rules' masks, tests/test_rules.py)

@pytest.mark.parametrize("seed", range(6))
def test_ineligible_samples_are_never_kept_and_keep_their_slot(seed):
    g = torch.Generator().manual_seed(seed)
    n = 16
    ppl, ent = torch.rand(n, generator=g, dtype=torch.float64) * 10, torch.rand(n, generator=g, dtype=torch.float64)
    assert torch.equal(triage(ppl, ent, 0.25, eligible=torch.ones(n, dtype=torch.bool)).keep,
                       triage(ppl, ent, 0.25).keep)
    eligible = torch.rand(n, generator=g) > 0.3
    eligible[:3] = False
    result = triage(ppl, ent, 0.25, eligible=eligible)
    assert not (result.keep & ~eligible).any()
    assert result.k == min(kept_count(n, 0.25), int(eligible.sum()))
    # the eligible samples are triaged among themselves, with K counted over the whole pool
    at = eligible.nonzero().squeeze(1)
    alone = triage(ppl[at], ent[at], 0.25)
    if alone.k == result.k:
        assert torch.equal(result.keep[at], alone.keep)
    # fewer eligible samples than K: all of them are kept
    few = torch.zeros(n, dtype=torch.bool)
    few[5] = True
    assert triage(ppl, ent, 0.5, eligible=few).keep.nonzero().squeeze(1).tolist() == [5]
    with pytest.raises(ValueError, match="eligible"):
        triage(ppl, ent, 0.25, eligible=torch.ones(n))


@settings(max_examples=200, deadline=None)
@given(pools(max_n=40), ratios, st.integers(1, 4), st.lists(st.booleans(), min_size=40, max_size=40))
def test_ineligible_samples_keep_their_slot_in_each_group(pool, r, n_groups, flags):
    """Each group keeps min(K_g, its eligible samples), K_g counted over all its samples, and never
    an ineligible one; with every sample eligible it is the plain triage."""
    ppl, ent = pool
    n = ppl.numel()
    groups = torch.arange(n) % n_groups
    eligible = torch.tensor(flags[:n])
    result = triage(ppl, ent, r, groups=groups, eligible=eligible)
    assert not (result.keep & ~eligible).any()
    assert bool((result.prune_tokens <= result.keep).all()) and bool((result.core <= result.keep).all())
    for g in range(n_groups):
        own = groups == g
        if own.any():
            assert int((result.keep & own).sum()) == min(kept_count(int(own.sum()), r), int((eligible & own).sum()))
    everyone = triage(ppl, ent, r, groups=groups, eligible=torch.ones(n, dtype=torch.bool))
    plain = triage(ppl, ent, r, groups=groups)
    assert torch.equal(everyone.keep, plain.keep) and torch.equal(everyone.prune_tokens, plain.prune_tokens)
