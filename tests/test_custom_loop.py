"""`core.select_step` in a plain Accelerate loop (recipes/custom_loop.py) trains what the Trainer
callback trains: on the same fetched batches, the same kept rows and the same gradients."""

import copy
import importlib.util
import pathlib
import tempfile

import datasets
import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from qtuning_plugin import QTuning
from qtuning_plugin.core import QTuningConfig, build_rules, label_tokens, select_step
from tiny import arithmetic_dataset, tiny_model, tiny_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def recipe():
    spec = importlib.util.spec_from_file_location("custom_loop", ROOT / "recipes" / "custom_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows(tok, n=16):
    out = []
    for r in arithmetic_dataset(n):
        p, c = tok(r["prompt"])["input_ids"], tok(r["completion"])["input_ids"]
        out.append({"input_ids": p + c, "attention_mask": [1] * (len(p) + len(c)), "labels": [-100] * len(p) + c})
    return out


def model_for(fields, vocab_size):
    model = tiny_model("llama", vocab_size=vocab_size)
    if fields.get("reference") == "base":
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    return model.train()


class Capture(TrainerCallback):
    grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fields", [{}, {"reference": "base"}, {"preset": "small-loss"},
                                    {"drop_ppl_outliers": 1.0, "keep_tokens": "highest"},
                                    {"keep_tokens": "highest", "token_budget": "batch"}])
def test_custom_loop_trains_what_the_callback_trains(fields):
    fields = {"sample_ratio": 0.75, **fields}  # 6 of 8 kept: two micro-batches, so the token count matters
    from accelerate import Accelerator

    tok = tiny_tokenizer()
    model = model_for(fields, len(tok))
    start = copy.deepcopy(model.state_dict())
    seen = {}

    class Recording(QTuning):
        def on_step_end(self, args, state, control, **kwargs):
            super().on_step_end(args, state, control, **kwargs)
            result = self.last_step
            seen["fetched"] = [{k: v.clone() for k, v in b.items()} for b in result.scored]
            seen["trained"] = result.micro_batches
            seen["excluded"] = result.decision.excluded

    capture = Capture()
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             max_steps=1, report_to=[], use_cpu=True, save_strategy="no", max_grad_norm=0.0,
                             bf16=False, dataloader_drop_last=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows(tok)),
                      data_collator=__import__("transformers").DataCollatorForSeq2Seq(tok, padding=True),
                      callbacks=[capture, Recording(fields)])
    trainer.train()

    model.load_state_dict(start)  # the weights the captured gradients were taken at
    model.zero_grad()
    config = QTuningConfig.from_dict(fields)
    accelerator = Accelerator(cpu=True)
    kept = recipe().qtuning_step(model, seen["fetched"], config, accelerator, rules=build_rules(config))

    assert len(kept.micro_batches) == len(seen["trained"])
    if "drop_ppl_outliers" in fields:  # the rule held some sample back, or this case tests nothing new
        assert seen["excluded"].any()
    if "preset" not in fields and "reference" not in fields:  # (the guard may leave one micro-batch)
        assert len(kept.micro_batches) == 2
    for ours, theirs in zip(kept.micro_batches, seen["trained"]):
        assert torch.equal(ours["input_ids"], theirs["input_ids"])
        assert torch.equal(ours["labels"], theirs["labels"])
    assert kept.num_label_tokens < sum(int((b["labels"][:, 1:] != -100).sum()) for b in seen["fetched"])
    assert kept.num_label_tokens == label_tokens(kept.micro_batches)  # the host count is the batches' count
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == capture.grads.keys() and grads
    for name, g in grads.items():
        ref = capture.grads[name]
        assert float((g - ref).norm() / ref.norm().clamp_min(1e-12)) < 1e-6, name


def test_select_step_asks_for_what_it_needs():
    tok = tiny_tokenizer()
    batch = {k: torch.tensor([v]) for k, v in rows(tok, 1)[0].items()}
    model = tiny_model("llama", vocab_size=len(tok))
    with pytest.raises(ValueError, match=r"keeps state across steps: pass rules=build_rules\(config\)"):
        select_step(model, [batch], QTuningConfig(reference="base"))
    with pytest.raises(ValueError, match="no micro-batches"):
        select_step(model, [], QTuningConfig())
    whole = select_step(model, [batch], QTuningConfig(sample_ratio=1, token_ratio=1))
    assert not whole.pruned and whole.micro_batches == [batch] and whole.scores is None
    assert whole.num_label_tokens == int((batch["labels"][:, 1:] != -100).sum())


def test_select_step_is_score_decide_train_and_train_kept_wants_a_whole_decision():
    """select_step = score_step + decide_step + train_kept, the parts usable apart; train_kept
    refuses a decision without its host statistics, its kept-token count or one entry per
    micro-batch (before: select_step filled them in behind a decide_fn that left them out)."""
    import dataclasses

    from qtuning_plugin.core.step import decide_step, score_step, train_kept

    tok = tiny_tokenizer()
    collate = __import__("transformers").DataCollatorForSeq2Seq(tok, padding=True)
    data = rows(tok, 8)
    batches = [collate(data[:4]), collate(data[4:])]
    model = tiny_model("llama", vocab_size=len(tok))
    config = QTuningConfig(sample_ratio=0.5)
    whole = select_step(model, batches, config)
    scored = score_step(model, batches, config)
    decision = decide_step(scored.scores, config, inputs=scored.inputs)
    parts = train_kept(scored, decision)
    assert parts.num_label_tokens == whole.num_label_tokens == decision.kept_tokens
    for a, b in zip(parts.micro_batches, whole.micro_batches, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    for incomplete in (dataclasses.replace(decision, host=None), dataclasses.replace(decision, kept_tokens=None),
                       dataclasses.replace(decision, keep=decision.keep[:1])):
        with pytest.raises(ValueError, match="train_kept: the decision needs"):
            train_kept(scored, incomplete)


def test_a_subclass_decides_through_decide_and_reads_last_step():
    """``QTuning.decide`` is the hook a subclass overrides (here: the first sample of each
    micro-batch, all its tokens) and ``QTuning.last_step`` shows the step after it."""
    from test_trl import TrainingRows, sft_trainer

    from qtuning_plugin.core import StepDecision, host_stats

    class FirstOfEach(QTuning):
        def decide(self, scores, inputs):
            keep = [torch.arange(s.ppl.numel()) == 0 for s in scores]
            token_keep = [s.trainable & k[:, None].to(s.trainable.device) for s, k in zip(scores, keep)]
            return StepDecision(keep, [torch.zeros_like(k) for k in keep], token_keep, [0.0],
                                int(sum(int(t.sum()) for t in token_keep)), host_stats(scores))

    seen = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(cb.last_step)

    cb = FirstOfEach(sample_ratio=0.5)
    trainer = sft_trainer([cb, Watch()], ga=2, bs=4, steps=2)
    counter = TrainingRows(trainer.model)
    trainer.add_callback(counter)
    trainer.train()
    assert counter.per_step == [2, 2] and len(seen) == 2 and seen[0] is not seen[1]
    for step in seen:
        assert [k.tolist() for k in step.decision.keep] == [[True, False, False, False]] * 2
        firsts = [b["input_ids"][0][b["attention_mask"][0].bool()] for b in step.scored]
        trained = [r[m.bool()] for b in step.micro_batches for r, m in zip(b["input_ids"], b["attention_mask"])]
        assert sorted(map(tuple, (t.tolist() for t in trained))) == sorted(map(tuple, (f.tolist() for f in firsts)))
