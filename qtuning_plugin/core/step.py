"""One optimizer step of Q-Tuning, for any training loop: :func:`select_step`.

Given the micro-batches of one optimizer step (before any forward), it scores every sample with
the model being trained (one no-grad forward per micro-batch), decides with Algorithm 1 on each
pool (:func:`decide_step`: the paper, plus the rules the config turns on), and returns what
to train: the kept rows, their pruned tokens' labels masked, re-batched (or, for packed batches,
re-packed) into as few micro-batches as the batch size allows, with their exact label-token count.
Train those micro-batches and divide the summed cross-entropy by that count (summed over ranks):
the loss is the mean over the kept tokens of the kept samples.

Several processes: every rank must run the same forwards and collectives, so each branch that
changes them is decided by all ranks together through ``collectives``
(:class:`~qtuning_plugin.core.distributed.Collectives`): which extra forwards a rule runs, how many micro-batches each rank trains (the most any rank needs; a rank that needs
fewer splits its rows or adds micro-batches whose labels are all masked) and whether any rank
kept a label token at all; ``pool: global`` gathers every rank's scores. Pure torch: no Trainer.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .batch import fill_to_count, host_copies, infer_pad_id, infer_padding_side, rebatch
from .config import QTuningConfig
from .decision import GlobalPool, HostStats, decide, gather_pool, host_stats
from .distributed import Collectives
from .packing import (first_segment, masked_segment, packed_layout, repack_kept, score_packed, split_to_count,
                      unpack)
from .rules import Pool, Rule, StepContext, build_rules
from .scoring import IGNORE_INDEX, Scores, score_batch, scoring_mode

logger = logging.getLogger(__name__)


@dataclass
class StepDecision:
    """Algorithm 1 over every pool of a step, per scored micro-batch: ``keep`` bool [B] and
    ``prune`` bool [B] on the host (rows whose tokens are pruned: Q2), ``token_keep`` bool [B, T]
    on the device (the label positions that stay in the loss); ``levels``: each pool's quantile
    level; ``kept_tokens``: label tokens left in the loss (counted on the host).

    ``host``: the step's per-sample statistics, on the host (:class:`~.decision.HostStats`, the
    rules' features included). ``flags``: per active rule, its decision-log field -> bool [n] over
    the step, the samples it kept out. ``global_pool``: ``pool: global``'s gathered pool (None
    otherwise or in one process)."""

    keep: list[torch.Tensor]
    prune: list[torch.Tensor]
    token_keep: list[torch.Tensor]
    levels: list[float]
    kept_tokens: int | None = None
    host: HostStats | None = None
    flags: dict[str, torch.Tensor] = field(default_factory=dict)
    global_pool: GlobalPool | None = None

    @property
    def excluded(self) -> torch.Tensor | None:
        """``drop_highest_ppl`` / ``drop_ppl_outliers``: the samples kept out (None when neither is on)."""
        return self.flags.get("excluded")

    @property
    def suspects(self) -> torch.Tensor | None:
        """``reference: base``: the samples suspected of a wrong label (None when it is off)."""
        return self.flags.get("suspect")


@dataclass
class StepResult:
    """What :func:`select_step` returns.

    - ``micro_batches``: what to train, in order. At most as many as were fetched, and the same
      number on every rank. Equal to the fetched list when ``pruned`` is False.
    - ``num_label_tokens``: this process's label tokens in ``micro_batches`` (positions 1.. whose
      label is not -100: the predictions a causal-LM loss averages over).
    - ``pruned``: False for a step where no rank kept a label token (every sample lacks one), or
      when nothing is pruned (both ratios 1): then the step is trained as fetched.
    - ``scored``: the micro-batches as scored (packed ones unpacked: one row per segment), with
      ``scores`` and ``decision`` per scored micro-batch; None when nothing was scored.
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


