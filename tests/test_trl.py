"""The Trainer front end: SFTTrainer(callbacks=[QTuning(...)]) and a plain transformers.Trainer.

Run against both the newest trl/transformers and the versions the latest Axolotl pins
(tests/run.sh runs this file in both environments).
"""

import importlib
import json
import logging
import math
import tempfile
import types
import warnings

import datasets
import pytest
import torch
import transformers
from transformers import Trainer, TrainerCallback, TrainingArguments

from qtuning_plugin import QTuning, QTuningConfig
from qtuning_plugin.callback import SkippedMicroBatch
from qtuning_plugin.core import decide, score_batch, scoring, scoring_mode
from tiny import arithmetic_dataset, tiny_model, tiny_tokenizer

trl = pytest.importorskip("trl")

COMMON_ARGS = dict(report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, seed=0, bf16=False,
                   dataloader_drop_last=True, max_grad_norm=0.0, learning_rate=5e-3, lr_scheduler_type="constant")


def sft_trainer(callbacks=(), ga=1, bs=4, steps=3, n=48, model=None, **kw):
    tok = tiny_tokenizer()
    model = model or tiny_model("llama", vocab_size=len(tok))
    args = trl.SFTConfig(per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=steps,
                         **{"output_dir": tempfile.mkdtemp(), **COMMON_ARGS, **kw})
    ds = datasets.Dataset.from_list(arithmetic_dataset(n))
    return trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=list(callbacks))


def plain_trainer(callbacks=(), ga=1, bs=4, steps=3, n=48, padding_side="right", **kw):
    """transformers.Trainer on a causal LM, prompt tokens labelled -100."""
    tok = tiny_tokenizer(padding_side)
    model = tiny_model("llama", vocab_size=len(tok))
    rows = []
    for r in arithmetic_dataset(n):
        p, c = tok(r["prompt"])["input_ids"], tok(r["completion"])["input_ids"] + [tok.eos_token_id]
        rows.append({"input_ids": p + c, "attention_mask": [1] * (len(p) + len(c)), "labels": [-100] * len(p) + c})
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=bs,
                             gradient_accumulation_steps=ga, max_steps=steps, **{**COMMON_ARGS, **kw})
    collator = transformers.DataCollatorForSeq2Seq(tok, padding=True)
    return Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                   data_collator=collator, callbacks=list(callbacks))


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def relative_error(got, want):
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class GradientCapture(TrainerCallback):
    """Keeps every trainable parameter's gradient just before the first optimizer step."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


class TrainingRows(TrainerCallback):
    """Counts the rows that reach the model's forward with grad enabled (training forwards)."""

    def __init__(self, model):
        self.per_step, self._rows = [], 0
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if torch.is_grad_enabled():
            self._rows += kwargs["input_ids"].shape[0]

    def on_step_end(self, args, state, control, **kwargs):
        self.per_step.append(self._rows)
        self._rows = 0


# ---------------------------------------------------------------- equivalence at ratio 1

