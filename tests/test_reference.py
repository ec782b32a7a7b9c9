"""The reference guard (``reference="base"``, a rule beyond the paper: core/rules/reference.py): the
base model's NLL with the adapters off, cached by content; the rising-sample rule; its place in the
step and the callback."""

import copy
import tempfile

import datasets
import pytest
import torch

from qtuning_plugin import QTuning, QTuningConfig
from qtuning_plugin.core import Scores, decide, decide_step, score_batch, scoring_mode
from qtuning_plugin.core.rules import Pool, build_rules
from qtuning_plugin.core.rules.reference import (ReferenceCache, ReferenceGuard, adapter_switch, excess,
                                                 rising_samples, row_keys)
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


def flagged(scores, references, margin):
    """The guard's verdict on one pool: rising_samples of the pool's excess."""
    return rising_samples(*excess(scores, references), margin)


def base_forwards(model):
    """A list that grows by one at every forward of ``model`` run with its adapters off (the
    reference guard's), seen at the input embedding (whichever scoring path runs)."""
    lora = next(m for m in model.modules() if hasattr(m, "lora_A"))
    calls = []
    model.get_input_embeddings().register_forward_pre_hook(
        lambda module, args: calls.append(1) if lora.disable_adapters else None)
    return calls


def guard_of(callback):
    """The reference guard among a callback's rules (it holds the cache of base NLLs)."""
    (guard,) = [r for r in callback.rules if isinstance(r, ReferenceGuard)]
    return guard


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
    forwards = base_forwards(model)
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
    assert not cache.missing(keys) and len(cache) == 4 and len(forwards) == 1
    # the adapters are back on after the reference forward
    with scoring_mode(model):
        again = score_batch(model, batch)
    assert torch.equal(again.nll, trained.nll)


def test_the_guard_and_the_scorer_see_through_the_same_wrappers():
    """One walk over the wrappers (core/wrappers.py): through DDP / DeepSpeed's ``.module`` and
    torch.compile's ``._orig_mod`` the guard finds the PEFT model's adapter switch and the scorer
    its causal LM."""
    from qtuning_plugin.core.wrappers import unwrap_causal_lm, wrapped_modules

    class Wrapper(torch.nn.Module):
        def __init__(self, inner, attribute):
            super().__init__()
            setattr(self, attribute, inner)

    peft_model, _ = lora_model()
    outer = Wrapper(Wrapper(peft_model, "_orig_mod"), "module")
    chain = list(wrapped_modules(outer))
    assert chain[:3] == [outer, outer.module, peft_model]
    assert unwrap_causal_lm(outer) is chain[-1] is peft_model.get_base_model()
    assert adapter_switch(outer) == peft_model.disable_adapter
    plain = tiny_model()
    assert unwrap_causal_lm(Wrapper(plain, "module")) is plain and adapter_switch(Wrapper(plain, "module")) is None


def test_cache_keys_and_decision_log_ids_share_one_scheme():
    """The guard's cache key is the decision log's id scheme (core/keys.py) over the same tokens,
    plus the trainable positions the cached NLL belongs to."""
    from qtuning_plugin.core.keys import content_key
    from qtuning_plugin.decision_log import sample_id

    batch = padded_batch([9, 5, 7], [3, 2, 4], padding_side="left")
    trainable = trainable_positions(batch["labels"], attention_mask=batch["attention_mask"])
    keys = row_keys(batch, trainable)
    for row, key in enumerate(keys):
        cols = batch["attention_mask"][row].nonzero().squeeze(1)
        tokens = batch["input_ids"][row, cols].tolist()
        positions = (trainable[row].nonzero().squeeze(1) - int(cols[0])).tolist()
        assert key == content_key(tokens, positions)
        assert sample_id(tokens) == content_key(tokens) != key
    assert sample_id([1, 2, 3]) == "e2353910701f1c2a"  # the ids of logs already written stay


def test_no_adapter_no_reference():
    assert adapter_switch(tiny_model()) is None
    model, _ = lora_model()
    assert adapter_switch(model) is not None
    batch = padded_batch([5], [2])
    with pytest.raises(ValueError, match="PEFT"):
        ReferenceCache().fill(tiny_model(), batch, ["k"], chunk_size=256)
    with pytest.raises(ValueError, match="reference='none'"):
        ReferenceGuard.check_model(tiny_model())
    ReferenceGuard.check_model(model)


