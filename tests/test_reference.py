"""The reference guard (``reference="base"``, an option beyond the paper): the base model's NLL
with the adapters off, cached by content; the rising-token rule; its place in the triage."""

import copy
import tempfile

import datasets
import pytest
import torch

from qtuning_plugin import QTuning, QTuningConfig
from qtuning_plugin.core import Scores, decide, kept_count, score_batch, scoring_mode, triage
from qtuning_plugin.core.reference import (ReferenceCache, adapter_switch, excess, rising_samples, rising_tokens,
                                            row_keys)
from qtuning_plugin.core.scoring import trainable_positions
from tiny import arithmetic_dataset, padded_batch, tiny_model, tiny_tokenizer

peft = pytest.importorskip("peft")


def lora_model(seed=0, vocab_size=128):
    """A tiny Llama with LoRA adapters whose B is not zero (so the adapters change the output), and
    a copy of the base model taken before the adapters were added."""
    base = tiny_model("llama", seed=seed, vocab_size=vocab_size)
    frozen = copy.deepcopy(base)
    torch.manual_seed(seed + 1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                             task_type="CAUSAL_LM")
    return peft.get_peft_model(base, config), frozen


def make_scores(nll_rows, n_cols=6):
    """Scores whose rows hold the given per-token NLLs at columns 1.. (column 0 never trains)."""
    b = len(nll_rows)
    nll = torch.zeros(b, n_cols)
    trainable = torch.zeros(b, n_cols, dtype=torch.bool)
    for i, row in enumerate(nll_rows):
        nll[i, 1:1 + len(row)] = torch.tensor(row, dtype=torch.float32)
        trainable[i, 1:1 + len(row)] = True
    count = trainable.sum(1).double()
    mean = nll.double().sum(1) / count
    return Scores(ppl=mean.exp(), entropy=torch.full((b,), 0.5, dtype=torch.float64), nll=nll,
                  token_entropy=torch.zeros_like(nll), trainable=trainable, input_tokens=trainable.sum(1) + 1)


def test_row_keys_depend_on_content_not_padding():
    right = padded_batch([7, 5, 9], [2, 2, 3], padding_side="right")
    left = padded_batch([7, 5, 9], [2, 2, 3], padding_side="left")
    keys_r = row_keys(right, trainable_positions(right["labels"], attention_mask=right["attention_mask"]))
    keys_l = row_keys(left, trainable_positions(left["labels"], attention_mask=left["attention_mask"]))
    assert keys_r == keys_l and len(set(keys_r)) == 3
    # the same row alone in a batch of its own length
    alone = {k: v[1:2, :5] for k, v in right.items()}
    assert row_keys(alone, trainable_positions(alone["labels"], attention_mask=alone["attention_mask"])) == keys_r[1:2]
    # the same tokens with another prompt / response split are another sample
    other = {k: v.clone() for k, v in right.items()}
    other["labels"][0, 2] = -100
    assert row_keys(other, trainable_positions(other["labels"], attention_mask=other["attention_mask"]))[0] != keys_r[0]


