"""How one no-grad forward yields the next-token statistics (NLL, entropy) at chosen positions,
and which way a model gets (decided once per model, :func:`choose_scoring_path`):

- "head": our chunked head, run inside the model's forward from the backbone's last hidden state
  (a forward hook) and the output embedding as the forward gathered it (a pre-hook);
- "fused": TRL's fused LM head, where ``SFTTrainer`` installed it;
- "logits": the model's own full logits, when neither head reproduces them.

Positions are given as ``at`` = (rows, cols), long tensors on the model's device: the prediction
at column c of row r is the one for ``labels[r, c + 1]`` (index tensors, not boolean masks, so that
no call here waits for the device to count them).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from typing import Callable, Mapping

import torch
from torch import nn

from .fused import fused_head_installed, fused_head_is_compact, score_fused
from .wrappers import unwrap_causal_lm

Positions = tuple[torch.Tensor, torch.Tensor]

def _backbone_and_head(lm: nn.Module) -> tuple[nn.Module, nn.Module]:
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    prefix = getattr(lm, "base_model_prefix", "")
    backbone = getattr(lm, prefix, None) if prefix else None
    if not isinstance(head, nn.Module) or not isinstance(backbone, nn.Module):
        raise TypeError(
            f"score_batch: {type(lm).__name__} is not a causal LM with an output embedding "
            "(get_output_embeddings()) and a backbone (base_model_prefix)"
        )
    return backbone, head


def _logit_postprocess(lm: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the model's own forward does to lm_head's output, for the known cases
    (Gemma 2/3 final softcapping, Cohere logit_scale, Granite logits_scaling). Anything else is
    caught by the check against the model's own logits in :func:`score_batch`."""
    cfg = getattr(lm, "config", None)
    cap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(lm, "logit_scale", None)
    divisor = getattr(cfg, "logits_scaling", None)
    steps = []
    if isinstance(scale, (int, float)) and scale != 1:
        steps.append(lambda z: z * scale)
    if isinstance(divisor, (int, float)) and divisor != 1:
        steps.append(lambda z: z / divisor)
    if cap:
        steps.append(lambda z: torch.tanh(z / cap) * cap)

    def apply(z: torch.Tensor) -> torch.Tensor:
        for step in steps:
            z = step(z)
        return z

    return apply


# The scoring path of each model, decided once by :func:`choose_scoring_path` (the callback calls it at
# attach; otherwise the first scoring call does): "fused" (TRL's fused LM head, where it is installed,
# reproduces the model's logits and is compact, or where ours does not reproduce them), "head" (our
# chunked head, run inside the model's forward), or "logits" (the model's full logits, when neither
# head reproduces them).
PATHS = ("fused", "head", "logits")
_PATH: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
_WARNED: set[str] = set()


def scoring_path(model: nn.Module) -> str | None:
    """How :func:`~.scoring.score_batch` scores ``model`` (one of :data:`PATHS`), or None before it is decided."""
    return _PATH.get(unwrap_causal_lm(model))


def _head_fn(head: nn.Module, post: Callable, hidden_dtype: torch.dtype, device: torch.device):
    """lm_head + post-processing, called from inside the model's forward: under the autocast the
    forward runs under (accelerate's mixed-precision wrapper, say), else in the weight's dtype.

    A plain ``nn.Linear`` head (also FSDP2's) is applied as ``F.linear`` on its weight as it is
    inside the forward (gathered by FSDP / ZeRO-3), without calling the module again, since a
    second call would run the sharding hooks again (and re-shard the weight before the model's own
    call). FSDP2 may still hand out a DTensor: it is gathered, as TRL's fused head does."""
    weight = getattr(head, "weight", None)
    half = (torch.bfloat16, torch.float16)
    outside_autocast = not torch.is_autocast_enabled(device.type)
    mixed = (
        isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.dtype != hidden_dtype
        and outside_autocast
    )
    if mixed and hidden_dtype in half:  # half-precision hidden states: the head runs in half too
        ctx = lambda: torch.autocast(device.type, dtype=hidden_dtype)  # noqa: E731
        cast = None
    elif mixed:
        ctx, cast = contextlib.nullcontext, weight.dtype
    else:
        ctx, cast = contextlib.nullcontext, None
    if isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward:
        w, b = head.weight, head.bias
        if hasattr(w, "full_tensor"):  # a DTensor (FSDP2): gather it once, on every rank alike
            w = w.full_tensor()
            b = b.full_tensor() if hasattr(b, "full_tensor") else b
        project = lambda h: torch.nn.functional.linear(h, w, b)  # noqa: E731
    else:
        project = head

    def fn(h: torch.Tensor) -> torch.Tensor:
        with ctx():
            return post(project(h if cast is None else h.to(cast)))

    return fn