def test_rising_samples_flags_a_risen_token_only_once_the_pool_fell():
    current = make_scores([[0.5, 0.5, 3.0], [0.2, 0.3], [0.4, 0.4, 0.4], [0.1, 0.9], [0.3, 0.3]])
    # the pool fell: most samples are below their base (by 1 nat per token); sample 0's last token
    # rose by 2.0 nats, sample 3's last token by 0.6
    base = make_scores([[1.5, 1.5, 1.0], [1.2, 1.3], [1.4, 1.4, 1.4], [1.1, 0.3], [1.3, 1.3]]).nll
    largest, mean = excess([current], [base])
    assert largest.tolist() == pytest.approx([2.0, -1.0, -1.0, 0.6, -1.0], abs=1e-6)
    assert mean[1].item() == pytest.approx(-1.0)
    # flagged: a rise above the pool's median rise (-1.0) by more than the margin
    first = flagged([current], [base], margin=2.0)
    assert first.tolist() == [True, False, False, False, False]
    assert flagged([current], [base], margin=1.0).tolist() == [True, False, False, True, False]
    assert not flagged([current], [base], margin=3.5).any()
    # the rule is relative to the pool: the same rises on top of a pool whose rises are all larger
    shifted = base.clone()
    for row, last in ((1, 2), (2, 3), (3, 2), (4, 2)):
        shifted[row, last] -= 1.0  # everyone but sample 0 has a token that rose one nat more...
    assert bool(excess([current], [shifted])[1].median() < 0)  # ...and the pool still fell
    assert flagged([current], [shifted], margin=2.0).tolist() == [False] * 5
    assert flagged([current], [shifted], margin=1.5).tolist() == [True, False, False, True, False]
    # the pool has not improved on the base yet (its median excess is not below 0): nothing flagged
    assert not flagged([current], [current.nll - 0.0], margin=0.1).any()
    # a sample without a reference is never flagged, and neither is a row without a label token
    partial = base.clone()
    partial[0] = float("nan")
    assert flagged([current], [partial], margin=1.0).tolist() == [False, False, False, True, False]
    split = flagged([make_scores([[0.5, 0.5, 3.0], [0.2, 0.3]]),
                     make_scores([[0.4, 0.4, 0.4], [0.1, 0.9], [0.3, 0.3]])], [base[:2], base[2:]], margin=2.0)
    assert split.tolist() == first.tolist()  # the pool spans micro-batches


def test_the_guard_rule_is_rising_samples_on_its_features():
    """ReferenceGuard: features ``rise_max`` / ``rise_mean`` (excess, on the scores' device), and
    exclude = rising_samples of them with the config's margin, on the host."""
    current = make_scores([[0.5, 0.5, 3.0], [0.2, 0.3], [0.4, 0.4, 0.4], [0.1, 0.9], [0.3, 0.3]])
    base = make_scores([[1.5, 1.5, 1.0], [1.2, 1.3], [1.4, 1.4, 1.4], [1.1, 0.3], [1.3, 1.3]]).nll
    for margin, want in ((2.0, [0]), (1.0, [0, 3]), (3.5, [])):
        guard = ReferenceGuard(QTuningConfig(reference="base", reference_margin=margin))
        features = guard.features([current], {"reference": [base]})
        assert list(features) == ["rise_max", "rise_mean"]
        largest, mean = excess([current], [base])
        assert torch.equal(features["rise_max"], largest) and torch.equal(features["rise_mean"], mean)
        out = guard.exclude(Pool(current.ppl, current.entropy, features))
        assert out.dtype == torch.bool and out.nonzero().squeeze(1).tolist() == want
    with pytest.raises(ValueError, match="prepare"):
        ReferenceGuard(QTuningConfig(reference="base")).features([current], {})
    with pytest.raises(ValueError, match="prepare"):
        decide_step([current], QTuningConfig(reference="base"))  # no base NLL given


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
    plain_keep = decide_step(scores, callback.config.paper()).keep[0]  # the paper's Algorithm 1
    victim = int(plain_keep.nonzero()[0])
    reference = scores[0].nll + 1.0  # the pool fell by one nat per token...
    row = scores[0].trainable[victim].nonzero()[-1]
    reference[victim, row] = scores[0].nll[victim, row] - 1.5  # ...but one token of the victim rose
    decision = callback.decide(scores, {"reference": [reference.masked_fill(~scores[0].trainable, float("nan"))]})
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
    forwards = base_forwards(model)
    trainer.train()
    cache = guard_of(callback).cache
    assert len(cache) == 16
    assert len(forwards) == 4  # the 4 micro-batches of the first epoch; none in the second
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
    forwards = base_forwards(model)
    sft_trainer([callback], model, steps=4).train()
    assert len(forwards) == 8
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


