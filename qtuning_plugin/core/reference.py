"""The reference guard (an option beyond the paper, ``reference="base"``): the base model's loss.

One snapshot of the Error-Uncertainty plane cannot tell a misconception (a correct answer the
model does not know yet) from a wrong label (an answer the model is right to find unlikely):
both have high error and low uncertainty. Their *trajectories* differ. As training on the rest
of the data improves the model, a correct answer's tokens become more likely than under the
base model, and a wrong answer's contradicting tokens become *less* likely than they were.

For adapter training (LoRA, QLoRA) the base model is the same model with its adapters switched
off, so this costs no memory: one more no-grad forward, at a sample's first sight only. The
per-token NLL of that forward is cached by the sample's content (its token ids and label
positions), which is exact: the base model is frozen, so the same tokens give the same NLL.

:func:`rising_samples` then flags the samples of a pool with a token whose NLL has risen
above its base NLL by more (by a margin) than the pool's typical sample, once the pool's own loss
fell below its base; the sample stage does not keep them (:func:`~qtuning_plugin.core.triage.triage`'s ``eligible``).
"""

from __future__ import annotations

import hashlib
from typing import Callable, ContextManager, Mapping, Sequence

import torch
from torch import nn

from .scoring import Scores, score_batch


def adapter_switch(model: nn.Module) -> Callable[[], ContextManager] | None:
    """The PEFT model's ``disable_adapter`` context inside DDP / DeepSpeed / compile wrappers, or
    None when the model is not a PEFT model with adapters (full fine-tuning has no free base)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "peft_config") and callable(getattr(model, "disable_adapter", None)):
            return model.disable_adapter
        if isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
    return None


def row_keys(batch: Mapping[str, torch.Tensor], trainable: torch.Tensor) -> list[str]:
    """A content key per row: BLAKE2b of its non-padding token ids and its trainable positions
    (relative to the first token), so that a sample has one key however it is padded."""
    ids = batch["input_ids"].cpu()
    mask = batch.get("attention_mask")
    mask = (mask.cpu() != 0) if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    trainable = trainable.cpu()
    keys = []
    for row in range(ids.shape[0]):
        cols = mask[row].nonzero().squeeze(1)
        if cols.numel() == 0:
            keys.append("")
            continue
        start = int(cols[0])
        tokens = ids[row, cols].tolist()
        positions = (trainable[row].nonzero().squeeze(1) - start).tolist()
        data = (",".join(map(str, tokens)) + "|" + ",".join(map(str, positions))).encode()
        keys.append(hashlib.blake2b(data, digest_size=12).hexdigest())
    return keys


class ReferenceCache:
    """Per-token base NLL of every sample seen, keyed by :func:`row_keys` (float32 on the CPU:
    4 bytes per label token, 120 MB for 100,000 samples of 300 answer tokens)."""

    def __init__(self) -> None:
        self.nll: dict[str, torch.Tensor] = {}
        self.forwards = 0  # reference forwards run (each over one micro-batch)
        self.suspected: set[str] = set()  # reference_sticky: the keys of every sample flagged so far

    def __len__(self) -> int:
        return len(self.nll)

    def missing(self, keys: Sequence[str]) -> bool:
        return any(k and k not in self.nll for k in keys)

    @torch.no_grad()
    def fill(self, model: nn.Module, batch: Mapping[str, torch.Tensor], keys: Sequence[str], *,
             chunk_size: int, score: Callable[[], Scores] | None = None) -> None:
        """Score ``batch`` with the adapters of ``model`` switched off and cache its rows (also
        called on a batch whose rows are all cached, to keep ranks' forwards aligned). ``score``:
        how to score it, if not as the padded batch it is (a packed micro-batch's rows as they
        come: :func:`~qtuning_plugin.core.packing.score_packed`), run with the adapters off."""
        switch = adapter_switch(model)
        if switch is None:
            raise ValueError("reference='base' needs a PEFT model (LoRA / QLoRA): the base model is the "
                             "model with its adapters switched off")
        with switch():
            ref = score() if score is not None else score_batch(model, batch, chunk_size=chunk_size)
        self.forwards += 1
        nll, trainable = ref.nll.float().cpu(), ref.trainable.cpu()
        for row, key in enumerate(keys):
            if key and key not in self.nll:
                self.nll[key] = nll[row][trainable[row]].clone()

    def flagged_before(self, keys: Sequence[str]) -> torch.Tensor:
        """bool [B]: the rows whose key was flagged at an earlier sighting (``reference_sticky``)."""
        return torch.tensor([bool(k) and k in self.suspected for k in keys], dtype=torch.bool)

    def lookup(self, scores: Scores, keys: Sequence[str]) -> torch.Tensor:
        """float32 [B, T]: the cached base NLL at each row's trainable positions (NaN for a row
        not cached or whose positions do not match)."""
        out = torch.full(scores.nll.shape, float("nan"), dtype=torch.float32)
        trainable = scores.trainable.cpu()
        for row, key in enumerate(keys):
            ref = self.nll.get(key)
            if ref is not None and ref.numel() == int(trainable[row].sum()):
                out[row][trainable[row]] = ref
        return out.to(scores.nll.device)


def excess(scores: Sequence[Scores], references: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample of the pool (batches in order), float64 [n] each: the largest and the mean
    (NLL - base NLL) over its label tokens. NaN for a row without a label token or a reference."""
    largest, mean = [], []
    for s, ref in zip(scores, references):
        trainable = s.trainable
        delta = (s.nll.double() - ref.to(s.nll.device).double()).masked_fill(~trainable, 0.0)
        valid = trainable.any(1) & ~torch.isnan(delta).any(1)
        nan = torch.full(valid.shape, float("nan"), dtype=torch.float64, device=valid.device)
        largest.append(torch.where(valid, delta.masked_fill(~trainable, -float("inf")).amax(1), nan))
        mean.append(torch.where(valid, delta.sum(1) / trainable.sum(1).clamp(min=1), nan))
    return torch.cat(largest), torch.cat(mean)


