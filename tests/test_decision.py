import json
import math
import pathlib
import sys

import pytest
import torch

from qtuning_plugin.core import (QTuningConfig, apply_decision, decide, decide_step, host_stats, score_batch,
                                 token_keep_mask, triage)
from qtuning_plugin.core.rules import Pool
from qtuning_plugin.core.rules.small_loss import DropHighestPPL
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
    cfg = QTuningConfig(sample_ratio=0.5, token_ratio=0.5, keep_tokens="highest")
    d = decide(scores, cfg)
    want = triage(torch.cat([s.ppl for s in scores]), torch.cat([s.entropy for s in scores]), 0.5)
    assert torch.equal(torch.cat(d.keep), want.keep)
    for s, p, tk in zip(scores, want.prune_tokens.split([4, 4]), d.token_keep):
        mask = token_keep_mask(s.nll, s.trainable, 0.5, 0.5, keep="highest")
        assert torch.equal(tk[p], mask[p])


# ---------------------------------------------------------------- host and device, kept tokens

CONFIGS = [dict(sample_ratio=0.5, token_ratio=0.5), dict(sample_ratio=0.25, token_ratio=1),
           dict(sample_ratio=0.5, token_ratio=0.3, token_budget="batch"), dict(sample_ratio=1, token_ratio=0.5),
           dict(sample_ratio=0.5, token_ratio=0.5, keep_tokens="highest", token_budget="batch")]


@pytest.mark.parametrize("fields", CONFIGS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_kept_tokens_is_the_host_count_of_the_token_masks(fields):
    """The triage runs on the host, the token stage on the scores' device; ``kept_tokens`` is
    counted on the host and equals the masks' sum."""
    _, _, scores = pool()
    d = decide(scores, QTuningConfig(**fields))
    assert isinstance(d.kept_tokens, int)
    assert d.kept_tokens == sum(int(tk.sum()) for tk in d.token_keep) > 0
    assert all(k.device.type == "cpu" and k.dtype == torch.bool for k in d.keep)
    assert d.triage.keep.device.type == "cpu"
    assert all(tk.device == s.nll.device and tk.shape == s.trainable.shape for tk, s in zip(d.token_keep, scores))
    # the host statistics, given, decide the same as copied here
    given = decide(scores, QTuningConfig(**fields), host=host_stats(scores))
    assert given.kept_tokens == d.kept_tokens
    assert all(torch.equal(a, b) for a, b in zip(d.keep + d.token_keep, given.keep + given.token_keep))


def test_host_stats_is_one_copy_of_the_pools_numbers():
    _, _, scores = pool()
    host = host_stats(scores, {"f": torch.arange(8.0)})
    assert torch.equal(host.ppl, torch.cat([s.ppl for s in scores]).double())
    assert torch.equal(host.entropy, torch.cat([s.entropy for s in scores]).double())
    assert host.n_tokens.tolist() == torch.cat([s.trainable.sum(1) for s in scores]).tolist()
    assert host.input_tokens.tolist() == torch.cat([s.input_tokens for s in scores]).tolist()
    assert host.features["f"].tolist() == list(range(8))
    assert all(x.device.type == "cpu" and x.dtype == torch.float64
               for x in (host.ppl, host.entropy, host.n_tokens, host.input_tokens, host.features["f"]))
    sub = host.subset(slice(4, 8))
    assert sub.ppl.numel() == 4 and sub.features["f"].tolist() == [4.0, 5.0, 6.0, 7.0]


def test_a_rules_mask_reaches_decide_as_eligible():
    """decide_step with the small-loss rule decides as decide with the rule's mask as ``eligible``."""
    _, _, scores = pool()
    cfg = QTuningConfig(sample_ratio=0.5, token_ratio=0.5, drop_highest_ppl=0.25)
    host = host_stats(scores)
    mask = DropHighestPPL(cfg).exclude(Pool(host.ppl, host.entropy))
    assert int(mask.sum()) == 2
    d = decide(scores, cfg, eligible=~mask)
    step = decide_step(scores, cfg)
    assert torch.equal(step.excluded, mask) and step.kept_tokens == d.kept_tokens
    assert all(torch.equal(a, b) for a, b in zip(step.keep + step.token_keep, d.keep + d.token_keep))
    assert not (torch.cat(d.keep) & mask).any() and int(torch.cat(d.keep).sum()) == 4


# ---------------------------------------------------------------- every retained configuration (the fixture)

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def recorded():
    sys.path.insert(0, str(FIXTURES))
    try:
        from record_decisions import load_pool
    finally:
        sys.path.remove(str(FIXTURES))
    data = json.loads((FIXTURES / "decisions.json").read_text())
    return data["configs"], [load_pool(entry) for entry in data["pools"]]


def test_kept_tokens_equals_the_token_masks_for_every_retained_configuration(recorded):
    """decide_step's host count of kept label tokens is the sum of its token masks, on every
    recorded pool (NaN rows, ties, +inf among them) and every retained configuration."""
    configs, pools = recorded
    assert len(configs) >= 17 and len(pools) >= 34
    for name, fields in configs.items():
        cfg = QTuningConfig.from_dict(fields)
        for i, (scores, refs) in enumerate(pools):
            d = decide_step(scores, cfg, refs if cfg.reference == "base" else None)
            assert isinstance(d.kept_tokens, int), name
            assert d.kept_tokens == sum(int(tk.sum()) for tk in d.token_keep), f"pool {i} ({name})"
            assert all(not (tk & ~s.trainable).any() for tk, s in zip(d.token_keep, scores)), f"pool {i} ({name})"
