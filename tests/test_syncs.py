"""Decide on the host, once: at most two host syncs per optimizer step on the hot path (padded
batches), counted on a CPU by following the values that would live on the device (tests/syncs.py):
one copy of the step's layout (labels, masks, ids) before scoring, one copy of the per-sample
statistics after it. The Trainer's own count of label tokens and the model's forwards are not ours."""

import pytest
import torch
from syncs import CountSyncs, on_device
from tiny import padded_batch, tiny_model

from qtuning_plugin.core import QTuningConfig, build_rules, select_step

ONE_COPY_EACH = [("cpu", "batch.py"), ("cpu", "decision.py")]  # host_copies, host_stats


def where(calls):
    return sorted((name, at.split(":")[0]) for name, at in calls)


def test_the_counter_sees_what_would_wait_for_the_device():
    from qtuning_plugin.core import triage  # (called from the package, so its syncs are counted)

    values = [3.0, float("nan"), 1.0, 2.0]
    x = on_device(torch.tensor(values))
    with CountSyncs() as syncs:
        triage(x, x + 1, 0.5)  # the triage reads its inputs' values: on device tensors it would wait
    assert len(syncs.calls) > 3 and {"nonzero", "__bool__"} <= {name for name, _ in syncs.calls}
    with CountSyncs() as syncs:
        triage(torch.tensor(values), torch.tensor(values) + 1, 0.5)  # host tensors: nothing to wait for
    assert syncs.calls == []
    with CountSyncs() as syncs:
        int(x[0])  # this file is not the package: not counted
    assert syncs.calls == []


def step_batches():
    return [padded_batch([12, 7, 20, 9], [4, 2, 5, 3], seed=1),
            padded_batch([6, 15, 11, 8], [1, 4, 3, 2], seed=2, padding_side="left")]


@pytest.mark.parametrize("fields", [{}, {"preset": "small-loss"}, {"drop_ppl_outliers": 2.0}, {"preset": "auto"},
                                    {"token_budget": "batch"}, {"pool": "micro_batch"}, {"pool": "global"},
                                    {"token_ratio": 1.0}, {"keep_tokens": "highest", "neighbor_lambda": 0.0}])
def test_a_padded_step_waits_for_the_device_twice(fields):
    model = tiny_model("llama")
    config = QTuningConfig.from_dict({"sample_ratio": 0.5, **fields})
    plain = select_step(model, step_batches(), config)  # (the scoring path is chosen at the first step)
    batches = on_device(step_batches())
    with CountSyncs() as syncs:
        result = select_step(model, batches, config)
    assert where(syncs.calls) == ONE_COPY_EACH, syncs.calls
    for a, b in zip(result.micro_batches, plain.micro_batches):  # (counting changes nothing)
        assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])


def test_the_reference_guard_copies_once_more_per_micro_batch_at_first_sight_only():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                      init_lora_weights=False))
    config = QTuningConfig(sample_ratio=0.5, reference="base")
    rules = build_rules(config)
    batches = on_device(step_batches())
    counts = []
    for _ in range(2):
        with CountSyncs() as syncs:
            select_step(model, batches, config, rules=rules)
        counts.append(where(syncs.calls))
    assert counts[0] == sorted(ONE_COPY_EACH + [("cpu", "reference.py")] * 2)  # the base NLL, into the cache
    assert counts[1] == ONE_COPY_EACH


def test_a_trainer_step_through_the_callback_waits_twice():
    """The hook as the Trainer calls it (fetch, score, decide, re-batch, metrics): two syncs a step."""
    from test_trl import sft_trainer

    from qtuning_plugin import QTuning

    cb = QTuning(sample_ratio=0.25, token_ratio=0.5)
    trainer = sft_trainer([cb], ga=2, bs=4, steps=3)
    cb.attach(trainer)
    fetch, hook = trainer._qtuning_originals["get_batch_samples"], trainer.get_batch_samples
    per_step = []

    def tagged_fetch(*args):
        batches, n = fetch(*args)
        return on_device(batches), n

    def counted_hook(*args):
        with CountSyncs() as syncs:
            out = hook(*args)
        per_step.append(where(syncs.calls))
        return out

    trainer._qtuning_originals["get_batch_samples"] = tagged_fetch
    trainer.get_batch_samples = counted_hook
    trainer.train()
    assert per_step == [ONE_COPY_EACH] * 3 and cb.totals["steps"] == 3


def test_the_scoring_forwards_keyword_filter_is_read_once_per_model(monkeypatch):
    from qtuning_plugin.core import heads

    model = tiny_model("llama")
    config = QTuningConfig(sample_ratio=0.5)
    select_step(model, step_batches(), config)  # chooses the scoring path (probe forwards)
    calls = []
    real = heads.inspect.signature
    monkeypatch.setattr(heads.inspect, "signature", lambda f, *a, **kw: calls.append(f) or real(f, *a, **kw))
    for _ in range(3):
        select_step(model, step_batches(), config)
    assert calls == []  # 3 steps x 2 scoring forwards, no signature read
    other = tiny_model("llama")
    select_step(other, step_batches(), config)
    assert len(calls) == 1  # a new model: read once, at its probe, then cached