def _token_stats(
    logits_rows: Callable[[int, int], torch.Tensor], n: int, targets: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """nll and entropy (float32 [n]) of n next-token distributions, ``chunk_size`` rows of logits
    at a time: peak extra memory is about 3 x chunk_size x V floats."""
    nll = torch.empty(n, dtype=torch.float32, device=targets.device)
    ent = torch.empty(n, dtype=torch.float32, device=targets.device)
    for start in range(0, n, chunk_size):
        end = min(n, start + chunk_size)
        logp = torch.log_softmax(logits_rows(start, end).float(), dim=-1)
        nll[start:end] = -logp.gather(1, targets[start:end, None]).squeeze(1)
        p = logp.exp()
        ent[start:end] = -p.mul_(logp).nan_to_num_(nan=0.0).sum(-1)  # 0 * log 0 = 0
        del logp, p
    return nll, ent


def forward_inputs(batch: Mapping[str, torch.Tensor]) -> dict:
    """What a scoring forward passes to the model: ``input_ids``, ``attention_mask``, ``position_ids``
    and the varlen metadata of packed batches, when present (never ``labels``)."""
    keys = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k",
            "max_length_q", "max_length_k", "seq_idx")
    return {k: batch[k] for k in keys if batch.get(k) is not None}


_TAKES_LOGITS_TO_KEEP: "weakref.WeakKeyDictionary[nn.Module, tuple[object, bool]]" = weakref.WeakKeyDictionary()


def _forward_kwargs(lm: nn.Module, inputs: Mapping, logits_to_keep: int) -> dict:
    kwargs = {**inputs, "use_cache": False}
    forward = lm.__dict__.get("forward", type(lm).forward)  # (TRL patches the instance's forward)
    cached = _TAKES_LOGITS_TO_KEEP.get(lm)
    if cached is None or cached[0] is not forward:  # the signature, read once per model (and patch)
        params = inspect.signature(lm.forward).parameters
        cached = (forward, "logits_to_keep" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()))
        _TAKES_LOGITS_TO_KEEP[lm] = cached
    if cached[1]:
        kwargs["logits_to_keep"] = logits_to_keep
    return kwargs


def forward_with_head(model, lm, inputs, at: Positions, targets, chunk_size):
    """One forward of ``model`` (logits for the last position only) in which our head computes the
    statistics at ``trainable``: ((nll, entropy), whether the head ran in half precision), or None when the forward did not run the backbone and head modules (e.g. ``BartForCausalLM``
    calls ``model.decoder`` directly)."""
    backbone, head = _backbone_and_head(lm)
    post = _logit_postprocess(lm)
    state: dict = {}

    def on_backbone(module, args, out):
        state["hidden"] = out[0]

    def on_head(module, args):  # before the model's own head call: the weight is gathered here
        hidden = state.get("hidden")
        if state.get("busy") or "stats" in state or not isinstance(hidden, torch.Tensor):
            return
        state["busy"] = True  # a head that is not a plain Linear is called again below
        try:
            fn = _head_fn(module, post, hidden.dtype, hidden.device)
            selected = hidden[at[0], at[1]]
            state["stats"] = _token_stats(lambda s, e: fn(selected[s:e]), targets.numel(), targets, chunk_size)
            state["low"] = hidden.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled(
                hidden.device.type) or getattr(getattr(module, "weight", None), "dtype", None) in (torch.bfloat16, torch.float16)
        finally:
            state["busy"] = False
        del state["hidden"]

    handles = [backbone.register_forward_hook(on_backbone), head.register_forward_pre_hook(on_head)]
    try:
        model(**_forward_kwargs(lm, inputs, logits_to_keep=1))
    finally:
        for h in handles:
            h.remove()
    if "stats" not in state:
        return None
    return state["stats"], state["low"]


def _close(a: torch.Tensor, b: torch.Tensor, low_precision: bool) -> bool:
    rtol = 3e-2 if low_precision else 1e-4
    return a.shape == b.shape and bool(((a.float() - b.float()).abs().max() <= rtol * (1.0 + b.float().abs().max())).item())


