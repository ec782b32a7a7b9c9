"""A rule declares its metric and its decision-log field once (core/rules/); every front end follows:
the logged metrics, the decision log, the live picture's rows, README's and docs/usage.md's table.
Every rule class is walked, so a new rule module is checked here without an edit."""

import itertools
import pathlib
import tempfile

import datasets
import pytest
import torch

from qtuning_plugin import QTuning, QTuningConfig
from qtuning_plugin.core.rules import rule_classes
from qtuning_plugin.decision_log import read_log, rule_fields, rules_table
from qtuning_plugin.live import pool_rows
from tiny import arithmetic_dataset, tiny_model, tiny_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
RULES = rule_classes()


def turning_on(rule) -> dict:
    """Option values that turn ``rule`` on (``is_active``), found from its options' declarations
    alone: another choice, or a number, for each of its options in turn."""
    def candidates(option):
        if option.kind == "choice":
            return [c for c in option.choices if c != option.default]
        return [v for v in (0.25, 0.5, 1.0, 2.0) if v != option.default]

    names = [o.name for o in rule.options]
    for values in itertools.product(*[[o.default, *candidates(o)] for o in rule.options]):
        fields = dict(zip(names, values))
        try:
            config = QTuningConfig(**fields)
        except ValueError:
            continue
        if rule.is_active(config):
            return fields
    raise AssertionError(f"no value of {names} turns {rule.__name__} on")


def lora_model(vocab_size):
    """A tiny Llama with LoRA adapters (the reference guard's base is the model with them off)."""
    peft = pytest.importorskip("peft")
    base = tiny_model("llama", vocab_size=vocab_size)
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                             task_type="CAUSAL_LM")
    return peft.get_peft_model(base, config)


def test_every_rule_declares_a_metric_and_a_field():
    assert RULES, "no rule found"
    for rule in RULES:
        assert rule.metric and rule.log_field and rule.name and rule.options, rule.__name__
        assert rule.log_field not in ("step", "rank", "id", "ppl", "entropy", "quadrant", "kept", "kept_tokens",
                                      "n_tokens"), rule.__name__
    assert set(rule_fields()) == {rule.log_field for rule in RULES}
    assert "surprising" in rule_fields()  # drop_surprising's, missing from every front end before


@pytest.mark.parametrize("rule", RULES, ids=[r.__name__ for r in RULES])
def test_a_rule_that_is_on_reaches_the_metrics_the_decision_log_and_the_picture(rule, tmp_path):
    trl = pytest.importorskip("trl")
    tok = tiny_tokenizer()
    log = tmp_path / "decisions.jsonl"
    callback = QTuning(sample_ratio=0.5, token_ratio=0.5, log_decisions=str(log), plot_every=0, **turning_on(rule))
    assert any(isinstance(r, rule) for r in callback.rules)
    args = trl.SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=8, max_steps=2, report_to=[],
                         use_cpu=True, save_strategy="no", logging_steps=1, seed=0, bf16=False,
                         dataloader_drop_last=True, learning_rate=5e-3, lr_scheduler_type="constant")
    trainer = trl.SFTTrainer(model=lora_model(len(tok)), args=args, processing_class=tok, callbacks=[callback],
                             train_dataset=datasets.Dataset.from_list(arithmetic_dataset(16)))
    trainer.train()

    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(f"qtuning/{rule.metric}" in h for h in logged)
    rows = read_log(log)
    assert {r["step"] for r in rows} == {1, 2} and all(isinstance(r.get(rule.log_field), bool) for r in rows)
    assert sum(h[f"qtuning/{rule.metric}"] for h in logged) == sum(r[rule.log_field] for r in rows)
    picture = pool_rows(callback.last_pool)
    assert len(picture) == 8 and all(isinstance(r.get(rule.log_field), bool) for r in picture)
    assert [r[rule.log_field] for r in picture] == [r[rule.log_field] for r in rows if r["step"] == 2]


@pytest.mark.parametrize("doc", ["README.md", "docs/usage.md"])
def test_the_docs_rule_table_is_the_generated_one(doc):
    """README's and docs/usage.md's table of the rules' metrics and fields is `rules_table()`,
    verbatim (regenerate it with `python -m qtuning_plugin.decision_log` after adding a rule)."""
    text = (ROOT / doc).read_text()
    block = text.split("<!-- rule-metrics:start -->")[1].split("<!-- rule-metrics:end -->")[0]
    assert block.strip() == rules_table()
    for rule in RULES:
        assert f"`qtuning/{rule.metric}`" in block and f"`{rule.log_field}`" in block
