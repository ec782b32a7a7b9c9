"""TRL's fused LM head (``SFTTrainer`` >= 1.16 installs it): per-token log-probabilities and
entropies from a forward that never builds the logits; one of the scoring paths of :mod:`.heads`."""

from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = -100


def fused_head_installed(lm: nn.Module) -> bool:
    """Whether TRL's ``add_fused_lm_head`` (TRL >= 1.16's ``SFTTrainer`` installs it) patched this
    model's forward: ``model(..., labels=..., fused_lm_head=True)`` then returns per-token
    log-probabilities and entropies without building the logits."""
    fn = lm.__dict__.get("forward")
    for _ in range(16):  # through wrappers that keep __wrapped__ (accelerate's autocast and fp32 outputs)
        fn = getattr(fn, "__func__", fn)
        code = getattr(fn, "__code__", None)
        if code is not None and "fused_lm_head" in code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]:
            return True
        fn = getattr(fn, "__wrapped__", None)
        if fn is None:
            return False
    return False


def score_fused(model, inputs, labels, trainable, at: tuple[torch.Tensor, torch.Tensor]):
    """nll and entropy (float32, flat) at the positions ``at`` (see :mod:`.heads`), from one forward
    through TRL's fused head (``trainable`` [B, T]: the labels it is given, the rest masked)."""
    out = model(**inputs, labels=labels.masked_fill(~trainable, IGNORE_INDEX), fused_lm_head=True, use_cache=False)
    if getattr(out, "log_probs", None) is None or getattr(out, "entropy", None) is None:
        raise RuntimeError("score_batch: TRL's fused LM head returned no entropy (installed without "
                           "outputs=('log_probs', 'entropy', ...))")
    return (-out.log_probs[at[0], at[1]]).float(), out.entropy[at[0], at[1]].float()


def fused_head_is_compact(device: torch.device) -> bool:
    """Whether TRL's fused head projects only the labelled positions on ``device``: with Triton on
    CUDA / XPU. Elsewhere (CPU) it projects every position, prompt and padding included, in large
    tiles: slower and more memory than our head (benchmarks/speed.py --scoring)."""
    from importlib.util import find_spec

    return device.type in ("cuda", "xpu") and find_spec("triton") is not None
