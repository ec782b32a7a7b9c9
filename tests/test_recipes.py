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
        assert 0 < h["qtuning/kept_tokens_ratio"] < 0.25
    assert (out / "adapter_model.safetensors").exists()