def test_the_cache_holds_the_base_models_nll_and_scores_each_sample_once():
    model, base = lora_model()
    batch = padded_batch([9, 6, 8, 7], [3, 2, 4, 3], seed=3)
    with scoring_mode(model):
        trained = score_batch(model, batch)
        keys = row_keys(batch, trained.trainable)
        cache = ReferenceCache()
        assert cache.missing(keys)
        cache.fill(model, batch, keys, chunk_size=256)
    want = score_batch(base, batch)
    got = cache.lookup(trained, keys)
    t = want.trainable
    assert torch.allclose(got[t], want.nll[t], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(trained.nll[t], want.nll[t], atol=1e-3)  # the adapters do change the NLL
    assert torch.isnan(got[~t]).all()
    assert not cache.missing(keys) and len(cache) == 4 and cache.forwards == 1
    # the adapters are back on after the reference forward
    with scoring_mode(model):
        again = score_batch(model, batch)
    assert torch.equal(again.nll, trained.nll)


def test_no_adapter_no_reference():
    assert adapter_switch(tiny_model()) is None
    model, _ = lora_model()
    assert adapter_switch(model) is not None
    batch = padded_batch([5], [2])
    with pytest.raises(ValueError, match="PEFT"):
        ReferenceCache().fill(tiny_model(), batch, ["k"], chunk_size=256)


def test_rising_samples_flags_a_risen_token_only_once_the_pool_fell():
    current = make_scores([[0.5, 0.5, 3.0], [0.2, 0.3], [0.4, 0.4, 0.4], [0.1, 0.9], [0.3, 0.3]])
    # the pool fell: most samples are below their base (by 1 nat per token); sample 0's last token
    # rose by 2.0 nats, sample 3's last token by 0.6
    base = make_scores([[1.5, 1.5, 1.0], [1.2, 1.3], [1.4, 1.4, 1.4], [1.1, 0.3], [1.3, 1.3]]).nll
    largest, mean = excess([current], [base])
    assert largest.tolist() == pytest.approx([2.0, -1.0, -1.0, 0.6, -1.0], abs=1e-6)
    assert mean[1].item() == pytest.approx(-1.0)
    # flagged: a rise above the pool's median rise (-1.0) by more than the margin
    flagged = rising_samples([current], [base], margin=2.0)
    assert flagged.tolist() == [True, False, False, False, False]
    assert rising_samples([current], [base], margin=1.0).tolist() == [True, False, False, True, False]
    assert not rising_samples([current], [base], margin=3.5).any()
    # the rule is relative to the pool: the same rises on top of a pool whose rises are all larger
    shifted = base.clone()
    for row, last in ((1, 2), (2, 3), (3, 2), (4, 2)):
        shifted[row, last] -= 1.0  # everyone but sample 0 has a token that rose one nat more...
    assert bool(excess([current], [shifted])[1].median() < 0)  # ...and the pool still fell
    assert rising_samples([current], [shifted], margin=2.0).tolist() == [False] * 5
    assert rising_samples([current], [shifted], margin=1.5).tolist() == [True, False, False, True, False]
    # the pool has not improved on the base yet (its median excess is not below 0): nothing flagged
    assert not rising_samples([current], [current.nll - 0.0], margin=0.1).any()
    # a sample without a reference is never flagged, and neither is a row without a label token
    partial = base.clone()
    partial[0] = float("nan")
    assert rising_samples([current], [partial], margin=1.0).tolist() == [False, False, False, True, False]
    split = rising_samples([make_scores([[0.5, 0.5, 3.0], [0.2, 0.3]]),
                            make_scores([[0.4, 0.4, 0.4], [0.1, 0.9], [0.3, 0.3]])],
                           [base[:2], base[2:]], margin=2.0)
    assert split.tolist() == flagged.tolist()  # the pool spans micro-batches


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
    idx = eligible.nonzero().squeeze(1)
    alone = triage(ppl[idx], ent[idx], 0.25)
    if alone.k == result.k:
        assert torch.equal(result.keep[idx], alone.keep)
    # fewer eligible samples than K: all of them are kept
    few = torch.zeros(n, dtype=torch.bool)
    few[5] = True
    assert triage(ppl, ent, 0.5, eligible=few).keep.nonzero().squeeze(1).tolist() == [5]
    with pytest.raises(ValueError, match="eligible"):
        triage(ppl, ent, 0.25, eligible=torch.ones(n))


def test_decide_passes_eligibility_to_the_sample_stage():
    scores = [make_scores([[3.0, 2.0], [0.1, 0.2], [2.5, 2.4], [0.3, 0.1]]),
              make_scores([[1.0, 1.0], [2.0, 0.2], [0.1, 0.1], [4.0, 3.0]])]
    config = QTuningConfig(sample_ratio=0.5, token_ratio=1.0)
    plain = decide(scores, config)
    banned = torch.cat(plain.keep).clone()
    guarded = decide(scores, config, eligible=~banned)
    kept = torch.cat(guarded.keep)
    assert int(kept.sum()) == int(banned.sum()) == 4
    assert not (kept & banned).any()


def test_callback_does_not_keep_a_rising_sample():
    model, _ = lora_model()
    callback = QTuning(sample_ratio=0.5, token_ratio=1.0, reference="base", reference_margin=1.0)
    batch = padded_batch([8, 7, 9, 6, 8, 7, 9, 6], [2] * 8, seed=5)
    with scoring_mode(model):
        scores = [score_batch(model, batch)]
    plain_keep = callback._decide(scores).keep[0]
    victim = int(plain_keep.nonzero()[0])
    reference = scores[0].nll + 1.0  # the pool fell by one nat per token...
    row = scores[0].trainable[victim].nonzero()[-1]
    reference[victim, row] = scores[0].nll[victim, row] - 1.5  # ...but one token of the victim rose
    decision = callback._decide(scores, [reference.masked_fill(~scores[0].trainable, float("nan"))])
    keep = decision.keep[0]
    assert int(keep.sum()) == int(plain_keep.sum()) == 4
    assert not keep[victim]
    assert decision.suspects.tolist() == [i == victim for i in range(8)]


def sft_trainer(callbacks, model, steps=4, n=16, bs=4, ga=2):
    trl = pytest.importorskip("trl")
    tok = tiny_tokenizer()
    args = trl.SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                         max_steps=steps, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, seed=0,
                         bf16=False, dataloader_drop_last=True, learning_rate=5e-3, lr_scheduler_type="constant")
    ds = datasets.Dataset.from_list(arithmetic_dataset(n))
    return trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=callbacks)