def decide_step(scores: Sequence[Scores], config: QTuningConfig, references: Sequence[torch.Tensor] | None = None,
                collectives: Collectives | None = None, *, rules: Sequence[Rule] | None = None,
                inputs: Mapping[str, Any] | None = None) -> StepDecision:
    """Algorithm 1 on each pool of a step (``pool``: the whole step, each micro-batch, or every
    rank's step), per scored micro-batch, with the ``rules`` the config turns on (default: fresh
    ones from :func:`~.rules.build_rules`). ``inputs``: what the rules' ``prepare`` returned
    (``references``: the base NLL of each micro-batch, the reference guard's input).

    The per-sample statistics and the rules' features go to the host in one copy; the rules and
    the triage run there; only the token stage runs on the device."""
    rules = build_rules(config) if rules is None else list(rules)
    inputs = dict(inputs or {})
    if references is not None:
        inputs["reference"] = references
    features: dict[str, torch.Tensor] = {}
    for rule in rules:
        features.update(rule.features(scores, inputs))
    host = host_stats(scores, features)  # the step's one device-to-host copy
    sizes = [s.ppl.numel() for s in scores]
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    pools = [[i] for i in range(len(scores))] if config.pool == "micro_batch" else [list(range(len(scores)))]
    spans = [slice(bounds[p[0]], bounds[p[-1] + 1]) for p in pools]
    collectives = collectives or Collectives()
    across_ranks = config.pool == "global" and collectives.world_size > 1  # else "global" is the step
    flags = {rule.log_field: torch.zeros(bounds[-1], dtype=torch.bool) for rule in rules}
    eligible = torch.ones(bounds[-1], dtype=torch.bool)
    for rule in (r for r in rules if r.local or not across_ranks):
        for span in spans:  # each pool's own verdict
            out = rule.exclude(_pool(host.subset(span)))
            flags[rule.log_field][span] |= out
            eligible[span] &= ~out
    global_pool = None
    if across_ranks:
        global_pool, whole = gather_pool(host, collectives, eligible)
        own = global_pool.groups == global_pool.rank
        for rule in (r for r in rules if not r.local):
            out = rule.exclude(_pool(whole))
            flags[rule.log_field] |= out[own]
            global_pool.eligible &= ~out
        if rules and _kept_out_every_sample(whole, global_pool.eligible):  # (the same on every rank)
            global_pool.eligible[:] = True
            eligible[:] = True
            for mask in flags.values():
                mask[:] = False
    elif rules:
        for span in spans:
            if _kept_out_every_sample(host.subset(span), eligible[span]):
                eligible[span] = True
                for mask in flags.values():
                    mask[span] = False
    keep, prune, token_keep = [None] * len(scores), [None] * len(scores), [None] * len(scores)
    levels, kept_tokens = [], 0
    for pool, span in zip(pools, spans):
        decision = decide([scores[i] for i in pool], config, global_pool, eligible=eligible[span],
                          host=host.subset(span))
        levels.append(decision.triage.level)
        kept_tokens += decision.kept_tokens
        prune_split = decision.triage.prune_tokens.split([sizes[i] for i in pool])
        for i, k, p, t in zip(pool, decision.keep, prune_split, decision.token_keep):
            keep[i], prune[i], token_keep[i] = k, p, t
    return StepDecision(keep, prune, token_keep, levels, kept_tokens, host, flags, global_pool)


def _kept_out_every_sample(stats: HostStats, eligible: torch.Tensor) -> bool:
    """Whether the rules kept out every scored sample of a pool. Then the pool is decided by the
    paper's triage alone (the rules' flags cleared), with a warning: a step that trains nothing is
    not one the Trainer can take, and training the whole pool as fetched would undo the pruning."""
    scored = _pool(stats).scored
    if not scored.any() or (eligible & scored).any():
        return False
    logger.warning("QTuning: the rules beyond the paper kept out all %d scored samples of a pool; this pool is "
                   "decided by the paper's triage alone", int(scored.sum()))
    return True


def _pool(stats: HostStats) -> Pool:
    return Pool(stats.ppl, stats.entropy, stats.features)


Decide = Callable[[Sequence[Scores], Mapping[str, Any]], StepDecision]