@pytest.mark.parametrize("ga", [1, 4])
def test_ratio_one_reproduces_plain_sft(ga):
    base = sft_trainer(ga=ga, bs=2, steps=4)
    base.train()
    cb = QTuning(sample_ratio=1, token_ratio=1)
    ours = sft_trainer([cb], ga=ga, bs=2, steps=4)
    ours.train()
    assert cb.trainer is ours
    torch.testing.assert_close(losses(ours), losses(base), rtol=1e-6, atol=0)
    for (name, a), b in zip(params(base.model).items(), params(ours.model).values()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("ga", [1, 4])
def test_ratio_one_through_the_full_scoring_path_still_reproduces_plain_sft(ga, monkeypatch):
    """Scoring, triage (keep all), re-batching by length: the same training, to float error."""
    base = sft_trainer(ga=ga, bs=2, steps=4)
    base.train()
    monkeypatch.setattr(QTuningConfig, "prunes_nothing", property(lambda self: False))
    cb = QTuning(sample_ratio=1, token_ratio=1)
    ours = sft_trainer([cb], ga=ga, bs=2, steps=4)
    ours.train()
    assert cb.totals["steps"] == 4 and cb.totals["kept_samples"] == cb.totals["pool_samples"] == 8 * ga
    torch.testing.assert_close(losses(ours), losses(base), rtol=1e-6, atol=0)
    for (name, a), b in zip(params(base.model).items(), params(ours.model).values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------- exactness with pruning on

def _reference_gradient(model, batches, config):
    """Mean CE over the kept tokens of the kept samples, computed sample by sample (unpadded),
    with the decision taken by the core on the step's pool at the step's starting weights."""
    with scoring_mode(model):
        scores = [score_batch(model, b) for b in batches]
    groups = [list(range(len(batches)))] if config.pool == "step" else [[i] for i in range(len(batches))]
    total, count, terms = 0.0, 0, []
    for group in groups:
        d = decide([scores[i] for i in group], config)
        for i, keep, token_keep in zip(group, d.keep, d.token_keep):
            b = batches[i]
            for row in keep.nonzero().squeeze(1).tolist():
                cols = b["attention_mask"][row].nonzero().squeeze(1)
                ids = b["input_ids"][row, cols][None]
                labels = torch.where(token_keep[row, cols], b["labels"][row, cols], -100)
                terms.append((ids, labels))
                count += int((labels[1:] != -100).sum())
    model.train()
    model.zero_grad()
    for ids, labels in terms:
        logits = model(input_ids=ids).logits[0, :-1]
        total = total + torch.nn.functional.cross_entropy(logits, labels[1:], reduction="sum", ignore_index=-100)
    (total / count).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads, count


@pytest.mark.parametrize("front", ["sft", "plain-right", "plain-left"])
@pytest.mark.parametrize("ga", [1, 4])
@pytest.mark.parametrize("pool", ["step", "micro_batch"])
def test_one_step_gradient_is_the_mean_ce_over_kept_tokens(front, ga, pool):
    config = QTuningConfig(sample_ratio=0.25, token_ratio=0.5, pool=pool)
    cb, grads = QTuning(config), GradientCapture()
    if front == "sft":
        trainer = sft_trainer([cb, grads], ga=ga, bs=4, steps=1)
    else:
        trainer = plain_trainer([cb, grads], ga=ga, bs=4, steps=1, padding_side=front.split("-")[1])
    start = {n: p.detach().clone() for n, p in trainer.model.state_dict().items()}
    fetched = []
    fetch = trainer.get_batch_samples  # QTuning attaches at on_train_begin and will call this one

    def recording(it, n, device):
        batches, count = fetch(it, n, device)
        fetched.extend({k: v.clone() for k, v in b.items()} for b in batches)
        return batches, count

    trainer.get_batch_samples = recording
    trainer.train()
    assert len(fetched) == ga

    reference = tiny_model("llama", vocab_size=trainer.model.config.vocab_size)
    reference.load_state_dict(start)
    want, n_tokens = _reference_gradient(reference, fetched, config)
    assert n_tokens > 0
    got = grads.grads
    assert set(got) == set(want)
    for name in want:  # relative error of each parameter's gradient, in norm
        assert relative_error(got[name], want[name]) < 1e-5, name
    # and the denominator is the kept tokens: the full pool would give a different gradient
    assert cb.totals["kept_label_tokens"] == n_tokens < cb.totals["label_tokens"]


# ---------------------------------------------------------------- pruned samples skip the forward

@pytest.mark.parametrize("ga,bs,ratio", [(1, 8, 0.25), (4, 4, 0.25), (4, 2, 0.125), (2, 4, 0.5)])
def test_training_forward_sees_only_kept_rows(ga, bs, ratio):
    cb = QTuning(sample_ratio=ratio, token_ratio=0.5)
    trainer = sft_trainer([cb], ga=ga, bs=bs, steps=3)
    counter = TrainingRows(trainer.model)
    trainer.add_callback(counter)
    trainer.train()
    k = max(1, math.floor(ratio * ga * bs))
    assert counter.per_step == [k] * 3
    assert trainer.state.global_step == 3


def test_stand_ins_keep_the_micro_batch_count_and_come_first():
    cb = QTuning(sample_ratio=0.25, token_ratio=1)
    trainer = sft_trainer([cb], ga=4, bs=2, steps=1)
    seen = []

    class Spy(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            inner = trainer.training_step

            def spy(model, inputs, *args, **kwargs):
                seen.append(isinstance(inputs, SkippedMicroBatch))
                return inner(model, inputs, *args, **kwargs)

            trainer.training_step = spy

    trainer.add_callback(Spy())
    trainer.train()
    assert seen == [True, True, True, False]  # K = 2 rows: one real micro-batch, last


# ---------------------------------------------------------------- metrics, resume

METRICS = ["kept_samples", "pool_samples", "kept_tokens_ratio", "share_q1_noise", "share_q2_misconception",
           "share_q3_redundant", "share_q4_calibration", "level", "score_seconds", "score_share",
           "kept_ppl", "kept_entropy", "dropped_ppl", "dropped_entropy"]


def test_metrics_in_log_history_averaged_over_the_logging_interval():
    cb = QTuning(sample_ratio=0.25, token_ratio=0.5)
    trainer = sft_trainer([cb], ga=2, bs=4, steps=4, logging_steps=2)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for log in logs:
        for name in METRICS:
            assert f"qtuning/{name}" in log, name
        assert log["qtuning/kept_samples"] == 2 and log["qtuning/pool_samples"] == 8
        shares = sum(log[f"qtuning/share_{q}"] for q in ("q1_noise", "q2_misconception", "q3_redundant",
                                                         "q4_calibration"))
        assert shares == pytest.approx(1.0)
        assert 0 < log["qtuning/kept_tokens_ratio"] < 1
        assert 0 < log["qtuning/score_share"] < 1
    assert cb.totals["steps"] == 4


def test_high_ppl_excluded_is_logged_with_the_small_loss_rules(tmp_path):
    """drop_highest_ppl = 0.25 of a pool of 8 keeps out 2 samples every step (the two highest PPL);
    drop_ppl_outliers keeps out a varying number, the log PPL outliers of the pool. Neither is ever
    kept, the decision log marks them (``excluded``), and without the rules the metric and the
    field are absent."""
    from qtuning_plugin.decision_log import read_log

    cb = QTuning(sample_ratio=0.25, token_ratio=0.5, drop_highest_ppl=0.25, log_decisions=str(tmp_path / "d.jsonl"))
    trainer = sft_trainer([cb], ga=2, bs=4, steps=4, logging_steps=2)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [log["qtuning/high_ppl_excluded"] for log in logs] == [2, 2] and cb.totals["high_ppl_excluded"] == 8
    pool = cb.last_pool
    assert torch.equal(pool["excluded"], pool["ppl"] >= pool["ppl"].sort().values[-2])  # (distinct PPLs here)
    assert not (pool["excluded"] & pool["keep"]).any()
    rows = read_log(tmp_path / "d.jsonl")
    assert [sum(r["excluded"] for r in rows if r["step"] == s) for s in (1, 2, 3, 4)] == [2, 2, 2, 2]
    assert not any(r["excluded"] and r["kept"] for r in rows)
    assert [r["excluded"] for r in rows if r["step"] == 4] == pool["excluded"].tolist()

    cb = QTuning(sample_ratio=0.25, token_ratio=0.5, drop_ppl_outliers=0.5)
    trainer = sft_trainer([cb], ga=2, bs=4, steps=2, logging_steps=1)
    trainer.train()
    pool = cb.last_pool
    x = pool["ppl"].log()
    median = x.median()
    assert torch.equal(pool["excluded"], x > median + 0.5 * (1.4826 * (x - median).abs().median()))
    assert pool["excluded"].any() and not (pool["excluded"] & pool["keep"]).any()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[-1]["qtuning/high_ppl_excluded"] == int(pool["excluded"].sum())

    plain = QTuning(sample_ratio=0.25, token_ratio=0.5, log_decisions=str(tmp_path / "plain.jsonl"))
    sft_trainer([plain], ga=2, bs=4, steps=1).train()
    assert "high_ppl_excluded" not in plain.totals and "excluded" not in plain.last_pool
    rows = read_log(tmp_path / "plain.jsonl")
    assert len(rows) == 8 and not any("excluded" in r or "suspect" in r for r in rows)


def test_resume_continues_configuration_and_counters(caplog):
    out = tempfile.mkdtemp()
    cb = QTuning(sample_ratio=0.5, token_ratio=0.5)
    first = sft_trainer([cb], ga=2, bs=2, steps=4, save_strategy="steps", save_steps=2, output_dir=out)
    first.train()
    assert cb.totals["steps"] == 4

    # Resume from step 2 with the checkpoint's callback state (a different config given on purpose).
    resumed_cb = QTuning(sample_ratio=0.25, token_ratio=1)
    second = sft_trainer([resumed_cb], ga=2, bs=2, steps=4, output_dir=out, save_strategy="no",
                         restore_callback_states_from_checkpoint=True)
    second.train(resume_from_checkpoint=f"{out}/checkpoint-2")
    live = [cb for cb in second.callback_handler.callbacks if isinstance(cb, QTuning)]
    assert len(live) == 1
    assert live[0].config == QTuningConfig(sample_ratio=0.5, token_ratio=0.5)
    assert live[0].totals["steps"] == 4  # 2 restored + 2 trained
    assert live[0].totals["pool_samples"] == 16 and live[0].totals["kept_samples"] == 8

    # Without restore_callback_states_from_checkpoint the counters continue and a different
    # config is reported.
    other = QTuning(sample_ratio=0.25, token_ratio=1)
    third = sft_trainer([other], ga=2, bs=2, steps=4, output_dir=out, save_strategy="no")
    with caplog.at_level(logging.WARNING, logger="qtuning_plugin.callback"):
        third.train(resume_from_checkpoint=f"{out}/checkpoint-2")
    assert other.totals["steps"] == 4
    assert "the checkpoint was trained with" in caplog.text


# ---------------------------------------------------------------- attaching and refusing

def test_explicit_attach_and_missing_trainer_message():
    trainer = sft_trainer([], steps=1)
    cb = QTuning(sample_ratio=0.5).attach(trainer)
    assert cb in trainer.callback_handler.callbacks
    trainer.train()
    assert cb.totals["steps"] == 1
    lost = QTuning()
    with pytest.raises(RuntimeError, match=r"attach\(trainer\)"):
        lost.on_train_begin(trainer.args, trainer.state, trainer.control)


@pytest.mark.parametrize("when,how", [("after train", "remove"), ("before train", "remove"),
                                      ("before train", "pop")])
def test_removing_the_callback_gives_the_trainer_its_methods_back(when, how):
    """Removed with trainer.remove_callback / pop_callback (after a train(), or attached and removed
    before any), QTuning lets go: the next train() trains every row and logs no qtuning/* metric
    (before: the replaced methods stayed and went on pruning, unseen)."""
    cb = QTuning(sample_ratio=0.25, token_ratio=0.5)
    trainer = sft_trainer([cb] if when == "after train" else [], ga=2, bs=4, steps=2)
    if when == "after train":
        trainer.train()
        assert any(k.startswith("qtuning/") for k in trainer.state.log_history[0])
    else:
        cb.attach(trainer)
    if how == "remove":
        trainer.remove_callback(cb)
    else:
        assert trainer.pop_callback(QTuning) is cb
    counter = TrainingRows(trainer.model)
    trainer.add_callback(counter)
    trainer.train()
    assert counter.per_step == [8, 8]  # 2 steps x 2 micro-batches x 4 rows: every row
    assert not [k for h in trainer.state.log_history for k in h if k.startswith("qtuning/")]
    assert not {"get_batch_samples", "training_step", "log", "_qtuning_callback"} & trainer.__dict__.keys()


@pytest.mark.parametrize("how", ["callbacks", "attach"])
def test_each_train_call_prunes_and_the_trainer_is_its_own_in_between(how):
    """The trainer gets its own methods back at the end of train(); a second train() with the
    callback still there attaches again and prunes again."""
    cb = QTuning(sample_ratio=0.25, token_ratio=0.5)
    trainer = sft_trainer([cb] if how == "callbacks" else [], ga=2, bs=4, steps=2)
    if how == "attach":
        cb.attach(trainer)
    counter = TrainingRows(trainer.model)
    trainer.add_callback(counter)
    trainer.train()
    assert not {"get_batch_samples", "training_step", "log"} & trainer.__dict__.keys()
    trainer.train()
    assert counter.per_step == [2, 2, 2, 2] and cb.totals["steps"] == 4 and cb.trainer is trainer
    assert all(h["qtuning/kept_samples"] == 2 for h in trainer.state.log_history if "loss" in h)


def test_constructor_validates():
    with pytest.raises(ValueError, match=r"sample_ratio must be a number in \(0, 1\]"):
        QTuning(sample_ratio=0)
    with pytest.raises(ValueError, match="unknown field"):
        QTuning(sample_rate=0.5)
    with pytest.raises(ValueError, match="either a QTuningConfig or its fields"):
        QTuning(QTuningConfig(), token_ratio=0.3)
    assert QTuning({"sample_ratio": 0.5}).config.sample_ratio == 0.5


@pytest.mark.parametrize("option", ["packing", "padding_free"])
def test_packed_training_prunes_segments(option):
    """packing=True (BFD: several samples per example) and padding_free=True: every step keeps
    exactly K samples (segments) of its pool (exactness: tests/test_packing.py)."""
    kw = {option: True}
    if option == "padding_free":
        kw["max_length"] = None
    else:
        kw["max_length"] = 160
    cb = QTuning(sample_ratio=0.25, token_ratio=0.5)
    trainer = sft_trainer([cb], ga=2, bs=2, steps=3, **kw)
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 3 and all(math.isfinite(h["loss"]) for h in steps)
    for h in steps:
        assert h["qtuning/kept_samples"] == max(1, int(0.25 * h["qtuning/pool_samples"]))
        if option == "packing":  # 2 x 2 packed examples of several samples each
            assert h["qtuning/pool_samples"] > 4
        else:
            assert h["qtuning/pool_samples"] == 4


def test_rl_trainers_are_refused():
    dpo = trl.DPOTrainer.__new__(trl.DPOTrainer)
    with pytest.raises(ValueError, match="DPOTrainer is an RL / preference / distillation trainer"):
        QTuning().attach(dpo)


def _gkd_trainer_class():
    """TRL's GKDTrainer (distillation, a subclass of SFTTrainer), or a stand-in declared in TRL's
    namespace where this TRL has none."""
    for module in ("trl.experimental.gkd", "trl"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return importlib.import_module(module).GKDTrainer
        except (ImportError, AttributeError):
            pass
    return type("GKDTrainer", (trl.SFTTrainer,), {"__module__": "trl.trainer.gkd_trainer"})


def test_trl_trainers_are_told_apart_by_class_not_by_name():
    """SFTTrainer passes whatever its base classes are called (before: a renamed base class refused
    SFTTrainer itself), a user's own subclass of it passes, and TRL's distillation trainers that
    subclass SFTTrainer (GKD) are refused."""
    bases = [c for c in trl.SFTTrainer.__mro__[1:] if c.__module__.split(".")[0] == "trl"]  # (none in older TRL)
    names = [c.__name__ for c in bases]
    try:
        for c in bases:
            c.__name__ = "RenamedBaseTrainer"
        QTuning().attach(sft_trainer([], steps=1))
    finally:
        for c, name in zip(bases, names):
            c.__name__ = name
    mine = sft_trainer([], steps=1)
    mine.__class__ = type("MySFTTrainer", (trl.SFTTrainer,), {})
    QTuning().attach(mine)
    gkd = _gkd_trainer_class()
    with pytest.raises(ValueError, match="GKDTrainer is an RL / preference / distillation trainer"):
        QTuning().attach(gkd.__new__(gkd))


def test_sequence_parallelism_is_refused():
    trainer = sft_trainer([])
    trainer.args.parallelism_config = types.SimpleNamespace(cp_size=1, sp_size=2)
    with pytest.raises(ValueError, match="sequence / context parallelism"):
        QTuning().attach(trainer)


def test_a_model_that_is_not_a_causal_lm_is_refused():
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True)
    trainer = Trainer(model=transformers.BertForMaskedLM(cfg), args=args)
    with pytest.raises(ValueError, match="decoder-only causal LM.*BertForMaskedLM"):
        QTuning().attach(trainer)


def test_batches_without_labels_are_refused_at_the_first_step():
    tok = tiny_tokenizer()
    rows = [{"input_ids": tok(r["prompt"])["input_ids"]} for r in arithmetic_dataset(8)]
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True, max_steps=1,
                             per_device_train_batch_size=4)
    trainer = Trainer(model=tiny_model("llama", vocab_size=len(tok)), args=args,
                      train_dataset=datasets.Dataset.from_list(rows),
                      data_collator=transformers.DataCollatorWithPadding(tok),
                      callbacks=[QTuning()])
    with pytest.raises(ValueError, match="no 'labels'"):
        trainer.train()


def _plain_rows(tok, labelled, n=8):
    """Prompt / completion rows for a plain Trainer; row i has label tokens only if labelled(i)."""
    rows = []
    for i, r in enumerate(arithmetic_dataset(n)):
        p, c = tok(r["prompt"])["input_ids"], tok(r["completion"])["input_ids"]
        labels = [-100] * len(p) + (c if labelled(i) else [-100] * len(c))
        rows.append({"input_ids": p + c, "attention_mask": [1] * (len(p) + len(c)), "labels": labels})
    return rows


def _trainer_on_rows(rows, tok, callbacks, bs, steps, **kw):
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=bs, max_steps=steps,
                             **{**COMMON_ARGS, **kw})
    model = tiny_model("llama", vocab_size=len(tok))
    return Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                   data_collator=transformers.DataCollatorForSeq2Seq(tok, padding=True), callbacks=callbacks)