def test_reference_forwards_only_at_first_sight_over_epochs(tmp_path):
    from qtuning_plugin.decision_log import read_log

    tok = tiny_tokenizer()
    model, _ = lora_model(vocab_size=len(tok))
    callback = QTuning(sample_ratio=0.25, token_ratio=0.5, reference="base", log_decisions=str(tmp_path / "d.jsonl"))
    trainer = sft_trainer([callback], model, steps=4)  # 4 steps x 8 rows = 2 epochs of 16 samples
    trainer.train()
    cache = callback._reference
    assert len(cache) == 16
    assert cache.forwards == 4  # the 4 micro-batches of the first epoch; none in the second
    logged = [h for h in trainer.state.log_history if "qtuning/suspected_samples" in h]
    assert len(logged) == 4
    assert callback.totals["suspected_samples"] == sum(h["qtuning/suspected_samples"] for h in logged)
    # the decision log marks the suspects (field "suspect"), step by step; none is kept
    rows = read_log(tmp_path / "d.jsonl")
    assert [sum(r["suspect"] for r in rows if r["step"] == s) for s in (1, 2, 3, 4)] == \
        [h["qtuning/suspected_samples"] for h in logged]
    assert not any(r["suspect"] and r["kept"] for r in rows) and "excluded" not in rows[0]
    assert [r["suspect"] for r in rows if r["step"] == 4] == callback.last_pool["suspect"].tolist()


def test_every_rank_runs_the_reference_forwards_any_rank_needs(monkeypatch):
    """The micro-batches that get a reference forward come from an all-reduce (max) over ranks:
    here the 'other rank' needs every micro-batch of every step, so this process runs them all
    even in its second epoch, when its own rows are cached."""
    from qtuning_plugin.core.distributed import Collectives

    calls = []

    def fake_all_reduce_max(self, values):
        calls.append(list(values))
        return [1] * len(values) if len(values) == 2 else list(values)

    monkeypatch.setattr(Collectives, "all_reduce_max", fake_all_reduce_max)
    tok = tiny_tokenizer()
    model, _ = lora_model(vocab_size=len(tok))
    callback = QTuning(sample_ratio=0.25, token_ratio=0.5, reference="base")
    sft_trainer([callback], model, steps=4).train()
    assert callback._reference.forwards == 8
    assert [c for c in calls if len(c) == 2 and c != [1, 1]]  # this process alone needed fewer


