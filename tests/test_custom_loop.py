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
        def _record(self, result):
            super()._record(result)
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
