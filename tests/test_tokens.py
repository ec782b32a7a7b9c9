"""Token stage (docs/method.md §3): a row worked by hand, and properties against a literal reference."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qtuning_plugin.core import context_scores, pooled_token_keep_mask, token_keep_mask

# A 7-token row: two prompt tokens (not trainable), then five response tokens whose per-token
# perplexities are 4, 1, 3, 2, 5 (nll = log PPL).
PPL = [None, None, 4.0, 1.0, 3.0, 2.0, 5.0]
NLL = torch.tensor([[0.0, 0.0] + [math.log(p) for p in PPL[2:]]], dtype=torch.float64)
TRAINABLE = torch.tensor([[False, False, True, True, True, True, True]])


def kept(mask):
    return mask[0].nonzero().squeeze(1).tolist()


@pytest.mark.parametrize(
    "lam, scores, keep",
    [
        # s_i = (1 - lam) PPL_i + lam (PPL_{i-1} + PPL_{i+1}); the prompt neighbour of position 2
        # and the end of the row beside position 6 contribute 0.
        (0.0, [4, 1, 3, 2, 5], [3, 5]),            # lowest two: 1 (pos 3), 2 (pos 5)
        (0.5, [2.5, 4, 3, 5, 3.5], [2, 4]),        # 0.5*4 + 0.5*(0+1) = 2.5; 0.5*1 + 0.5*(4+3) = 4; ...
        (1.0, [1, 7, 3, 8, 2], [2, 6]),            # neighbours only: 0+1, 4+3, 1+2, 3+5, 2+0
    ],
)
def test_seven_token_row_by_hand(lam, scores, keep):
    s = context_scores(NLL, TRAINABLE, lam)[0, 2:]
    torch.testing.assert_close(s, torch.tensor(scores, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # r_t = 0.4 of 5 tokens -> k = ceil(2) = 2
    assert kept(token_keep_mask(NLL, TRAINABLE, 0.4, lam)) == keep


def test_k_uses_the_ceil_tolerance():
    nll = torch.zeros(1, 11)
    trainable = torch.ones(1, 11, dtype=torch.bool)
    trainable[0, 0] = False  # 10 trainable
    assert int(token_keep_mask(nll, trainable, 0.7).sum()) == 7  # 0.7 * 10 = 7.000000000000001
    assert int(token_keep_mask(nll, trainable, 0.71).sum()) == 8
    assert int(token_keep_mask(nll, trainable, 0.01).sum()) == 1
    assert int(token_keep_mask(nll, trainable, 1.0).sum()) == 10


def test_ties_go_to_the_earlier_position():
    nll = torch.full((1, 8), 0.3)
    trainable = torch.ones(1, 8, dtype=torch.bool)
    assert kept(token_keep_mask(nll, trainable, 0.5, 0.0)) == [0, 1, 2, 3]
    # lam = 0.5: both ends have one neighbour fewer, so they score lowest; then the earliest.
    assert kept(token_keep_mask(nll, trainable, 0.5, 0.5)) == [0, 1, 2, 7]


def test_large_and_broken_nll_stay_finite():
    nll = torch.tensor([[0.0, 1e4, 5.0, 1e4, 2.0, float("inf"), 800.0, float("nan"), 0.1]])
    trainable = torch.ones_like(nll, dtype=torch.bool)
    s = context_scores(nll, trainable, 0.5)
    assert bool(torch.isfinite(s).all())
    assert kept(token_keep_mask(nll, trainable, 0.3, 0.0)) == [0, 4, 8]  # k = 3: nll 0, 2, 0.1


def test_rows_without_trainable_tokens_and_padding():
    nll = torch.rand(3, 6)
    trainable = torch.tensor([[0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    mask = token_keep_mask(nll, trainable, 0.5)
    assert not mask[0].any()
    assert mask.sum(1).tolist() == [0, 2, 2]
    assert bool((mask <= trainable).all())


def test_argument_errors():
    with pytest.raises(ValueError, match="token_ratio"):
        token_keep_mask(NLL, TRAINABLE, 0.0)
    with pytest.raises(ValueError, match="neighbor_lambda"):
        token_keep_mask(NLL, TRAINABLE, 0.5, 1.5)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        token_keep_mask(NLL[0], TRAINABLE[0], 0.5)


# ---------------------------------------------------------------- against a literal reference

def _reference_row(nll, trainable, r, lam):
    n = len(nll)
    ppl = [math.exp(min(x, 700.0)) if m else 0.0 for x, m in zip(nll, trainable)]
    score = {
        i: (1 - lam) * ppl[i] + lam * ((ppl[i - 1] if i > 0 else 0.0) + (ppl[i + 1] if i + 1 < n else 0.0))
        for i in range(n) if trainable[i]
    }
    k = math.ceil(r * len(score) - 1e-9)
    return set(sorted(score, key=lambda i: (score[i], i))[:k])


@st.composite
def rows(draw):
    b = draw(st.integers(1, 4))
    t = draw(st.integers(1, 40))
    # quantised nll: plenty of ties between positions
    nll = draw(st.lists(st.lists(st.sampled_from([0.0, 0.1, 0.5, 1.0, 2.0, 3.0, 8.0, 30.0]),
                                 min_size=t, max_size=t), min_size=b, max_size=b))
    trainable = draw(st.lists(st.lists(st.booleans(), min_size=t, max_size=t), min_size=b, max_size=b))
    return torch.tensor(nll), torch.tensor(trainable)


@settings(max_examples=400, deadline=None)
@given(rows(), st.floats(1e-3, 1.0), st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]))
def test_matches_reference_and_keeps_exactly_k(data, r, lam):
    nll, trainable = data
    mask = token_keep_mask(nll, trainable, r, lam)
    assert bool((mask <= trainable).all())
    for b in range(nll.shape[0]):
        want = _reference_row(nll[b].tolist(), trainable[b].tolist(), r, lam)
        assert set(mask[b].nonzero().squeeze(1).tolist()) == want
        assert int(mask[b].sum()) == math.ceil(r * int(trainable[b].sum()) - 1e-9)


def test_pooled_budget_drops_the_highest_scores_across_batches():
    nll_a = torch.log(torch.tensor([[1.0, 9.0, 2.0], [3.0, 1.0, 1.0]]))
    nll_b = torch.log(torch.tensor([[5.0, 4.0, 1.0, 1.0]]))
    tr_a = torch.tensor([[1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    tr_b = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    # lam = 0: scores are the PPLs 1, 9, 2 | 5, 4: dropping 3 removes 9, 5, 4.
    a, b = pooled_token_keep_mask([nll_a, nll_b], [tr_a, tr_b], 3, 0.0)
    assert a.tolist() == [[True, False, True], [False, False, False]]
    assert b.tolist() == [[False, False, False, False]]
    a, b = pooled_token_keep_mask([nll_a, nll_b], [tr_a, tr_b], 0, 0.0)
    assert torch.equal(a, tr_a) and torch.equal(b, tr_b)
    a, b = pooled_token_keep_mask([nll_a, nll_b], [tr_a, tr_b], 99, 0.0)
    assert not a.any() and not b.any()


# ---------------------------------------------------------------- keep_tokens="highest" (beyond the paper)

@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 8.0), min_size=1, max_size=30), st.floats(0.05, 1.0), st.floats(0.0, 1.0))
def test_keep_highest_keeps_the_complement_order(nlls, r, lam):
    """keep="highest" keeps the k highest context scores, ties to the earlier position."""
    nll = torch.tensor([nlls], dtype=torch.float32)
    trainable = torch.ones_like(nll, dtype=torch.bool)
    got = token_keep_mask(nll, trainable, r, lam, keep="highest")[0]
    s = context_scores(nll, trainable, lam)[0].tolist()
    k = math.ceil(r * len(nlls) - 1e-9)
    want = sorted(range(len(nlls)), key=lambda i: (-s[i], i))[:k]
    assert sorted(got.nonzero().squeeze(1).tolist()) == sorted(want)


def test_pooled_keep_highest_drops_the_lowest():
    nll = [torch.tensor([[0.1, 3.0, 0.2, 2.0]])]
    trainable = [torch.tensor([[True, True, True, True]])]
    assert pooled_token_keep_mask(nll, trainable, 2, 0.0, keep="highest")[0].tolist() == [[False, True, False, True]]
    assert pooled_token_keep_mask(nll, trainable, 2, 0.0)[0].tolist() == [[True, False, True, False]]
    with pytest.raises(ValueError, match=r"token_keep_mask: keep must be one of \['lowest', 'highest'\], got 'top'"):
        token_keep_mask(nll[0], trainable[0], 0.5, keep="top")


def test_pooled_budget_takes_the_candidate_count_from_the_caller():
    """``n_candidates``: the trainable tokens' count, when the caller has it on the host (no
    device-to-host copy); the same masks as counted here."""
    g = torch.Generator().manual_seed(0)
    nll = [torch.rand(3, 7, generator=g) * 4, torch.rand(2, 5, generator=g) * 4]
    trainable = [torch.rand(3, 7, generator=g) > 0.3, torch.rand(2, 5, generator=g) > 0.3]
    total = sum(int(m.sum()) for m in trainable)
    for n_drop in (0, 1, 5, total, total + 3):
        for keep in ("lowest", "highest"):
            counted = pooled_token_keep_mask(nll, trainable, n_drop, 0.5, keep)
            given = pooled_token_keep_mask(nll, trainable, n_drop, 0.5, keep, n_candidates=total)
            assert all(torch.equal(a, b) for a, b in zip(counted, given))
            assert sum(int(m.sum()) for m in given) == max(0, total - n_drop)
    with pytest.raises(TypeError):
        pooled_token_keep_mask(nll, trainable, 1, 0.5, "lowest", total)  # keyword only


def test_token_keep_mask_has_no_avoid_argument():
    """The reference guard flags samples, not tokens (reference_tokens is retired)."""
    with pytest.raises(TypeError):
        token_keep_mask(NLL, TRAINABLE, 0.4, 0.5, "lowest", torch.zeros_like(TRAINABLE))
    with pytest.raises(TypeError):
        token_keep_mask(NLL, TRAINABLE, 0.4, avoid=torch.zeros_like(TRAINABLE))