class TrainedLabels(TrainerCallback):
    """Per optimizer step: the label tokens (after the shift) of the rows in each training forward."""

    def __init__(self, model):
        self.per_step, self._rows = [], []
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if torch.is_grad_enabled():
            self._rows += [row[1:][row[1:] != -100].tolist() for row in kwargs["labels"]]

    def on_step_end(self, args, state, control, **kwargs):
        self.per_step.append(self._rows)
        self._rows = []


def test_rows_without_a_label_token_are_not_samples(caplog):
    """Truncation can leave rows without any response token. They take no kept slot: K comes from
    the labelled rows, and the step trains exactly K labelled rows (before: 4 x 1 at 0.25 with one
    unlabelled row trained all 4 rows, "trained unpruned")."""
    tok = tiny_tokenizer()
    rows = _plain_rows(tok, lambda i: i % 4 != 0, n=16)  # 3 of 4 rows labelled, 1 not
    cb = QTuning(sample_ratio=0.5, token_ratio=1)
    trainer = _trainer_on_rows(rows, tok, [cb], bs=4, steps=4)
    seen = TrainedLabels(trainer.model)
    trainer.add_callback(seen)
    with caplog.at_level(logging.WARNING, logger="qtuning_plugin.callback"):
        trainer.train()
    assert "trained" not in caplog.text
    for step in seen.per_step:  # a step holds 3 labelled rows or 4, whatever the shuffle: K = 1 or 2
        assert all(step) and 1 <= len(step) <= 2
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for h in logs:
        assert h["qtuning/kept_samples"] == max(1, h["qtuning/pool_samples"] // 2)
        assert h["qtuning/pool_samples"] + h["qtuning/unscored_samples"] == 4
    assert sum(h["qtuning/unscored_samples"] for h in logs) == 4  # the 4 unlabelled rows, each seen once
    assert cb.totals["pool_samples"] == 12


def test_a_step_without_any_label_token_is_trained_as_fetched(caplog):
    tok = tiny_tokenizer()
    rows = _plain_rows(tok, lambda i: False, n=8)
    trainer = _trainer_on_rows(rows, tok, [QTuning(sample_ratio=0.25, token_ratio=0.5)], bs=4, steps=1)
    counter = TrainingRows(trainer.model)
    trainer.add_callback(counter)
    with caplog.at_level(logging.WARNING, logger="qtuning_plugin.callback"):
        trainer.train()
    assert "no sample of step 1 has a label token" in caplog.text
    assert counter.per_step == [4]  # as without Q-Tuning (whose loss is then 0 / 0 too)


def test_left_padding_with_labels_on_every_token_trains_exactly_the_decided_tokens():
    """Labels on every token (a plain LM collator) with left padding: a row's first token is
    'predicted' from padding. Once re-batched it may land in column 0, out of the loss, so such a
    position is not trainable in the first place: the trained tokens are the decided ones."""
    tok = tiny_tokenizer("left")
    rows = [{"input_ids": tok(r["prompt"] + r["completion"])["input_ids"]} for r in arithmetic_dataset(32)]
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, max_steps=4, **COMMON_ARGS)
    model = tiny_model("llama", vocab_size=len(tok))
    cb = QTuning(sample_ratio=0.5, token_ratio=0.5)
    trainer = Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                      data_collator=transformers.DataCollatorForLanguageModeling(tok, mlm=False), callbacks=[cb])
    seen = TrainedLabels(model)
    trainer.add_callback(seen)
    trainer.train()
    trained = sum(len(r) for step in seen.per_step for r in step)
    assert trained == cb.totals["kept_label_tokens"] > 0


