"""The modules inside what a trainer calls: DDP / DeepSpeed (``.module``), torch.compile
(``._orig_mod``) and PEFT (``get_base_model()``) wrappers, walked in one place."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn


def wrapped_modules(model: nn.Module) -> Iterator[nn.Module]:
    """``model``, then each module it wraps, outermost first, down to the innermost one."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        yield model
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # PEFT
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP, DeepSpeed engine
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` module inside DDP / DeepSpeed, torch.compile and PEFT wrappers."""
    *_, inner = wrapped_modules(model)
    return inner
