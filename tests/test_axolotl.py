"""Real `axolotl train` runs on CPU, offline, with the plugin (tests/run.sh runs this file in the
axolotl-0.21 and axolotl-0.19 environments)."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import yaml

from tiny import arithmetic_dataset, tiny_model, tiny_tokenizer

axolotl = pytest.importorskip("axolotl")
BIN = pathlib.Path(sys.executable).parent
RECIPE = pathlib.Path(__file__).resolve().parents[1] / "recipes" / "axolotl" / "tiny-cpu-lora.yml"
PLUGIN = "qtuning_plugin.QTuningPlugin"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("axolotl-assets")
    tok = tiny_tokenizer()
    # 4-bit blocks need dimensions of 64 and more
    tiny_model("llama", vocab_size=len(tok), hidden_size=128, intermediate_size=256, head_dim=32).save_pretrained(
        root / "model")
    tok.save_pretrained(root / "model")
    with (root / "train.jsonl").open("w") as f:
        for r in arithmetic_dataset(64):
            f.write(json.dumps({"instruction": r["prompt"], "input": "", "output": r["completion"]}) + "\n")
    return root


def run(assets, tmp_path, **changes):
    """`axolotl train` on the tiny CPU recipe with `changes` applied (None deletes a key)."""
    cfg = yaml.safe_load(RECIPE.read_text())
    cfg.update(base_model=str(assets / "model"), output_dir=str(tmp_path / "out"),
               dataset_prepared_path=str(tmp_path / "prepared"))
    cfg["datasets"][0]["path"] = str(assets / "train.jsonl")
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled", "AXOLOTL_DO_NOT_TRACK": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets")}
    proc = subprocess.run([str(BIN / "axolotl"), "train", str(path)], capture_output=True, text=True, env=env,
                          timeout=900)
    return proc, tmp_path / "out"


def log_history(out):
    state = sorted(out.glob("checkpoint-*/trainer_state.json"))[-1]
    return [h for h in json.loads(state.read_text())["log_history"] if "loss" in h]


@pytest.mark.parametrize("adapter", ["lora", "qlora"])
def test_train_with_the_plugin_prunes_every_step(assets, tmp_path, adapter):
    log = tmp_path / "decisions.jsonl"
    changes = {"adapter": adapter,
               "qtuning": {"sample_ratio": 0.25, "token_ratio": 0.5, "log_decisions": str(log)}}
    if adapter == "qlora":  # and the reference guard: its base forwards on a 4-bit model
        changes["load_in_4bit"] = True
        changes["qtuning"]["reference"] = "base"
    proc, out = run(assets, tmp_path, **changes)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (out / "adapter_model.safetensors").exists()
    steps = log_history(out)
    assert len(steps) == 3
    for h in steps:  # micro-batch 2 x GA 2 = pool 4, 25 % -> K = 1
        assert h["qtuning/kept_samples"] == 1 and h["qtuning/pool_samples"] == 4
        assert 0 < h["qtuning/kept_tokens_ratio"] < 1  # K of the pool, Q2 ones token-pruned
        assert ("qtuning/suspected_samples" in h) == (adapter == "qlora")
    # listed in `plugins:` and (Axolotl >= 0.21) registered as an entry point: loaded once
    assert (proc.stdout + proc.stderr).count(f"Plugin loaded successfully: {PLUGIN}") == 1
    rows = [json.loads(line) for line in log.read_text().splitlines()]  # the block's log_decisions
    assert [r["step"] for r in rows] == [1] * 4 + [2] * 4 + [3] * 4
    assert [sum(r["kept"] for r in rows if r["step"] == s) for s in (1, 2, 3)] == [1, 1, 1]


def test_static_prune_output_trains_in_axolotl(assets, tmp_path):
    """`qtuning analyze` then `qtuning prune` on Alpaca data; Axolotl reads the result as a
    pre-tokenized json dataset (no `type:`) and trains on exactly our labels."""
    from qtuning_plugin import cli

    scores, pruned = tmp_path / "scores.jsonl", tmp_path / "pruned.jsonl"
    assert cli.main(["analyze", "--model", str(assets / "model"), "--data", str(assets / "train.jsonl"),
                     "--out", str(scores)]) == 0
    assert cli.main(["prune", "--scores", str(scores), "--data", str(assets / "train.jsonl"), "--out", str(pruned),
                     "--sample-ratio", "0.5", "--token-ratio", "0.5"]) == 0
    rows = [json.loads(line) for line in pruned.read_text().splitlines()]
    assert len(rows) == 32
    proc, out = run(assets, tmp_path / "run", plugins=None, qtuning=None,
                    datasets=[{"path": str(pruned), "ds_type": "json"}])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (out / "adapter_model.safetensors").exists()
    import datasets

    prepared = [d for d in (tmp_path / "run" / "prepared").glob("*") if d.is_dir()]
    ds = datasets.load_from_disk(str(prepared[0]))
    assert sorted(map(tuple, ds["labels"])) == sorted(tuple(r["labels"]) for r in rows)


def test_misspelt_key_fails_before_the_model_loads(assets, tmp_path):
    proc, _ = run(assets, tmp_path, qtuning={"sample_ratio": 0.25, "token_ratoi": 0.5})
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "unknown field(s) ['token_ratoi']" in log
    assert "Loading weights" not in log and "Loading raw datasets" not in log


def test_retired_key_says_what_replaced_it():
    """In the block's validation (which stops `axolotl train` before anything loads, as the misspelt
    key above shows): one line naming the key and what replaced it."""
    import pydantic

    from qtuning_plugin.axolotl import QTuningPluginArgs

    with pytest.raises(pydantic.ValidationError, match="QTuningConfig.reference_sticky was removed: the reference "
                                                        "guard judges each sighting afresh"):
        QTuningPluginArgs(qtuning={"sample_ratio": 0.25, "reference_sticky": True})
    with pytest.raises(pydantic.ValidationError, match="QTuningConfig.preset 'robust' is retired"):
        QTuningPluginArgs(qtuning={"preset": "robust"})
    assert QTuningPluginArgs(qtuning={"preset": "small-loss"}).qtuning["drop_highest_ppl"] == 0.25


def test_out_of_range_value_names_the_key(assets, tmp_path):
    proc, _ = run(assets, tmp_path, qtuning={"sample_ratio": 1.5})
    assert proc.returncode != 0
    assert "QTuningConfig.sample_ratio must be a number in (0, 1], got 1.5" in proc.stdout + proc.stderr


def test_misspelt_block_name_is_caught(assets, tmp_path):
    proc, _ = run(assets, tmp_path, qtuning=None, qtunning={"sample_ratio": 0.25})
    assert proc.returncode != 0
    assert "unknown config key 'qtunning': did you mean 'qtuning'?" in proc.stdout + proc.stderr


def test_sample_packing_prunes_segments(assets, tmp_path):
    """Axolotl's multipack (segment ids in attention_mask): every step keeps exactly K samples
    (segments) of its pool, and the re-packed batches train."""
    proc, out = run(assets, tmp_path, sample_packing=True, micro_batch_size=1, sequence_len=1024,
                    eval_sample_packing=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    steps = log_history(out)
    assert len(steps) == 3
    for h in steps:
        assert h["qtuning/pool_samples"] > 2  # 1 bin x GA 2, several samples per bin
        assert h["qtuning/kept_samples"] == max(1, int(0.25 * h["qtuning/pool_samples"]))


@pytest.mark.parametrize("changes, message", [
    ({"rl": "dpo"}, "this is an RL / preference run (rl: dpo)"),
    ({"context_parallel_size": 2}, "sequence / context parallelism (context_parallel_size: 2)"),
    ({"sequence_parallel_degree": 4}, "sequence / context parallelism"),
])
def test_unsupported_settings_are_refused_when_the_block_is_present(changes, message):
    # (A one-process CPU run can't reach these: Axolotl itself rejects them first there.)
    from qtuning_plugin.axolotl import check_axolotl_config

    with pytest.raises(ValueError, match=re.escape(message)):
        check_axolotl_config({"qtuning": {"sample_ratio": 0.25}, **changes})
    check_axolotl_config(changes)  # without the block: not our business


def test_short_plugin_name_is_rejected_by_axolotl(assets, tmp_path):
    """README: `plugins: [qtuning]` is not a plugin path; write qtuning_plugin.QTuningPlugin."""
    proc, _ = run(assets, tmp_path, plugins=["qtuning"])
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "not enough values to unpack" in log


def test_without_a_qtuning_block_the_plugin_is_inert(assets, tmp_path):
    """Listed without a block (on Axolotl >= 0.21 it is also always loaded through its entry
    point), the plugin does not touch the run: no callback, no patched method, no metric.
    (Two CPU runs of Axolotl with the same seed do not give bitwise-equal adapters, so the
    comparison with a run without the plugin is made on what the plugin could change.)"""
    proc, out = run(assets, tmp_path, qtuning=None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapter_model.safetensors").exists()
    assert all(not any(k.startswith("qtuning/") for k in h) for h in log_history(out))

    from transformers import Trainer, TrainingArguments

    from qtuning_plugin import QTuningPlugin
    from qtuning_plugin.axolotl import QTuningPluginArgs
    from tiny import tiny_model as build

    trainer = Trainer(model=build("llama"), args=TrainingArguments(output_dir=str(tmp_path / "t"), report_to=[],
                                                                  use_cpu=True))
    before = (trainer.get_batch_samples, trainer.training_step, trainer.log, list(trainer.callback_handler.callbacks))
    plugin = QTuningPlugin()
    cfg = {"base_model": "x", "sample_packing": True, "rl": None}
    plugin.register(cfg)
    plugin.pre_model_load(cfg)
    assert plugin.add_callbacks_post_trainer(cfg, trainer) == []
    after = (trainer.get_batch_samples, trainer.training_step, trainer.log, list(trainer.callback_handler.callbacks))
    assert after == before and "_qtuning_originals" not in trainer.__dict__
    assert QTuningPluginArgs().qtuning is None


def test_composes_with_another_plugin(assets, tmp_path):
    """Next to Liger's plugin in one config: schemas merge, both load, training runs and prunes.
    (Liger's kernels are Triton GPU kernels, so none is switched on here, on CPU.)"""
    pytest.importorskip("liger_kernel")
    proc, out = run(assets, tmp_path, plugins=["axolotl.integrations.liger.LigerPlugin", PLUGIN])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert all(h["qtuning/kept_samples"] == 1 for h in log_history(out))