def _verdict(model, lm) -> tuple[str, str | None]:
    """(path, why the model's full logits are needed or None), from an 8-token probe: the model's
    full logits (the truth), our head inside the forward, and TRL's fused head where installed.
    Among the heads that reproduce the truth: TRL's where its kernel is compact (Triton), else ours,
    else TRL's (it knows post-processings ours does not)."""
    param = next(lm.parameters())
    vocab = int(getattr(lm.config, "vocab_size", 0) or 0) or 8
    ids = (torch.arange(1, 9, device=param.device) % vocab)[None]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    trainable = torch.ones_like(ids, dtype=torch.bool)
    trainable[:, 0] = False  # (every label of the probe is trained but the first)
    at = trainable[:, 1:].nonzero(as_tuple=True)
    targets = ids[at[0], at[1] + 1]
    out = model(**_forward_kwargs(lm, inputs, logits_to_keep=0))
    logits = getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.shape[1] != ids.shape[1]:
        return "head", None  # nothing to compare with: trust the head
    truth = _token_stats(lambda s, e: logits[0, :-1][s:e], targets.numel(), targets, 8)
    low = logits.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled(param.device.type)
    got = forward_with_head(model, lm, inputs, at, targets, 8)
    low = low or (got is not None and got[1])
    head_ok = got is not None and all(_close(a, b, low) for a, b in zip(got[0], truth))
    fused_ok = False
    if fused_head_installed(lm):
        try:
            fused = score_fused(model, inputs, ids, trainable, at)
        except (RuntimeError, TypeError) as err:  # an older or foreign patch: not used
            warnings.warn(f"qtuning: TRL's fused LM head could not score ({err}); not using it", stacklevel=4)
        else:
            fused_ok = all(_close(a, b, low) for a, b in zip(fused, truth))
    if fused_ok and (fused_head_is_compact(param.device) or not head_ok):
        return "fused", None
    if head_ok:
        return "head", None
    return "logits", _BYPASS if got is None else _MISMATCH


_BYPASS = "does not run its backbone and output embedding modules, so the scorer cannot read its last hidden state"
_MISMATCH = "post-processes its logits in a way the scorer does not reproduce"


def _set_path(lm: nn.Module, path: str, why_not: str | None) -> None:
    _PATH[lm] = path
    if why_not is None:
        return
    name = type(lm).__name__
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(
            f"qtuning: {name}'s forward {why_not}; scoring from the model's full logits instead "
            "(more memory).",
            stacklevel=4,
        )


@torch.no_grad()
def choose_scoring_path(model: nn.Module, agree: Callable[[bool], bool] | None = None, path: str | None = None) -> str:
    """Decide once, before training, how :func:`~.scoring.score_batch` scores ``model`` (one of
    :data:`PATHS`), by probe forwards on 8 tokens compared with the model's own full logits.
    ``agree`` turns "this process would not need the full logits" into the answer every process
    uses (the callback passes an all-reduce, so that no rank runs other forwards than the rest).
    Call it in :func:`scoring_mode`, through the wrapper training uses.

    ``path`` (one of :data:`PATHS`) forces that path without a probe, for benchmarks and tests that
    compare the paths on one model; the scores are then only as right as that path is for it."""
    lm = unwrap_causal_lm(model)
    _backbone_and_head(lm)  # refuse a model that is no causal LM before any forward
    if path is not None:
        if path not in PATHS:
            raise ValueError(f"choose_scoring_path: path must be one of {list(PATHS)}, got {path!r}")
        if path == "fused" and not fused_head_installed(lm):
            raise ValueError("choose_scoring_path: path='fused' needs TRL's fused LM head installed on the model")
        _PATH[lm] = path
        return path
    path, why_not = _verdict(model, lm)
    if agree is not None:
        fused_everywhere = agree(path == "fused")
        if not agree(path != "logits"):
            path, why_not = "logits", why_not or "does not reproduce its logits on another process"
        elif path == "fused" and not fused_everywhere:
            path = "head"
    _set_path(lm, path, why_not)
    return path


def score_from_logits(model, lm, inputs, at: Positions, targets, chunk_size):
    """nll and entropy (float32, flat) at ``at`` from the model's full logits (one forward)."""
    logits = model(**_forward_kwargs(lm, inputs, logits_to_keep=0)).logits
    rows, cols = at
    return _token_stats(lambda s, e: logits[rows[s:e], cols[s:e]], targets.numel(), targets, chunk_size)