def test_reference_needs_adapters():
    tok = tiny_tokenizer()
    trainer = sft_trainer([], tiny_model("llama", vocab_size=len(tok)), steps=1)
    with pytest.raises(ValueError, match="reference='none'"):
        QTuning(reference="base").attach(trainer)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "1", True])
def test_reference_margin_is_validated(bad):
    with pytest.raises(ValueError, match="reference_margin"):
        QTuningConfig(reference_margin=bad)
    with pytest.raises(ValueError, match=r"reference must be one of \['none', 'base'\]"):
        QTuningConfig(reference="initial")
    assert QTuningConfig.from_dict({"reference": "base", "reference_margin": 2}).reference_margin == 2.0


def test_spread_raises_the_threshold_by_the_pools_median_absolute_deviation():
    # every sample: two tokens fell one nat below the base, one rose by r (the pool fell overall)
    rises = [0.0, 0.4, 0.8, 1.2, 3.0]  # median 0.8, median absolute deviation 0.4
    current = make_scores([[0.5, 0.5, 2.0]] * 5)
    base = make_scores([[1.5, 1.5, 2.0 - r] for r in rises]).nll
    assert excess([current], [base])[0].tolist() == pytest.approx(rises, abs=1e-6)
    # margin alone (spread 0, the first rule): above 0.8 + 0.3
    assert rising_samples([current], [base], margin=0.3).tolist() == [False, False, False, True, True]
    assert rising_samples([current], [base], margin=0.3, spread=0.0).tolist() == [False, False, False, True, True]
    # plus two deviations: above 0.8 + 0.3 + 0.8 = 1.9
    assert rising_samples([current], [base], margin=0.3, spread=2.0).tolist() == [False, False, False, False, True]
    # plus six: above 3.5, nothing
    assert not rising_samples([current], [base], margin=0.3, spread=6.0).any()


def test_sticky_flags_a_sample_again_after_its_rise_is_gone():
    from qtuning_plugin.core import select_step

    model, _ = lora_model()
    batch = padded_batch([8, 7, 9, 6, 8, 7, 9, 6], [2] * 8, seed=5)
    with scoring_mode(model):
        current = score_batch(model, batch)
    keys = row_keys(batch, current.trainable)
    plain = QTuningConfig(sample_ratio=0.5, token_ratio=1.0)
    plain_keep = select_step(model, [batch], plain).decision.keep[0]
    victim = int(plain_keep.nonzero()[0])
    last = int(current.trainable[victim].nonzero()[-1])

    def cache_with(rise):
        """A cache in which the pool fell one nat per token and the victim's last token rose by ``rise``."""
        cache = ReferenceCache()
        for row, key in enumerate(keys):
            ref = current.nll[row] + 1.0
            if row == victim:
                ref[last] = current.nll[row, last] - rise
            cache.nll[key] = ref[current.trainable[row]].float().clone()
        return cache

    for sticky in (False, True):
        config = plain.replace(reference="base", reference_margin=1.0, reference_sticky=sticky)
        cache = cache_with(rise=1.5)
        first = select_step(model, [batch], config, reference=cache).decision
        assert first.suspects.tolist() == [i == victim for i in range(8)]
        assert not first.keep[0][victim]
        assert cache.suspected == ({keys[victim]} if sticky else set())
        cache.nll.update(cache_with(rise=-1.0).nll)  # the rise is gone at the next sighting
        second = select_step(model, [batch], config, reference=cache).decision
        assert second.suspects.tolist() == [sticky and i == victim for i in range(8)]
        assert bool(second.keep[0][victim]) is not sticky
        assert cache.forwards == 0  # every row was cached: no reference forward