def select_step(
    model: nn.Module,
    micro_batches: Sequence[Mapping[str, Any]],
    config: QTuningConfig,
    *,
    rules: Sequence[Rule] | None = None,
    step: int | None = None,
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
    - ``rules``: the config's rules (:func:`~qtuning_plugin.core.rules.build_rules`), created once
      and passed at every step: a rule may keep state across steps (the reference guard caches
      each sample's base NLL). Needed when the config turns on such a rule.
    - ``step``: the optimizer step's index from 0, if known (for messages only).
    - ``pad_id`` / ``padding_side``: used when no fetched row is padded (read from the batches
      otherwise); pass the tokenizer's.
    - ``collectives``: see :class:`~qtuning_plugin.core.distributed.Collectives` (default:
      ``torch.distributed``, local in one process).
    - ``decide_fn(scores, inputs) -> StepDecision``: another decision rule on the same scores (a
      random-pruning baseline, say); ``inputs`` is what the rules prepared. Default
      :func:`decide_step` with ``config`` and ``rules``.
    """
    if not micro_batches:
        raise ValueError("select_step: no micro-batches")
    if rules is None:
        rules = build_rules(config)
        stateful = [r.name for r in rules if r.stateful]
        if stateful:
            raise ValueError(f"select_step: {', '.join(stateful)} keeps state across steps: pass "
                             "rules=build_rules(config), created once and passed at every step")
    fetched = list(micro_batches)
    if config.prunes_nothing:
        return StepResult(fetched, label_tokens(fetched), pruned=False)
    started = time.perf_counter()
    host = host_copies(fetched)  # the step's layout on the host: sync 1 of 2 (padded batches)
    for batch in host:
        check_batch(batch)
    collectives = collectives or Collectives(fetched[0]["input_ids"].device)
    layout = _Layout(packed_layout(host[0]), infer_pad_id(host, pad_id), infer_padding_side(host, padding_side))
    scored, unpacked, scores, inputs = _score(model, fetched, host, layout, config, rules, collectives)
    if decide_fn is not None:
        decision = decide_fn(scores, inputs)
    else:
        decision = decide_step(scores, config, collectives=collectives, rules=rules, inputs=inputs)  # sync 2 of 2
    if decision.host is None:  # a decide_fn that did not copy the statistics
        decision.host = host_stats(scores)
    if decision.kept_tokens is None:  # a decide_fn that did not count them
        decision.kept_tokens = int(sum(t.sum() for t in decision.token_keep))
    result = StepResult(fetched, 0, pruned=False, scored=scored, scores=scores, decision=decision)
    _train_what_was_kept(result, host, unpacked, layout, collectives, step)
    result.seconds = time.perf_counter() - started
    return result


@dataclass
class _Layout:
    packed: str | None  # packing.LAYOUTS, or None for padded batches
    pad_id: int
    side: str


def _score(model, fetched, host, layout: _Layout, config, rules, collectives):
    """Score the step's samples (one no-grad forward per micro-batch, plus any a rule asks for):
    (the micro-batches as scored, the unpacked segments or None, their scores, the rules' inputs)."""
    unpacked = None
    if layout.packed is not None:  # a sample is a segment: score and decide on the segments, unpacked
        unpacked = [unpack(b, layout.packed, layout.pad_id) for b in fetched]
        # a micro-batch with no labelled segment is scored as one masked segment, so every rank scores alike
        unpacked = [u if u.rows else first_segment(b, layout.packed) for u, b in zip(unpacked, fetched)]
        scored, host = [u.batch for u in unpacked], [None] * len(fetched)
    else:
        scored = fetched
    # a packed micro-batch is scored as its rows come (not padded to the longest segment); one
    # without a labelled segment, and an ordinary batch, as the padded batch in ``scored``
    chunk_size = config.chunk_size
    scorers = [None] * len(scored) if unpacked is None else [
        functools.partial(score_packed, model, b, layout.packed, u, chunk_size=chunk_size) if u.packed else None
        for b, u in zip(fetched, unpacked)]
    with scoring_mode(model):
        scores = [score() if score is not None else score_batch(model, b, chunk_size=chunk_size, host=h)
                  for b, h, score in zip(scored, host, scorers)]
        context = StepContext(model, scored, scores, scorers, collectives, chunk_size,
                              host=host if unpacked is None else None)
        inputs: dict[str, Any] = {}
        for rule in rules:
            inputs.update(rule.prepare(context))
    return scored, unpacked, scores, inputs


def _train_what_was_kept(result: StepResult, host, unpacked, layout: _Layout, collectives, step) -> None:
    """Re-batch (or re-pack) the kept rows into ``result.micro_batches``, as many on every rank."""
    d, fetched = result.decision, result.micro_batches
    if layout.packed is None:
        real = rebatch(fetched, d.keep, d.token_keep, pad_id=layout.pad_id, side=layout.side, host=host)
    else:
        real = repack_kept(fetched, unpacked, d.keep, d.token_keep, layout.packed, layout.pad_id)
    # Every rank must run the same number of training forwards (DDP broadcasts buffers in each,
    # FSDP / ZeRO-3 gather parameters, TRL gathers metrics) and the same collectives, so both
    # branches below are decided together: one all-reduce per step, on every rank.
    target, any_tokens = collectives.all_reduce_max([len(real), int(d.kept_tokens > 0)])
    if not any_tokens:
        # No rank kept a label token: every sample of the step lacks one (e.g. all truncated
        # away). There is nothing to prune; the step is trained as fetched, as without Q-Tuning.
        logger.warning("QTuning: no sample of step %s has a label token; the step is trained as fetched",
                       "?" if step is None else step + 1)
        result.num_label_tokens = label_tokens(fetched)
        return
    if layout.packed is None:
        real = fill_to_count(real, target, fetched, pad_id=layout.pad_id, side=layout.side)
    else:
        real = split_to_count(real or [masked_segment(fetched[0], layout.packed, layout.pad_id)], target,
                              layout.packed, layout.pad_id)
    result.micro_batches, result.pruned, result.num_label_tokens = real, True, d.kept_tokens
