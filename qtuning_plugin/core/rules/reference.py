"""The reference guard (``reference: base``, adapter training only): the base model's loss.

One snapshot of the Error-Uncertainty plane cannot tell a misconception (a correct answer the
model does not know yet) from a wrong label (an answer the model is right to find unlikely):
both have high error and low uncertainty. Their *trajectories* differ. As training on the rest
of the data improves the model, a correct answer's tokens become more likely than under the
base model, and a wrong answer's contradicting tokens become *less* likely than they were.

For LoRA / QLoRA the base model is the same model with its adapters switched off, so this costs
no memory: one more no-grad forward, at a sample's first sight only. Its per-token NLL is cached
by the sample's content (token ids and label positions), which is exact: the base is frozen.

Once the pool's loss has fallen below its base, a sample whose largest per-token rise above its
base NLL exceeds the pool's median rise by more than ``reference_margin`` nats is suspected of a
wrong label and not kept (:func:`rising_samples`). docs/options.md has the evidence.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Mapping, Sequence

from ..options import Option
from . import Pool, Rule, StepContext, torch

if TYPE_CHECKING:
    from torch import nn

    from ..scoring import Scores


def adapter_switch(model: nn.Module) -> Callable[[], ContextManager] | None:
    """The PEFT model's ``disable_adapter`` context inside DDP / DeepSpeed / compile wrappers, or
    None when the model is not a PEFT model with adapters (full fine-tuning has no free base)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "peft_config") and callable(getattr(model, "disable_adapter", None)):
            return model.disable_adapter
        if isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
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

    def __len__(self) -> int:
        return len(self.nll)

    def missing(self, keys: Sequence[str]) -> bool:
        return any(k and k not in self.nll for k in keys)

    def fill(self, model: nn.Module, batch: Mapping[str, torch.Tensor], keys: Sequence[str], *,
             chunk_size: int, score: Callable[[], Scores] | None = None,
             host: Mapping[str, torch.Tensor] | None = None) -> None:
        """Score ``batch`` with the adapters of ``model`` switched off and cache its rows (also
        called on a batch whose rows are all cached, to keep ranks' forwards aligned). ``score``:
        how to score it, if not as the padded batch it is (a packed micro-batch's rows as they
        come: :func:`~qtuning_plugin.core.packing.score_packed`), run with the adapters off.
        ``host``: the batch's labels / attention_mask on the host, if the caller has them."""
        from ..scoring import score_batch, trainable_positions

        switch = adapter_switch(model)
        if switch is None:
            raise ValueError("reference='base' needs a PEFT model (LoRA / QLoRA): the base model is the "
                             "model with its adapters switched off")
        with torch.no_grad(), switch():
            ref = score() if score is not None else score_batch(model, batch, chunk_size=chunk_size, host=host)
        nll = ref.nll.float().cpu()  # (one copy per micro-batch holding a sample seen for the first time)
        trainable = ref.trainable.cpu() if host is None else trainable_positions(
            host["labels"], attention_mask=host.get("attention_mask"))
        for row, key in enumerate(keys):
            if key and key not in self.nll:
                self.nll[key] = nll[row][trainable[row]].clone()

    def lookup(self, scores: Scores, keys: Sequence[str], trainable: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [B, T]: the cached base NLL at each row's trainable positions (NaN for a row
        not cached or whose positions do not match). ``trainable``: the scores' on the host, if
        the caller has it."""
        out = torch.full(scores.nll.shape, float("nan"), dtype=torch.float32)
        trainable = scores.trainable.cpu() if trainable is None else trainable
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


def rising_samples(largest: torch.Tensor, mean: torch.Tensor, margin: float) -> torch.Tensor:
    """bool [n] over a pool: samples suspected of a wrong label, from each sample's largest and
    mean per-token rise over its base NLL (:func:`excess`).

    Once the pool's loss has fallen below the base (the median over its samples of the mean rise
    is below zero), a sample is flagged when its largest rise exceeds the pool's median largest
    rise by more than ``margin`` nats. The median makes the rule relative to the pool: longer
    answers have more tokens, so a larger largest rise, wrong label or not. Samples without a rise
    (no label token, no reference) are never flagged, and while the pool has not improved on the
    base (the first steps) nothing is."""
    known = ~torch.isnan(mean)
    if not known.any() or not bool(mean[known].median() < 0):
        return torch.zeros_like(known)
    return known & (largest > largest[known].median() + margin)


class ReferenceGuard(Rule):
    name = "reference guard (reference: base)"
    position = 30
    options = (
        Option("reference", "none", "'base': the reference guard, for LoRA / QLoRA: never keep a sample whose "
               "per-token loss rose above the base model's (adapters off) more than the pool's typical sample; "
               "'none' (the paper)", kind="choice", group="rules", choices=("none", "base")),
        Option("reference_margin", 0.5, "reference guard: how far, in nats, a sample's largest rise above its base "
               "NLL must exceed the pool's median rise to be flagged", kind="number", group="rules", open_low=True),
    )
    metric = "suspected_samples"
    log_field = "suspect"
    local = True  # per-token statistics of this rank's samples
    stateful = True  # the cache of base NLLs

    def __init__(self, config) -> None:
        super().__init__(config)
        self.cache = ReferenceCache()

    @classmethod
    def is_active(cls, config) -> bool:
        return config.reference == "base"

    @staticmethod
    def check_model(model: nn.Module) -> None:
        """Refuse a model without adapters (its base is not free)."""
        if adapter_switch(model) is None:
            raise ValueError(
                "QTuning: reference='base' needs adapter training (a PEFT LoRA / QLoRA model): the base model "
                f"is the trained model with its adapters switched off, and {type(model).__name__} has none. "
                "Use reference='none' for full fine-tuning.")

    def prepare(self, step: StepContext) -> dict[str, Any]:
        """The base model's NLL [B, T] of each micro-batch's rows. A micro-batch holding a row not
        in the cache is scored once more, adapters off; which ones is decided by all ranks
        together (one all-reduce), so every rank runs the same forwards."""
        from ..scoring import trainable_positions

        if step.host is not None:  # the step's host copies: no wait for the device
            trainable = [trainable_positions(h["labels"], attention_mask=h.get("attention_mask")) for h in step.host]
            keys = [row_keys(h, t) for h, t in zip(step.host, trainable)]
        else:
            trainable = [s.trainable.cpu() for s in step.scores]
            keys = [row_keys(b, t) for b, t in zip(step.scored, trainable)]
        scorers = step.scorers or [None] * len(step.scored)
        needed = step.collectives.all_reduce_max([int(self.cache.missing(k)) for k in keys])
        hosts = step.host or [None] * len(step.scored)
        for batch, k, need, score, host in zip(step.scored, keys, needed, scorers, hosts):
            if need:
                self.cache.fill(step.model, batch, k, chunk_size=step.chunk_size, score=score, host=host)
        return {"reference": [self.cache.lookup(s, k, t) for s, k, t in zip(step.scores, keys, trainable)]}

    def features(self, scores: Sequence[Scores], inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        references = inputs.get("reference")
        if references is None:
            raise ValueError("reference='base': the step has no base-model NLL (the guard's prepare() did not run)")
        largest, mean = excess(scores, references)
        return {"rise_max": largest, "rise_mean": mean}

    def exclude(self, pool: Pool) -> torch.Tensor:
        return rising_samples(pool.features["rise_max"], pool.features["rise_mean"], self.config.reference_margin)


__all__ = ["adapter_switch", "row_keys", "ReferenceCache", "excess", "rising_samples", "ReferenceGuard"]