@pytest.mark.parametrize("pool", ["step", "micro_batch"])
def test_decide_step_computes_the_rises_once_and_gives_each_pool_its_share(monkeypatch, pool):
    """The per-sample rises are computed once per step (not once per pool), as the guard's
    features; each pool's exclude sees that pool's rows only, and decides as the rule does on the
    pool by itself."""
    import qtuning_plugin.core.rules.reference as reference

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
    config = QTuningConfig(sample_ratio=0.5, token_ratio=0.5, pool=pool, reference="base", reference_margin=0.3)
    pools = [[0], [1]] if pool == "micro_batch" else [[0, 1]]
    expected = torch.cat([flagged([scores[i] for i in p], [refs[i] for i in p], 0.3) for p in pools])
    # pools of their own: above 0 + 0.3 and above 2 + 0.3; one pool: above 1 + 0.3 (lower medians)
    want = {"micro_batch": [4, 5, 9, 10, 11], "step": [5, 8, 9, 10, 11]}[pool]
    assert expected.nonzero().squeeze(1).tolist() == want
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return excess(*args, **kwargs)

    monkeypatch.setattr(reference, "excess", counted)
    decision = decide_step(scores, config, refs)
    assert len(calls) == 1
    assert torch.equal(decision.suspects, expected) and decision.excluded is None
    assert torch.equal(decision.flags["suspect"], expected)
    assert not (torch.cat(decision.keep) & expected).any()
    largest, mean = excess(scores, refs)
    assert torch.equal(decision.host.features["rise_max"], largest)
    assert torch.equal(decision.host.features["rise_mean"], mean)
    # the same through the rules' inputs, as select_step passes them
    again = decide_step(scores, config, rules=build_rules(config), inputs={"reference": refs})
    assert torch.equal(again.suspects, expected)
    assert all(torch.equal(a, b) for a, b in zip(again.keep + again.token_keep, decision.keep + decision.token_keep))


class _TwoRanks:
    """Collectives of rank 0 of two: rank 1's samples all rose far above their base."""

    world_size, rank = 2, 0

    def all_reduce_max(self, values):
        return list(values)

    def all_gather(self, value):
        n = 6
        # rows: ppl, entropy, input tokens, label tokens, rise_max, rise_mean, eligible
        other = [[2.0] * n, [0.5] * n, [5.0] * n, [4.0] * n, [9.0] * n, [-0.5] * n, [1.0] * n]
        assert len(value) == len(other)
        return [value, other]


def test_under_pool_global_the_guard_judges_its_own_ranks_pool():
    """The guard is ``local``: its per-token statistics are this rank's, so under ``pool: global``
    it flags against this rank's pool, whatever other ranks' rises are; the triage then ranks
    every rank's eligible samples."""
    current = make_scores([[0.5, 0.5, 3.0], [0.2, 0.3], [0.4, 0.4, 0.4], [0.1, 0.9], [0.3, 0.3], [0.2, 0.2]])
    base = make_scores([[1.5, 1.5, 1.0], [1.2, 1.3], [1.4, 1.4, 1.4], [1.1, 0.3], [1.3, 1.3], [1.2, 1.2]]).nll
    config = QTuningConfig(sample_ratio=0.5, reference="base", reference_margin=1.0, pool="global")
    alone = decide_step([current], config, [base])
    assert alone.suspects.tolist() == [True, False, False, True, False, False]
    d = decide_step([current], config, [base], collectives=_TwoRanks())
    assert torch.equal(d.suspects, alone.suspects)
    assert d.global_pool is not None
    assert d.global_pool.eligible.tolist() == [False, True, True, False, True, True] + [True] * 6
    assert int(d.keep[0].sum()) == 3 and not (d.keep[0] & d.suspects).any()