def rising_samples(scores: Sequence[Scores], references: Sequence[torch.Tensor], margin: float,
                   spread: float = 0.0, *, rises: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """bool [n] over the pool (batches in order): samples suspected of a wrong label.

    Each sample's *rise* is the largest (NLL - base NLL) over its label tokens. Once the pool's
    loss has fallen below the base (the median over its samples of mean NLL - mean base NLL is
    below zero), a sample is flagged when its rise exceeds the pool's median rise by more than
    ``margin`` nats plus ``spread`` median absolute deviations of the pool's rises. The median
    makes the rule relative to the pool: longer answers have more tokens, so a larger largest
    rise, wrong label or not; the deviation scales it to how much the pool's rises differ (long
    worked answers drift more, wrong or not). Rows without a score or a reference are never
    flagged, and while the pool has not improved on the base (the first steps) nothing is.
    ``rises``: the pool's :func:`excess`, if the caller has it already (it is not recomputed).

    Chosen from the quality benchmark's evidence (``qtuning-observe-25x50`` records the rises):
    over 3 epochs of SmolLM2-135M, a wrong answer's largest rise had a median of +0.2 nats
    (10th-90th percentile 0 to +3.1) on one-step additions against 0 (0 to +0.6) for correct
    ones, and +8.2 (+4.6 to +8.7) on three-step worked answers against +1.2 (0 to +5.7).
    """
    largest, known = _fallen_pool_rises(scores, references, rises)
    if known is None:
        return torch.zeros(largest.shape, dtype=torch.bool, device=largest.device)
    pool_rises = largest[known]
    centre = pool_rises.median()
    threshold = centre + margin + spread * (pool_rises - centre).abs().median()
    return known & (largest > threshold)


def _fallen_pool_rises(scores: Sequence[Scores], references: Sequence[torch.Tensor],
                       rises: tuple[torch.Tensor, torch.Tensor] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each sample's largest rise [n] and which samples have one (bool [n]), or ``known`` None
    while the pool has not fallen below the base (its median mean rise is not below zero).
    ``rises``: the pool's :func:`excess`, if already computed."""
    largest, mean = excess(scores, references) if rises is None else rises
    known = ~torch.isnan(mean)
    if not known.any() or not bool(mean[known].median() < 0):
        return largest, None
    return largest, known


def rising_tokens(scores: Sequence[Scores], references: Sequence[torch.Tensor], margin: float, *,
                  rises: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """bool [B, T] per batch of the pool: the label tokens whose NLL rose above their base NLL by
    more than the pool's median largest rise plus ``margin`` (the first sample rule's threshold,
    applied per token), once the pool's loss fell below the base (nothing before, as in
    :func:`rising_samples`). ``reference_tokens``: such tokens are never kept in a pruned
    (misconception) sample: a wrong answer's contradicting tokens, in a sample not flagged.
    ``rises``: the pool's :func:`excess`, if already computed."""
    largest, known = _fallen_pool_rises(scores, references, rises)
    if known is None:
        return [torch.zeros_like(s.trainable, dtype=torch.bool) for s in scores]
    threshold = largest[known].median() + margin
    out = []
    for s, ref in zip(scores, references):
        delta = s.nll.double() - ref.to(s.nll.device).double()
        out.append(s.trainable & ~torch.isnan(delta) & (delta > threshold))
    return out


__all__ = ["adapter_switch", "row_keys", "ReferenceCache", "excess", "rising_samples", "rising_tokens"]
