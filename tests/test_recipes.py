"""The copy-and-run recipes work offline on CPU with a local model directory and a local jsonl."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tiny import arithmetic_dataset, tiny_model, tiny_tokenizer

pytest.importorskip("trl")
ROOT = pathlib.Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    tok = tiny_tokenizer()
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("fmt", ["alpaca", "prompt_completion"])
def test_trl_recipe_runs_offline_and_logs_pruning(model_dir, tmp_path, fmt):
    data = tmp_path / "train.jsonl"
    with data.open("w") as f:
        for r in arithmetic_dataset(40):
            row = {"instruction": r["prompt"], "input": "", "output": r["completion"]} if fmt == "alpaca" else r
            f.write(json.dumps(row) + "\n")
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "recipes" / "trl_sft_qtuning.py"), "--model", str(model_dir),
           "--dataset", str(data), "--output-dir", str(out), "--max-steps", "2", "--per-device-batch-size", "4",
           "--gradient-accumulation-steps", "2", "--logging-steps", "1", "--max-length", "128"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **OFFLINE}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((out / "log_history.json").read_text())
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 2
    for h in steps:
        assert h["qtuning/kept_samples"] == 2 and h["qtuning/pool_samples"] == 8  # 25 % of 4 x 2
        assert 0 < h["qtuning/kept_tokens_ratio"] < 1  # K of the pool, Q2 ones token-pruned
    assert (out / "adapter_model.safetensors").exists()


GPU_RECIPES = {  # file: (sample_ratio, base_model)
    "smollm2-1.7b-mathinstruct-qlora.yml": (0.25, "HuggingFaceTB/SmolLM2-1.7B"),
    "llama3-8b-wizardlm-qlora.yml": (0.125, "meta-llama/Meta-Llama-3-8B"),
    "mistral-7b-wizardlm-qlora.yml": (0.125, "mistralai/Mistral-7B-v0.1"),
}


@pytest.mark.parametrize("name", sorted(GPU_RECIPES))
def test_axolotl_recipes_have_the_papers_settings_and_a_valid_block(name):
    import yaml

    from qtuning_plugin import QTuningConfig

    cfg = yaml.safe_load((ROOT / "recipes" / "axolotl" / name).read_text())
    ratio, model = GPU_RECIPES[name]
    assert cfg["plugins"] == ["qtuning_plugin.QTuningPlugin"]
    assert QTuningConfig.from_dict(cfg["qtuning"]) == QTuningConfig(sample_ratio=ratio, token_ratio=0.5)
    assert cfg["base_model"] == model
    assert (cfg["adapter"], cfg["load_in_4bit"], cfg["lora_r"]) == ("qlora", True, 8)
    assert (cfg["micro_batch_size"], cfg["gradient_accumulation_steps"], cfg["sequence_len"]) == (8, 4, 2048)
    assert (cfg["num_epochs"], cfg["learning_rate"], cfg["lr_scheduler"]) == (3, 1e-4, "cosine")
    assert cfg["sample_packing"] is False and cfg["train_on_inputs"] is False


def test_custom_loop_recipe_runs():
    """recipes/custom_loop.py: Q-Tuning in a plain Accelerate loop, on the demo's data."""
    cmd = [sys.executable, str(ROOT / "recipes" / "custom_loop.py"), "--model", "tiny", "--steps", "2",
           "--batch-size", "4", "--grad-accum", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **OFFLINE}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [x for x in proc.stdout.splitlines() if x.startswith("step ")]
    assert len(lines) == 2 and all("trained 2 of 8 rows" in x for x in lines), proc.stdout