# ---------------------------------------------------------------- no silent failure

def test_resume_with_restored_callback_state_keeps_the_decision_log_whole(tmp_path):
    """restore_callback_states_from_checkpoint=True rebuilds the callback from its saved arguments:
    every constructor argument must be there (before, log_decisions and chunk_size were lost and the
    log stopped at the checkpoint). Interrupted at step 2 and resumed = one uninterrupted run."""
    from qtuning_plugin.decision_log import read_log

    def run(out, log, stop_at=None, resume=None, callback=None):
        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if stop_at is not None and state.global_step == stop_at:
                    control.should_training_stop = True

        cb = callback or QTuning(sample_ratio=0.5, token_ratio=0.5, chunk_size=7, log_decisions=log)
        trainer = sft_trainer([cb, Stop()], ga=2, bs=2, steps=4, output_dir=str(out), save_strategy="steps",
                              save_steps=2, restore_callback_states_from_checkpoint=True)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    whole = run(tmp_path / "whole", tmp_path / "whole.jsonl")
    run(tmp_path / "cut", tmp_path / "cut.jsonl", stop_at=2)
    assert {r["step"] for r in read_log(tmp_path / "cut.jsonl")} == {1, 2}
    # The resumed trainer is given a bare QTuning: the checkpoint's arguments replace it.
    resumed = run(tmp_path / "cut", None, resume=str(tmp_path / "cut" / "checkpoint-2"), callback=QTuning())
    live = [c for c in resumed.callback_handler.callbacks if isinstance(c, QTuning)]
    assert len(live) == 1 and live[0].config.chunk_size == 7 and str(live[0].config.log_decisions) == str(tmp_path / "cut.jsonl")
    assert live[0].config.decisions() == QTuningConfig(sample_ratio=0.5, token_ratio=0.5).decisions()
    key = lambda r: (r["step"], r["id"], r["kept"], r["kept_tokens"], r["quadrant"])  # noqa: E731
    assert sorted(map(key, read_log(tmp_path / "cut.jsonl"))) == sorted(map(key, read_log(tmp_path / "whole.jsonl")))
    whole_cb = next(c for c in whole.callback_handler.callbacks if isinstance(c, QTuning))
    assert live[0].totals["steps"] == whole_cb.totals["steps"] == 4
    assert live[0].totals["kept_label_tokens"] == whole_cb.totals["kept_label_tokens"]
    for (name, a), b in zip(params(whole.model).items(), params(resumed.model).values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_one_qtuning_object_moves_to_a_second_trainer():
    """Reused for a second trainer, the callback prunes that one (before: it stayed bound to the
    first, alive trainer, and the second trained unpruned without a word)."""
    cb = QTuning(sample_ratio=0.25, token_ratio=0.5)
    first = sft_trainer([cb], ga=2, bs=4, steps=1)
    first.train()
    second = sft_trainer([cb], ga=2, bs=4, steps=2)
    counter = TrainingRows(second.model)
    second.add_callback(counter)
    second.train()
    assert cb.trainer is second and counter.per_step == [2, 2]
    assert cb.totals["steps"] == 2  # counted afresh for the second run
    assert "get_batch_samples" not in first.__dict__  # the first trainer has its own method back


def test_a_step_that_bypasses_the_hook_stops_training():
    """If the Trainer ever fetched a step without the patched get_batch_samples, the step would be
    trained unpruned; QTuning raises before the optimizer step instead."""
    cb = QTuning(sample_ratio=0.25, token_ratio=0.5)
    trainer = sft_trainer([cb], ga=2, bs=4, steps=2)

    class Bypass(TrainerCallback):  # runs after QTuning attached: undoes its hook
        def on_train_begin(self, *a, **kw):
            trainer.get_batch_samples = trainer._qtuning_originals["get_batch_samples"]

    trainer.add_callback(Bypass())
    with pytest.raises(RuntimeError, match="optimizer step 1 was not fetched through"):
        trainer.train()


def test_ratio_one_leaves_the_trainers_loss_normalisation_alone():
    """At 1 x 1 nothing is pruned and the trainer must train exactly as without the plugin, also
    where it averages per-micro-batch losses (Axolotl 0.19 sets model_accepts_loss_kwargs=False)."""
    def run(callbacks):
        trainer = plain_trainer(callbacks, ga=2, bs=2, steps=3)
        trainer.model_accepts_loss_kwargs = False
        trainer.train()
        return trainer

    base = run([])
    ours = run([QTuning(sample_ratio=1, token_ratio=1)])
    assert ours.model_accepts_loss_kwargs is False
    torch.testing.assert_close(losses(ours), losses(base), rtol=1e-6, atol=0)
    pruned = run([QTuning(sample_ratio=0.5, token_ratio=1)])
    assert pruned.model_accepts_loss_kwargs is True  # pruning needs the step's token count


# ---------------------------------------------------------------- clear refusals

def test_positional_ratio_is_refused_with_what_to_write():
    with pytest.raises(ValueError, match=r"QTuning\(sample_ratio=0.25, token_ratio=0.5\)"):
        QTuning(0.25)


def test_torch_compile_is_refused_at_attach():
    trainer = sft_trainer([], steps=1)
    trainer.args.torch_compile = True
    with pytest.raises(ValueError, match="torch.compile.*torch_compile=False"):
        QTuning().attach(trainer)


def test_peft_prompt_learning_is_refused_at_attach():
    peft = pytest.importorskip("peft")
    tok = tiny_tokenizer()
    model = peft.get_peft_model(tiny_model("llama", vocab_size=len(tok)),
                                peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    trainer = sft_trainer([], steps=1, model=model)
    with pytest.raises(ValueError, match="PEFT prompt learning.*Use LoRA"):
        QTuning().attach(trainer)


def test_a_model_whose_forward_bypasses_its_backbone_module_is_scored_from_its_logits():
    """BartForCausalLM calls model.decoder directly, never its `model` wrapper: the scorer's hook on
    the backbone sees nothing (before: IndexError at step 1), so it is scored from its full logits;
    TRL's fused head, where SFTTrainer installs it, runs the wrapper itself and is used instead. The
    path is chosen at train start."""
    tok = tiny_tokenizer()
    cfg = transformers.BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=256, is_decoder=True,
                                  is_encoder_decoder=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  decoder_start_token_id=1)
    torch.manual_seed(0)
    model = transformers.BartForCausalLM(cfg)
    cb = QTuning(sample_ratio=0.25, token_ratio=0.5)
    trainer = sft_trainer([cb], ga=2, bs=4, steps=2, model=model)
    counter = TrainingRows(model)
    trainer.add_callback(counter)
    from qtuning_plugin.core.fused import fused_head_installed

    if fused_head_installed(model):  # TRL >= 1.16: its fused head calls the backbone's wrapper itself
        trainer.train()
        assert scoring.scoring_path(model) == "fused"
    else:
        with pytest.warns(UserWarning, match="does not run its backbone and output embedding modules"):
            trainer.train()
        assert scoring.scoring_path(model) == "logits"
    assert counter.per_step == [2, 2]


def test_a_checkpoint_holding_a_retired_field_reads_as_other_settings(tmp_path, caplog):
    """Saved arguments this version refuses (here a retired field) are settings other than the
    run's: the usual warning, and training resumes. A retired field in the user's own call is
    refused with what replaced it."""
    first = sft_trainer([QTuning(sample_ratio=0.5)], ga=2, bs=2, steps=2, save_strategy="steps", save_steps=2,
                        output_dir=str(tmp_path))
    first.train()
    state_file = tmp_path / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["stateful_callbacks"]["QTuning"]["args"]["top_up"] = "minmax"
    state_file.write_text(json.dumps(state))
    cb = QTuning(sample_ratio=0.5)
    resumed = sft_trainer([cb], ga=2, bs=2, steps=4, output_dir=str(tmp_path), save_strategy="no")
    with caplog.at_level(logging.WARNING, logger="qtuning_plugin.callback"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert "the checkpoint was trained with" in caplog.text and "'top_up': 'minmax'" in caplog.text
    assert cb.totals["steps"] == 4 and resumed.state.global_step == 4
    with pytest.raises(ValueError, match="QTuningConfig.top_up was removed"):
        QTuning(sample_ratio=0.5, top_up="minmax")
