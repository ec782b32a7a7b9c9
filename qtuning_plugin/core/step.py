"""One optimizer step of Q-Tuning, for any training loop: :func:`select_step`.

Given the micro-batches of one optimizer step (before any forward), it scores every sample with
the model being trained (one no-grad forward per micro-batch), decides with Algorithm 1 on each
pool (:func:`decide_step`: the paper, plus the options of :class:`QTuningConfig`), and returns what
to train: the kept rows, their pruned tokens' labels masked, re-batched (or, for packed batches,
re-packed) into as few micro-batches as the batch size allows, with their exact label-token count.
Train those micro-batches and divide the summed cross-entropy by that count (summed over ranks):
the loss is the mean over the kept tokens of the kept samples.

Several processes: every rank must run the same forwards and collectives, so each branch that
changes them is decided by all ranks together through ``collectives``
(:class:`~qtuning_plugin.core.distributed.Collectives`): which micro-batches get a reference
forward, how many micro-batches each rank trains (the most any rank needs; a rank that needs
fewer splits its rows or adds micro-batches whose labels are all masked) and whether any rank
kept a label token at all; ``pool: global`` gathers every rank's scores. Pure torch: no Trainer.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .batch import fill_to_count, infer_pad_id, infer_padding_side, rebatch
from .config import QTuningConfig
from .decision import GlobalPool, decide
from .distributed import Collectives
from .packing import (first_segment, masked_segment, packed_layout, repack_kept, score_packed, split_to_count,
                      unpack)
from .reference import ReferenceCache, excess, rising_samples, rising_tokens, row_keys
from .scoring import DEFAULT_CHUNK_SIZE, IGNORE_INDEX, Scores, score_batch, scoring_mode

logger = logging.getLogger(__name__)


@dataclass
class StepDecision:
    """Algorithm 1 over every pool of a step, per scored micro-batch: ``keep`` bool [B],
    ``prune`` bool [B] (rows whose tokens are pruned: Q2), ``token_keep`` bool [B, T] (the label
    positions that stay in the loss); ``levels``: each pool's quantile level. With
    ``reference: base``: ``suspects`` bool [n] over the step (not kept) and ``excess`` (largest,
    mean) per-token NLL rise over the base model, [n] each. ``global_pool``: ``pool: global``'s
    gathered pool (None otherwise or in one process). ``excluded``: bool [n] over the step, the
    samples ``drop_highest_ppl`` / ``drop_ppl_outliers`` kept out (None when neither is set)."""

    keep: list[torch.Tensor]
    prune: list[torch.Tensor]
    token_keep: list[torch.Tensor]
    levels: list[float]
    suspects: torch.Tensor | None = None
    excess: tuple[torch.Tensor, torch.Tensor] | None = None
    global_pool: GlobalPool | None = None
    excluded: torch.Tensor | None = None


@dataclass
class StepResult:
    """What :func:`select_step` returns.

    - ``micro_batches``: what to train, in order. At most as many as were fetched, and the same
      number on every rank. Equal to the fetched list when ``pruned`` is False.
    - ``num_label_tokens``: this process's label tokens in ``micro_batches`` (positions 1.. whose
      label is not -100: the predictions a causal-LM loss averages over).
    - ``pruned``: False for a warm-up step, or a step where no rank kept a label token (every
      sample lacks one): then the step is trained as fetched.
    - ``scored``: the micro-batches as scored (packed ones unpacked: one row per segment), with
      ``scores`` and ``decision`` per scored micro-batch; None for a warm-up step.
    - ``seconds``: wall time of scoring and deciding.
    """

    micro_batches: list[dict[str, Any]]
    num_label_tokens: int
    pruned: bool
    scored: list[dict[str, Any]] | None = None
    scores: list[Scores] | None = None
    decision: StepDecision | None = None
    seconds: float = 0.0


def label_tokens(micro_batches: Sequence[Mapping[str, Any]]) -> int:
    """Label tokens a causal-LM loss averages over: positions 1.. of ``labels`` that are not -100."""
    return int(sum(int((b["labels"][..., 1:] != IGNORE_INDEX).sum()) for b in micro_batches))


def check_batch(batch: Mapping[str, Any]) -> None:
    """Refuse a micro-batch Q-Tuning cannot score exactly, saying what to change."""
    if "labels" not in batch:
        raise ValueError("QTuning: the training batches have no 'labels'; use a causal-LM collator "
                         "(TRL's SFTTrainer or DataCollatorForLanguageModeling) that provides them.")
    if packed_layout(batch) == "position_ids" and "position_ids" not in batch:
        raise ValueError("QTuning: this padding-free batch has no position_ids, so its segments (samples) "
                         "cannot be told apart.")
    if "shift_labels" in batch:
        raise ValueError("QTuning: batches with shift_labels (sequence parallelism) are not supported.")


def reference_nll(model: nn.Module, scored: Sequence[Mapping[str, torch.Tensor]], scores: Sequence[Scores],
                  cache: ReferenceCache, collectives: Collectives, chunk_size: int = DEFAULT_CHUNK_SIZE,
                  keys: Sequence[Sequence[str]] | None = None,
                  scorers: Sequence[Callable[[], Scores] | None] | None = None) -> list[torch.Tensor]:
    """``reference: base``: the base model's NLL [B, T] of each micro-batch's rows. A micro-batch
    holding a row not in ``cache`` is scored once more, adapters off; which micro-batches are is
    decided by all ranks together (one all-reduce), so every rank runs the same forwards.
    ``keys``: each micro-batch's :func:`~qtuning_plugin.core.reference.row_keys`, if computed.
    ``scorers``: per micro-batch, how it was scored (None: as the padded batch in ``scored``), so
    that the reference forward costs what the scoring forward did (a packed one stays packed)."""
    if keys is None:
        keys = [row_keys(b, s.trainable) for b, s in zip(scored, scores)]
    scorers = scorers or [None] * len(scored)
    needed = collectives.all_reduce_max([int(cache.missing(k)) for k in keys])
    for batch, k, need, score in zip(scored, keys, needed, scorers):
        if need:
            cache.fill(model, batch, k, chunk_size=chunk_size, score=score)
    return [cache.lookup(s, k) for s, k in zip(scores, keys)]


def gather_pool(scores: Sequence[Scores], collectives: Collectives,
                eligible: torch.Tensor | None = None) -> GlobalPool | None:
    """``pool: global``: every rank's (ppl, entropy[, eligible]), in rank order (a collective:
    every rank calls it once per step). None in a single process."""
    if collectives.world_size == 1:
        return None
    rows = [torch.cat([s.ppl for s in scores]).cpu(), torch.cat([s.entropy for s in scores]).cpu()]
    if eligible is not None:
        rows.append(eligible.cpu().to(torch.float64))
    gathered = collectives.all_gather(torch.stack(rows).tolist())
    ppl = torch.tensor([x for g in gathered for x in g[0]], dtype=torch.float64)
    entropy = torch.tensor([x for g in gathered for x in g[1]], dtype=torch.float64)
    groups = torch.tensor([r for r, g in enumerate(gathered) for _ in g[0]], dtype=torch.long)
    ok = None if eligible is None else torch.tensor([x > 0 for g in gathered for x in g[2]], dtype=torch.bool)
    return GlobalPool(ppl=ppl, entropy=entropy, groups=groups, rank=collectives.rank, eligible=ok)


def decide_step(scores: Sequence[Scores], config: QTuningConfig, references: Sequence[torch.Tensor] | None = None,
                collectives: Collectives | None = None, prior: Sequence[torch.Tensor] | None = None
                ) -> StepDecision:
    """Algorithm 1 on each pool of a step (``pool``: the whole step, each micro-batch, or every
    rank's step), per scored micro-batch. ``references``: the base NLL of each micro-batch
    (``reference: base``); its rising samples (:func:`~qtuning_plugin.core.reference.rising_samples`)
    are not kept, and K still counts them. ``prior`` (``reference_sticky``): bool [B] per
    micro-batch, the rows flagged at an earlier sighting, flagged again. With ``reference_tokens``
    the pruned rows never keep a rising token (:func:`~qtuning_plugin.core.reference.rising_tokens`)."""
    n = len(scores)
    pools = [[i] for i in range(n)] if config.pool == "micro_batch" else [list(range(n))]
    eligible: list[torch.Tensor | None] = [None] * len(pools)
    avoid: list[list[torch.Tensor] | None] = [None] * len(pools)
    suspects = rises = None
    if references is not None:
        rises = excess(scores, references)  # once per step: each pool's rules take its share
        per_batch = list(zip(*(x.split([s.ppl.numel() for s in scores]) for x in rises)))
        flagged, avoid = [], []
        for pool in pools:
            pool_scores, pool_refs = [scores[i] for i in pool], [references[i] for i in pool]
            share = tuple(torch.cat([per_batch[i][j] for i in pool]) for j in (0, 1))
            flagged.append(rising_samples(pool_scores, pool_refs, config.reference_margin, config.reference_spread,
                                          rises=share))
            avoid.append(rising_tokens(pool_scores, pool_refs, config.reference_margin, rises=share)
                         if config.reference_tokens else None)
        if prior is not None:
            flagged = [f | torch.cat([prior[i].to(f.device) for i in pool]) for f, pool in zip(flagged, pools)]
        eligible = [~x for x in flagged]
        suspects = torch.cat([x.cpu() for x in flagged])
    global_pool = None
    if config.pool == "global":
        global_pool = gather_pool(scores, collectives or Collectives(), eligible[0])
    keep: list = [None] * n
    prune: list = [None] * n
    token_keep: list = [None] * n
    levels, excluded = [], []
    drops = config.drop_highest_ppl > 0 or config.drop_ppl_outliers is not None
    for pool, ok, av in zip(pools, eligible, avoid):
        decision = decide([scores[i] for i in pool], config, global_pool, eligible=ok, avoid_tokens=av)
        levels.append(decision.triage.level)
        if drops:  # (a device-to-host copy: only when a rule can have excluded something)
            excluded.append(decision.triage.excluded.cpu())
        prune_split = decision.triage.prune_tokens.split([scores[i].ppl.numel() for i in pool])
        for i, k, p, t in zip(pool, decision.keep, prune_split, decision.token_keep):
            keep[i], prune[i], token_keep[i] = k, p, t
    return StepDecision(keep, prune, token_keep, levels, suspects, rises, global_pool,
                        torch.cat(excluded) if drops else None)


Decide = Callable[[Sequence[Scores], "Sequence[torch.Tensor] | None"], StepDecision]


def select_step(
    model: nn.Module,
    micro_batches: Sequence[Mapping[str, Any]],
    config: QTuningConfig,
    *,
    step: int | None = None,
    reference: ReferenceCache | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    pad_id: int | None = None,
    padding_side: str | None = None,
    collectives: Collectives | None = None,
    decide_fn: Decide | None = None,
) -> StepResult:
    """Score, decide and re-batch one optimizer step's ``micro_batches`` (see the module's doc).

    - ``model``: the model being trained, as the training loop calls it (a DDP / FSDP / PEFT
      wrapper is fine); it is put in eval mode without gradients for the scoring forward only.
    - ``micro_batches``: padded (``input_ids``, ``labels``, ``attention_mask``) or packed (TRL
      padding-free / Axolotl multipack) batches, as the collator made them; not modified.
    - ``step``: the optimizer step's index from 0; needed with ``warmup_steps`` (steps before it
      are trained as fetched, unscored).
    - ``reference``: the cache of base-model NLLs that lives across steps, needed with
      ``reference: base`` (``ReferenceCache()`` once, passed at every step).
    - ``pad_id`` / ``padding_side``: used when no fetched row is padded (read from the batches
      otherwise); pass the tokenizer's.
    - ``collectives``: see :class:`~qtuning_plugin.core.distributed.Collectives` (default:
      ``torch.distributed``, local in one process).
    - ``decide_fn(scores, references) -> StepDecision``: another decision rule on the same
      scores (a random-pruning baseline, say); default :func:`decide_step` with ``config``. With
      ``reference_sticky`` it is called with ``prior=`` too (see :func:`decide_step`), and the
      returned ``suspects`` are remembered in ``reference``, every rank's on every rank.
    """
    if not micro_batches:
        raise ValueError("select_step: no micro-batches")
    if config.warmup_steps and step is None:
        raise ValueError("select_step: warmup_steps is set, so pass step= (the optimizer step's index from 0)")
    if config.reference == "base" and reference is None:
        raise ValueError("select_step: reference='base' needs reference=ReferenceCache(), created once and "
                         "passed at every step (it holds each sample's base NLL across steps)")
    fetched = list(micro_batches)
    if config.prunes_nothing:
        return StepResult(fetched, label_tokens(fetched), pruned=False)
    for batch in fetched:
        check_batch(batch)
    if step is not None and step < config.warmup_steps:
        return StepResult(fetched, label_tokens(fetched), pruned=False)
    started = time.perf_counter()
    collectives = collectives or Collectives(fetched[0]["input_ids"].device)
    pad = infer_pad_id(fetched, pad_id)
    side = infer_padding_side(fetched, padding_side)
    layout = packed_layout(fetched[0])
    unpacked = None
    if layout is not None:  # a sample is a segment: score and decide on the segments, unpacked
        unpacked = [unpack(b, layout, pad) for b in fetched]
        # a micro-batch with no labelled segment is scored as one masked segment, so every rank scores alike
        unpacked = [u if u.rows else first_segment(b, layout) for u, b in zip(unpacked, fetched)]
        scored = [u.batch for u in unpacked]
    else:
        scored = fetched

    # a packed micro-batch is scored as its rows come (not padded to the longest segment); one
    # without a labelled segment, and an ordinary batch, as the padded batch in ``scored``
    scorers = [None] * len(scored) if unpacked is None else [
        functools.partial(score_packed, model, b, layout, u, chunk_size=chunk_size) if u.packed else None
        for b, u in zip(fetched, unpacked)]
    with scoring_mode(model):
        scores = [score() if score is not None else score_batch(model, b, chunk_size=chunk_size)
                  for b, score in zip(scored, scorers)]
        references = keys = prior = None
        if config.reference == "base":
            keys = [row_keys(b, s.trainable) for b, s in zip(scored, scores)]
            references = reference_nll(model, scored, scores, reference, collectives, chunk_size, keys, scorers)
            if config.reference_sticky:
                prior = [reference.flagged_before(k) for k in keys]
    if decide_fn is not None:
        decision = decide_fn(scores, references) if prior is None else decide_fn(scores, references, prior=prior)
    else:
        decision = decide_step(scores, config, references, collectives, prior)
    if prior is not None:
        # Every rank learns every rank's newly flagged samples (one gather per step, on every
        # rank): a distributed sampler deals a sample to another rank at its next sighting.
        flat = [k for ks in keys for k in ks]
        flagged = decision.suspects.tolist() if decision.suspects is not None else [False] * len(flat)
        new = [k for k, f in zip(flat, flagged) if f and k and k not in reference.suspected]
        for rank_keys in collectives.all_gather(new):
            reference.suspected.update(rank_keys)
    keep, token_keep = decision.keep, decision.token_keep
    if layout is None:
        real = rebatch(fetched, keep, token_keep, pad_id=pad, side=side)
    else:
        real = repack_kept(fetched, unpacked, keep, token_keep, layout, pad)
    # Every rank must run the same number of training forwards (DDP broadcasts buffers in each,
    # FSDP / ZeRO-3 gather parameters, TRL gathers metrics) and the same collectives, so both
    # branches below are decided together: one all-reduce per step, on every rank.
    kept_tokens = int(sum(t.sum() for t in token_keep))  # one host sync
    target, any_tokens = collectives.all_reduce_max([len(real), int(kept_tokens > 0)])
    result = StepResult(fetched, 0, pruned=False, scored=scored, scores=scores, decision=decision)
    if not any_tokens:
        # No rank kept a label token: every sample of the step lacks one (e.g. all truncated
        # away). There is nothing to prune; the step is trained as fetched, as without Q-Tuning.
        logger.warning("QTuning: no sample of step %s has a label token; the step is trained as fetched",
                       "?" if step is None else step + 1)
    else:
        if layout is None:
            real = fill_to_count(real, target, fetched, pad_id=pad, side=side)
        else:
            real = split_to_count(real or [masked_segment(fetched[0], layout, pad)], target, layout, pad)
        result.micro_batches, result.pruned = real, True
    result.num_label_tokens = label_tokens(result.micro_batches)
    result.seconds = time.perf_counter() - started
    return result
