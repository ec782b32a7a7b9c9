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
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import nn

from .fused import IGNORE_INDEX, score_fused
from .heads import (Positions, choose_scoring_path, forward_inputs, forward_with_head, score_from_logits,
                    scoring_path)
from .wrappers import unwrap_causal_lm

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


@torch.no_grad()
def score_batch(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ignore_index: int = IGNORE_INDEX,
    host: Mapping[str, torch.Tensor] | None = None,
) -> Scores:
    """Score a padded batch (``input_ids``, ``attention_mask``, ``labels``; ``position_ids``
    optional) with the model as it is now: one no-grad forward, ``use_cache=False``.

    ``model`` is what the trainer calls (a PEFT model, a DDP / FSDP / DeepSpeed wrapper, a bare
    causal LM); it is called as a whole so that wrappers and adapters act as in training. The
    next-token statistics are computed at trainable positions only, ``chunk_size`` positions at a
    time (the memory knob: about 3 x chunk_size x vocab floats at the peak), inside the model's
    forward, where sharded weights are gathered as in training: by our head from a pre-hook on the
    output embedding (the backbone's last hidden state, captured by a hook, times the gathered
    weight), or by TRL's fused LM head where ``SFTTrainer`` installed it and its kernel projects
    only the labelled positions (Triton on CUDA / XPU; see :func:`~.heads.fused_head_is_compact`). The model
    builds logits for its last position only.

    The path is decided once per model (:func:`~.heads.choose_scoring_path`, on an 8-token probe): a model
    whose logits neither head reproduces (unknown post-processing, a forward that bypasses its
    backbone or head module) is scored from its full logits, with a one-time warning.

    ``host``: the batch's ``labels`` (and ``attention_mask``) on the host, if the caller has them
    (:func:`~qtuning_plugin.core.batch.host_copies`): the positions are then found without waiting
    for the device. Dropout is not switched off here: wrap the call in :func:`scoring_mode`.
    """
    labels = batch["labels"]
    if host is None:  # (a device-to-host copy: select_step passes the step's one)
        host = {k: batch[k].cpu() for k in ("labels", "attention_mask") if isinstance(batch.get(k), torch.Tensor)}
    host_trainable = trainable_positions(host["labels"], ignore_index, host.get("attention_mask"))
    rows, cols = host_trainable[:, 1:].nonzero(as_tuple=True)  # on the host; to the device without a wait
    at = (rows.to(labels.device), cols.to(labels.device))
    nll, ent = score_positions(model, forward_inputs(batch), labels, host_trainable.to(labels.device), chunk_size,
                               at=at)
    mask = host.get("attention_mask")
    input_tokens = mask.ne(0).sum(1) if mask is not None else torch.full_like(host["labels"][:, 0], labels.shape[1])
    return assemble(nll, ent, host_trainable.to(labels.device), input_tokens.long().to(labels.device), at=at)


@torch.no_grad()
def score_positions(model: nn.Module, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor,
                    trainable: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE,
                    at: Positions | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """nll and entropy (float32, flat, in row-major order) of the positions where ``trainable``
    [B, T] is True (each predicts ``labels`` there from the prefix before it), by one forward of
    ``model(**inputs)`` on the model's scoring path (see :func:`score_batch`). ``at``: those
    positions minus one, as (rows, cols) on the device (found from ``trainable`` otherwise)."""
    lm = unwrap_causal_lm(model)
    path = scoring_path(lm) or choose_scoring_path(model)
    if at is None:
        at = trainable[:, 1:].nonzero(as_tuple=True)
    targets = labels[at[0], at[1] + 1]
    if path == "fused":
        return score_fused(model, inputs, labels, trainable, at)
    if path == "logits":
        return score_from_logits(model, lm, inputs, at, targets, chunk_size)
    got = forward_with_head(model, lm, inputs, at, targets, chunk_size)
    if got is None:
        raise RuntimeError(f"score_batch: {type(lm).__name__}'s forward no longer ran its backbone and head modules")
    return got[0]


def assemble(nll, ent, trainable, input_tokens, at: Positions | None = None) -> Scores:
    """Scores of a batch from the flat statistics at its trainable positions (``at``: those
    positions minus one, as in :func:`score_positions`)."""
    token_nll = torch.zeros(trainable.shape, dtype=torch.float32, device=trainable.device)
    token_ent = torch.zeros_like(token_nll)
    if at is None:
        token_nll[trainable] = nll
        token_ent[trainable] = ent
    else:
        token_nll[at[0], at[1] + 1] = nll
        token_ent[at[0], at[1] + 1] = ent
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
