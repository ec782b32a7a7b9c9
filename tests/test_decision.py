import math

import pytest
import torch

from qtuning_plugin.core import QTuningConfig, apply_decision, decide, score_batch, token_keep_mask, triage
from tiny import padded_batch, tiny_model


def pool():
    model = tiny_model("llama")
    batches = [padded_batch([12, 7, 20, 9], [4, 2, 5, 3], seed=1),
               padded_batch([6, 15, 11, 8], [1, 4, 3, 2], seed=2, padding_side="left")]
    return model, batches, [score_batch(model, b) for b in batches]


def test_decide_combines_both_stages_over_the_pool():
    model, batches, scores = pool()
    cfg = QTuningConfig(sample_ratio=0.5, token_ratio=0.5)
    d = decide(scores, cfg)
    want = triage(torch.cat([s.ppl for s in scores]), torch.cat([s.entropy for s in scores]), 0.5)
    assert torch.equal(torch.cat(d.keep), want.keep) and int(torch.cat(d.keep).sum()) == 4
    prune = list(want.prune_tokens.split([4, 4]))
    for s, k, p, tk in zip(scores, d.keep, prune, d.token_keep):
        assert not tk[~k].any()  # dropped rows keep nothing
        q4 = k & ~p
        assert torch.equal(tk[q4], s.trainable[q4])  # calibration rows keep every token
        mask = token_keep_mask(s.nll, s.trainable, 0.5, 0.5)
        assert torch.equal(tk[p], mask[p])  # misconception rows: ceil(r_t |T|) tokens
        for row in p.nonzero().squeeze(1).tolist():
            assert int(tk[row].sum()) == math.ceil(0.5 * int(s.trainable[row].sum()))
    # and the decision applies to each batch
    for b, k, tk in zip(batches, d.keep, d.token_keep):
        if k.any():
            out = apply_decision(b, k, tk)
            assert int((out["labels"] != -100).sum()) == int(tk.sum())


def test_token_ratio_one_keeps_every_token_of_kept_rows():
    _, _, scores = pool()
    d = decide(scores, QTuningConfig(sample_ratio=0.25, token_ratio=1))
    for s, k, tk in zip(scores, d.keep, d.token_keep):
        assert torch.equal(tk, s.trainable & k[:, None])


def test_batch_budget_is_the_authors_rule():
    _, _, scores = pool()
    cfg = QTuningConfig(sample_ratio=0.5, token_ratio=0.5, token_budget="batch")
    d = decide(scores, cfg)
    n_pool = sum(int(s.input_tokens.sum()) for s in scores)
    kept_inputs = sum(int(s.input_tokens[k].sum()) for s, k in zip(scores, d.keep))
    n_drop = max(0, kept_inputs - round(0.5 * 0.5 * n_pool))
    prune = list(d.triage.prune_tokens.split([4, 4]))
    candidates = sum(int(s.trainable[p].sum()) for s, p in zip(scores, prune))
    dropped = sum(int((s.trainable & k[:, None] & ~tk).sum()) for s, k, tk in zip(scores, d.keep, d.token_keep))
    assert dropped == min(n_drop, candidates) and dropped > 0
    # only Q2 rows lose tokens
    for s, k, p, tk in zip(scores, d.keep, prune, d.token_keep):
        q4 = k & ~p
        assert torch.equal(tk[q4], s.trainable[q4])


@pytest.mark.parametrize("budget", ["sample", "batch"])
def test_a_row_without_label_tokens_changes_nothing(budget):
    """A row whose answer was truncated away is not a sample: the pool with it decides exactly as
    the pool without it (K, kept rows, kept tokens, the batch budget)."""
    model, batches, scores = pool()
    cfg = QTuningConfig(sample_ratio=0.5, token_ratio=0.5, token_budget=budget)
    without = decide(scores, cfg)
    empty = padded_batch([40], [40], seed=3)  # every label masked (long enough to move the batch budget)
    with_it = decide(scores + [score_batch(model, empty)], cfg)
    assert not with_it.keep[2].any() and not with_it.token_keep[2].any()
    for a, b in zip(without.keep + without.token_keep, with_it.keep[:2] + with_it.token_keep[:2]):
        assert torch.equal(a, b)


def test_options_beyond_the_paper_reach_both_stages():
    _, _, scores = pool()
    cfg = QTuningConfig(sample_ratio=0.5, token_ratio=0.5, top_up="rank", keep_tokens="highest")
    d = decide(scores, cfg)
    want = triage(torch.cat([s.ppl for s in scores]), torch.cat([s.entropy for s in scores]), 0.5, top_up="rank")
    assert torch.equal(torch.cat(d.keep), want.keep)
    for s, p, tk in zip(scores, want.prune_tokens.split([4, 4]), d.token_keep):
        mask = token_keep_mask(s.nll, s.trainable, 0.5, 0.5, keep="highest")
        assert torch.equal(tk[p], mask[p])