def test_sticky_flags_reach_every_rank():
    """A distributed sampler deals a sample to another rank at its next sighting, so each step's
    newly flagged keys are gathered from every rank into every rank's cache (stand-in: rank 1
    flagged one key; this process flags the victim)."""
    from qtuning_plugin.core import select_step

    class TwoRanks:
        world_size, rank = 2, 0
        gathered = []

        def all_reduce_max(self, values):
            return list(values)

        def all_gather(self, value):
            self.gathered.append(value)
            return [value, ["rank-1-key"]]

    model, _ = lora_model()
    batch = padded_batch([8, 7, 9, 6, 8, 7, 9, 6], [2] * 8, seed=5)
    with scoring_mode(model):
        current = score_batch(model, batch)
    keys = row_keys(batch, current.trainable)
    cache = ReferenceCache()
    for row, key in enumerate(keys):
        ref = current.nll[row] + 1.0
        if row == 2:
            ref[int(current.trainable[row].nonzero()[-1])] -= 2.5  # rose by 1.5
        cache.nll[key] = ref[current.trainable[row]].float().clone()
    config = QTuningConfig(sample_ratio=0.5, token_ratio=1.0, reference="base", reference_margin=1.0,
                           reference_sticky=True)
    collectives = TwoRanks()
    select_step(model, [batch], config, reference=cache, collectives=collectives)
    assert collectives.gathered == [[keys[2]]]
    assert cache.suspected == {keys[2], "rank-1-key"}
    select_step(model, [batch], config, reference=cache, collectives=collectives)
    assert collectives.gathered[-1] == []  # known already: not sent again, but the gather still runs


def test_sticky_suspects_are_saved_and_restored():
    from types import SimpleNamespace

    callback = QTuning(reference="base", reference_sticky=True)
    callback._reference.suspected.update({"b" * 24, "a" * 24})
    saved = callback.state()
    assert saved["attributes"]["reference_suspects"] == ["a" * 24, "b" * 24]
    resumed = QTuning(reference="base", reference_sticky=True)
    resumed._restore_from(SimpleNamespace(global_step=3, stateful_callbacks={"QTuning": saved}))
    assert resumed._reference.suspected == {"a" * 24, "b" * 24}
    # not sticky: nothing saved, nothing restored
    assert "reference_suspects" not in QTuning(reference="base").state()["attributes"]
    other = QTuning(reference="base")
    other._restore_from(SimpleNamespace(global_step=3, stateful_callbacks={"QTuning": saved}))
    assert not other._reference.suspected


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "2", True])
def test_reference_spread_and_sticky_are_validated(bad):
    with pytest.raises(ValueError, match=r"reference_spread must be a finite number >= 0"):
        QTuningConfig(reference_spread=bad)
    with pytest.raises(ValueError, match="reference_sticky must be true or false"):
        QTuningConfig(reference_sticky=1)
    with pytest.raises(ValueError, match="reference_tokens must be true or false"):
        QTuningConfig(reference_tokens="yes")
    config = QTuningConfig.from_dict({"reference": "base", "reference_spread": 2, "reference_sticky": True})
    assert config.reference_spread == 2.0 and config.reference_sticky is True


def test_rising_tokens_are_never_kept_in_a_pruned_sample():
    from qtuning_plugin.core import decide_step

    g = torch.Generator().manual_seed(0)
    current = make_scores((torch.rand(8, 4, generator=g) * 3).tolist())
    config = QTuningConfig(sample_ratio=0.5, token_ratio=0.5, keep_tokens="highest")
    plain = decide_step([current], config)
    pruned = (plain.prune[0] & plain.keep[0]).nonzero().squeeze(1).tolist()
    assert pruned, "the pool needs a kept misconception sample"
    p = pruned[0]
    t = int(plain.token_keep[0][p].nonzero()[0])  # a token the plain decision trains
    # the pool fell one nat per token; each sample has one token with a rise, graded: median -0.4
    # (torch's median: the lower middle value), median absolute deviation 0.3; sample p's kept
    # token t rose by 1.0
    others = iter([-1.0, -0.8, -0.6, -0.4, -0.2, -0.1, 0.0])
    base = current.nll + 1.0
    for row in range(8):
        col = t if row == p else 1
        base[row, col] = current.nll[row, col] - (1.0 if row == p else next(others))
    base = base.masked_fill(~current.trainable, float("nan"))
    guarded = config.replace(reference="base", reference_margin=0.5, reference_spread=4.0)
    # the sample rule (above -0.4 + 0.5 + 4 x 0.3 = 1.3) flags nobody; the token rule (above 0.1) flags t
    assert not rising_samples([current], [base], 0.5, 4.0).any()
    assert rising_tokens([current], [base], 0.5)[0].nonzero().tolist() == [[p, t]]
    without = decide_step([current], guarded, [base])
    assert torch.equal(without.token_keep[0], plain.token_keep[0])  # reference_tokens off: same tokens
    with_tokens = decide_step([current], guarded.replace(reference_tokens=True), [base])
    assert torch.equal(with_tokens.keep[0], plain.keep[0])
    keep_p = with_tokens.token_keep[0][p]
    assert not keep_p[t]
    assert int(keep_p.sum()) == int(plain.token_keep[0][p].sum())  # its budget, from its other tokens
    rows = [r for r in range(8) if r != p]
    assert torch.equal(with_tokens.token_keep[0][rows], plain.token_keep[0][rows])


