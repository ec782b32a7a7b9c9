"""The Error-Uncertainty plane (docs/method.md §1): one gradient-free forward of the model being trained.

``score_batch`` runs the model's backbone once (no grad, no KV cache, dropout off) and computes
the next-token statistics only at trainable positions, in chunks, from the last hidden state and
the output embedding. It never builds the [B, T, V] float32 logits a plain forward returns.

Alignment: every [B, T] tensor here is aligned with ``labels``: position t holds the statistics of
predicting ``labels[:, t]`` from the prefix ending at t - 1 (the causal shift), so position 0 is
never trainable and a token mask applies to ``labels`` as it is.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 256


@dataclass
class Scores:
    """Per-sample and per-token scores of one padded batch of B rows and T columns.

    - ``ppl`` [B] float64: error, exp(mean nll over the row's trainable positions); NaN for a row
      without any trainable position.
    - ``entropy`` [B] float64: uncertainty, mean predictive entropy (natural log) over the same.
    - ``nll`` / ``token_entropy`` [B, T] float32: per token, 0 off the trainable positions.
    - ``trainable`` [B, T] bool: labels != -100 after the causal shift (column 0 is False, and so
      is a position right after padding, see :func:`trainable_positions`).
    - ``input_tokens`` [B] long: non-padding tokens of each row (prompt included).
    """

    ppl: torch.Tensor
    entropy: torch.Tensor
    nll: torch.Tensor
    token_entropy: torch.Tensor
    trainable: torch.Tensor
    input_tokens: torch.Tensor

    @property
    def n_tokens(self) -> torch.Tensor:
        return self.trainable.sum(1)


def trainable_positions(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """bool [B, T]: positions whose label is trained on after the causal shift.

    Column 0 never is; with ``attention_mask``, neither is a position whose predecessor is
    padding (the first token of a left-padded row is "predicted" from a pad token, and lands in
    column 0, out of the loss, once the row is re-batched without its padding)."""
    mask = labels != ignore_index
    mask[:, 0] = False
    if attention_mask is not None and attention_mask.shape == labels.shape:
        mask[:, 1:] &= attention_mask[:, :-1] != 0
    return mask


@contextlib.contextmanager
def scoring_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for a scoring pass (dropout, LoRA dropout, NEFTune noise and gradient
    checkpointing off), with every module's own train/eval flag restored afterwards.

    bitsandbytes >= 0.48 on CPUs with AVX512-BF16: a 4-bit layer called in eval mode on an input
    without grad repacks its weights, for good, into an inference layout that has no autograd,
    which silently breaks the LoRA gradients of every later training step. The layers' own switch
    ``support_avx512bf16_for_cpu`` is turned off (permanently: training never uses that path).
    """
    modes = [(m, m.training) for m in model.modules()]
    for m in model.modules():
        if getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` module inside DDP / DeepSpeed (``.module``) and PEFT wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # PEFT
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP, DeepSpeed engine
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
    return model


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


# The scoring path of each model, decided once (at its first scoring call, or by choose_scoring_path):
# models whose own logits our head did not reproduce are scored from their full logits from then on.
_FALLBACK: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_HEAD_CHECKED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_WARNED: set[str] = set()


def _head_fn(head: nn.Module, post: Callable, hidden_dtype: torch.dtype, device: torch.device,
             forward_autocast: torch.dtype | None = None):
    """lm_head + post-processing, in the precision the forward ran in: under the autocast the
    model's forward ran under (``forward_autocast``, e.g. accelerate's mixed-precision wrapper),
    else in the weight's dtype."""
    weight = getattr(head, "weight", None)
    half = (torch.bfloat16, torch.float16)
    outside_autocast = not torch.is_autocast_enabled(device.type)
    mixed = (
        isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.dtype != hidden_dtype
        and outside_autocast
    )
    if forward_autocast is not None and outside_autocast:
        ctx = lambda: torch.autocast(device.type, dtype=forward_autocast)  # noqa: E731
        cast = None
    elif mixed and hidden_dtype in half:  # half-precision hidden states: the head runs in half too
        ctx = lambda: torch.autocast(device.type, dtype=hidden_dtype)  # noqa: E731
        cast = None
    elif mixed:
        ctx, cast = contextlib.nullcontext, weight.dtype
    else:
        ctx, cast = contextlib.nullcontext, None

    def fn(h: torch.Tensor) -> torch.Tensor:
        with ctx():
            return post(head(h if cast is None else h.to(cast)))

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


def _forward_kwargs(lm: nn.Module, batch: Mapping[str, torch.Tensor], logits_to_keep: int) -> dict:
    kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
    for key in ("attention_mask", "position_ids"):
        if batch.get(key) is not None:
            kwargs[key] = batch[key]
    params = inspect.signature(lm.forward).parameters
    if "logits_to_keep" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs["logits_to_keep"] = logits_to_keep
    return kwargs


@torch.no_grad()
def score_batch(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ignore_index: int = IGNORE_INDEX,
) -> Scores:
    """Score a padded batch (``input_ids``, ``attention_mask``, ``labels``; ``position_ids``
    optional) with the model as it is now: one no-grad forward, ``use_cache=False``.

    ``model`` is what the trainer calls (a PEFT model, a DDP/DeepSpeed wrapper, a bare causal LM);
    it is called as a whole so that wrappers and adapters act as in training, with
    ``logits_to_keep=1`` so that it builds logits for the last position only. The last hidden
    state is taken from the backbone and turned into log-softmax statistics at trainable
    positions only, ``chunk_size`` positions at a time (the memory knob: about
    3 x chunk_size x vocab floats at the peak).

    The scoring path is decided once per model (at its first call, or before training by
    :func:`choose_scoring_path`): if the output embedding plus known post-processing (softcapping,
    logit scales) do not reproduce the model's own logits at the last position, or the forward
    does not run the backbone module, the model is scored from its full logits from then on,
    with a one-time warning.

    Dropout is not switched off here: wrap the call in :func:`scoring_mode`.
    """
    labels = batch["labels"]
    trainable = trainable_positions(labels, ignore_index, batch.get("attention_mask"))
    lm = unwrap_causal_lm(model)
    backbone, head = _backbone_and_head(lm)
    targets = labels[:, 1:][trainable[:, 1:]]
    n = targets.numel()

    if lm in _FALLBACK:
        nll, ent = _score_from_logits(model, lm, batch, trainable, targets, chunk_size)
    else:
        forward = _forward_with_hidden(model, lm, backbone, batch)
        if forward is None and lm in _HEAD_CHECKED:
            raise RuntimeError(f"score_batch: {type(lm).__name__}'s forward no longer ran its backbone module")
        if lm not in _HEAD_CHECKED:  # the first call decides the path, for good
            _set_path(lm, _verdict(head, lm, forward))
        if lm in _FALLBACK:
            del forward
            nll, ent = _score_from_logits(model, lm, batch, trainable, targets, chunk_size)
        else:
            _, hidden, forward_autocast = forward
            head_fn = _head_fn(head, _logit_postprocess(lm), hidden.dtype, hidden.device, forward_autocast)
            selected = hidden[:, :-1][trainable[:, 1:]]
            nll, ent = _token_stats(lambda s, e: head_fn(selected[s:e]), n, targets, chunk_size)
    mask = batch.get("attention_mask")
    input_tokens = mask.ne(0).sum(1) if mask is not None else torch.full_like(labels[:, 0], labels.shape[1])
    return _assemble(nll, ent, trainable, input_tokens.long())


def _reproduces_logits(head_fn, hidden: torch.Tensor, logits: torch.Tensor | None, low_precision: bool) -> bool:
    if logits is None or logits.shape[1] != 1:  # nothing to compare with: trust the head
        return True
    ours = head_fn(hidden[:, -1]).float()
    theirs = logits[:, -1].float()
    low_precision = low_precision or any(t in (hidden.dtype, logits.dtype) for t in (torch.bfloat16, torch.float16))
    rtol = 3e-2 if low_precision else 1e-4
    return bool(((ours - theirs).abs().max() <= rtol * (1.0 + theirs.abs().max())).item())


def _forward_with_hidden(model, lm, backbone, batch):
    """One forward of ``model`` (logits for the last position only): (output, the backbone's last
    hidden state, the autocast dtype the forward ran under), or None when the forward did not run
    the backbone module (e.g. ``BartForCausalLM`` calls ``model.decoder`` directly)."""
    captured: list[tuple[torch.Tensor, torch.dtype | None]] = []

    def hook(module, args, out):  # the hidden state, and the autocast the forward runs under
        device = out[0].device.type
        on = torch.is_autocast_enabled(device)
        captured.append((out[0], torch.get_autocast_dtype(device) if on else None))

    handle = backbone.register_forward_hook(hook)
    try:
        out = model(**_forward_kwargs(lm, batch, logits_to_keep=1))
    finally:
        handle.remove()
    if not captured or not isinstance(captured[-1][0], torch.Tensor):
        return None
    return out, captured[-1][0], captured[-1][1]


def _head_matches(head, lm, out, hidden, forward_autocast) -> bool:
    head_fn = _head_fn(head, _logit_postprocess(lm), hidden.dtype, hidden.device, forward_autocast)
    low_precision = forward_autocast in (torch.bfloat16, torch.float16)
    return _reproduces_logits(head_fn, hidden, getattr(out, "logits", None), low_precision)


_BYPASS = "does not run its backbone module, so the scorer cannot read its last hidden state"
_MISMATCH = "post-processes its logits in a way the scorer does not reproduce"


def _verdict(head, lm, forward) -> str | None:
    """None when the scorer's own head reproduces the forward, else why not."""
    if forward is None:
        return _BYPASS
    return None if _head_matches(head, lm, *forward) else _MISMATCH


def _set_path(lm: nn.Module, why_not: str | None) -> None:
    _HEAD_CHECKED.add(lm)
    if why_not is None:
        _FALLBACK.discard(lm)
        return
    _FALLBACK.add(lm)
    name = type(lm).__name__
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(
            f"qtuning: {name}'s forward {why_not}; scoring from the model's full logits instead "
            "(more memory).",
            stacklevel=3,
        )


@torch.no_grad()
def choose_scoring_path(model: nn.Module, agree: Callable[[bool], bool] | None = None) -> bool:
    """Decide once, before training, how :func:`score_batch` scores ``model``: from the backbone's
    last hidden state and the output embedding (True), or from the model's full logits (False),
    by one probe forward on 8 tokens. ``agree`` turns this process's verdict into the one every
    process uses (the callback passes an all-reduce, so that no rank runs a second forward alone).
    Call it in :func:`scoring_mode`, through the wrapper training uses."""
    lm = unwrap_causal_lm(model)
    backbone, head = _backbone_and_head(lm)
    param = next(lm.parameters())
    vocab = int(getattr(lm.config, "vocab_size", 0) or 0) or 8
    ids = (torch.arange(1, 9, device=param.device) % vocab)[None]
    probe = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    why_not = _verdict(head, lm, _forward_with_hidden(model, lm, backbone, probe))
    if agree is not None and not agree(why_not is None):
        why_not = why_not or "does not reproduce its logits on another process"
    _set_path(lm, why_not)
    return why_not is None


def _score_from_logits(model, lm, batch, trainable, targets, chunk_size):
    logits = model(**_forward_kwargs(lm, batch, logits_to_keep=0)).logits
    rows, cols = trainable[:, 1:].nonzero(as_tuple=True)
    return _token_stats(lambda s, e: logits[rows[s:e], cols[s:e]], targets.numel(), targets, chunk_size)


def _assemble(nll, ent, trainable, input_tokens) -> Scores:
    token_nll = torch.zeros(trainable.shape, dtype=torch.float32, device=trainable.device)
    token_ent = torch.zeros_like(token_nll)
    token_nll[trainable] = nll
    token_ent[trainable] = ent
    count = trainable.sum(1).to(torch.float64)
    mean_nll = token_nll.to(torch.float64).sum(1) / count  # NaN for rows with no trainable token
    return Scores(
        ppl=torch.exp(mean_nll),
        entropy=token_ent.to(torch.float64).sum(1) / count,
        nll=token_nll,
        token_entropy=token_ent,
        trainable=trainable,
        input_tokens=input_tokens,
    )