def test_token_keep_mask_avoids_positions_and_keeps_k_of_the_others():
    from qtuning_plugin.core.tokens import token_keep_mask

    nll = torch.tensor([[0.1, 3.0, 2.0, 1.0, 0.5, 0.0]])
    trainable = torch.tensor([[False, True, True, True, True, True]])
    avoid = torch.zeros_like(trainable)
    avoid[0, 1] = True
    highest = token_keep_mask(nll, trainable, 0.4, 0.0, "highest")  # k = 2 of 5
    assert highest.nonzero()[:, 1].tolist() == [1, 2]
    assert token_keep_mask(nll, trainable, 0.4, 0.0, "highest", avoid).nonzero()[:, 1].tolist() == [2, 3]
    # fewer other tokens than k: all of them, never an avoided one
    most = trainable & ~torch.tensor([[False, False, False, True, True, True]])
    assert token_keep_mask(nll, trainable, 1.0, 0.0, "lowest", most).nonzero()[:, 1].tolist() == [3, 4, 5]


@pytest.mark.parametrize("pool", ["step", "micro_batch"])
def test_decide_step_computes_the_rises_once_and_gives_each_pool_its_share(monkeypatch, pool):
    """The per-sample rises are computed once per step (not once per rule and pool); each pool's
    rules see that pool's rows only, and decide as the rules do on the pool by themselves."""
    import qtuning_plugin.core.reference as reference
    import qtuning_plugin.core.step as step

    g = torch.Generator().manual_seed(3)
    scores, refs = [], []
    # every token fell one nat but one per row, which rose by: the second micro-batch's rows rose
    # more, so a pool of its own has a higher threshold than the step's pool
    for rises in ([-1.0, -0.5, 0.0, 0.2, 1.0, 3.0], [0.0, 1.0, 2.0, 2.5, 3.5, 6.0]):
        current = make_scores((torch.rand(6, 4, generator=g) * 3).tolist())
        base = current.nll + 1.0
        for row, rise in enumerate(rises):
            base[row, 2] = current.nll[row, 2] - rise
        scores.append(current)
        refs.append(base.masked_fill(~current.trainable, float("nan")))
    config = QTuningConfig(sample_ratio=0.5, token_ratio=0.5, pool=pool, reference="base", reference_margin=0.3,
                           reference_tokens=True)
    pools = [[0], [1]] if pool == "micro_batch" else [[0, 1]]
    expected = torch.cat([rising_samples([scores[i] for i in p], [refs[i] for i in p], 0.3) for p in pools])
    # pools of their own: above 0 + 0.3 and above 2 + 0.3; one pool: above 1 + 0.3 (lower medians)
    flagged = {"micro_batch": [4, 5, 9, 10, 11], "step": [5, 8, 9, 10, 11]}[pool]
    assert expected.nonzero().squeeze(1).tolist() == flagged
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return excess(*args, **kwargs)

    monkeypatch.setattr(step, "excess", counted)
    monkeypatch.setattr(reference, "excess", counted)
    decision = step.decide_step(scores, config, refs)
    assert len(calls) == 1
    assert torch.equal(decision.suspects, expected)
    assert all(torch.equal(a, b) for a, b in zip(decision.excess, excess(scores, refs)))
