"""One optimizer step of Q-Tuning, for any training loop: :func:`select_step`.

Given the micro-batches of one optimizer step (before any forward), it scores every sample with
the model being trained (one no-grad forward per micro-batch), decides with Algorithm 1 on each
pool (:func:`decide_step`: the paper, plus the rules the config turns on), and returns what
to train: the kept rows, their pruned tokens' labels masked, re-batched (or, for packed batches,
re-packed) into as few micro-batches as the batch size allows, with their exact label-token count.
Train those micro-batches and divide the summed cross-entropy by that count (summed over ranks):
the loss is the mean over the kept tokens of the kept samples. ``select_step`` is three calls,
usable apart (to decide otherwise on the same scores): :func:`score_step`, :func:`decide_step`,
:func:`train_kept`.

Several processes: every rank must run the same forwards and collectives, so each branch that
changes them is decided by all ranks together through ``collectives``
(:class:`~qtuning_plugin.core.distributed.Collectives`): which extra forwards a rule runs, how
many micro-batches each rank trains (the most any rank needs; a rank that needs fewer splits its
rows or adds micro-batches whose labels are all masked) and whether any rank kept a label token
at all; ``pool: global`` gathers every rank's scores. Pure torch: no Trainer.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from torch import nn

from .batch import fill_to_count, host_copies, infer_pad_id, infer_padding_side, rebatch
from .config import QTuningConfig
from .distributed import Collectives
from .packing import (first_segment, masked_segment, packed_layout, repack_kept, score_packed, split_to_count,
                      unpack)
from .rules import Rule, StepContext, build_rules
from .scoring import IGNORE_INDEX, Scores, score_batch, scoring_mode
from .step_decision import StepDecision, decide_step

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What :func:`select_step` (and :func:`train_kept`) returns.

    - ``micro_batches``: what to train, in order. At most as many as were fetched, and the same
      number on every rank. Equal to the fetched list when ``pruned`` is False.
    - ``num_label_tokens``: this process's label tokens in ``micro_batches`` (positions 1.. whose
      label is not -100: the predictions a causal-LM loss averages over).
    - ``pruned``: False for a step where no rank kept a label token (every sample lacks one), or
      when nothing is pruned (both ratios 1): then the step is trained as fetched.
    - ``scored``: the micro-batches as scored (packed ones unpacked: one row per segment), with
      ``scores`` and ``decision`` per scored micro-batch; None when nothing was scored.
    - ``seconds``: wall time of scoring, deciding and re-batching.
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
) -> StepResult:
    """Score, decide and re-batch one optimizer step's ``micro_batches`` (see the module's doc):
    :func:`score_step`, :func:`decide_step`, :func:`train_kept`.

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
    """
    rules = _rules_for(config, rules, micro_batches, "select_step")
    if config.prunes_nothing:
        fetched = list(micro_batches)
        return StepResult(fetched, label_tokens(fetched), pruned=False)
    scored = score_step(model, micro_batches, config, rules=rules, pad_id=pad_id, padding_side=padding_side,
                        collectives=collectives)
    decision = decide_step(scored.scores, config, collectives=scored.collectives, rules=rules,
                           inputs=scored.inputs)  # sync 2 of 2
    return train_kept(scored, decision, step=step)


def _rules_for(config: QTuningConfig, rules: Sequence[Rule] | None, micro_batches, caller: str) -> Sequence[Rule]:
    if not micro_batches:
        raise ValueError(f"{caller}: no micro-batches")
    if rules is not None:
        return rules
    rules = build_rules(config)
    stateful = [r.name for r in rules if r.stateful]
    if stateful:
        raise ValueError(f"{caller}: {', '.join(stateful)} keeps state across steps: pass "
                         "rules=build_rules(config), created once and passed at every step")
    return rules


@dataclass
class _Layout:
    packed: str | None  # packing.LAYOUTS, or None for padded batches
    pad_id: int
    side: str


@dataclass
class ScoredStep:
    """One step scored, not yet decided (:func:`score_step`): ``scores`` (one
    :class:`~.scoring.Scores` per scored micro-batch) and ``inputs`` (what the rules' ``prepare``
    returned) are what a decision takes (:func:`decide_step`); ``scored``: the micro-batches as
    scored (packed ones unpacked: one row per segment). The rest is for :func:`train_kept`."""

    fetched: list[dict[str, Any]]
    scored: list[dict[str, Any]]
    scores: list[Scores]
    inputs: dict[str, Any]
    collectives: Collectives
    host: list  # the fetched batches' layout on the host (padded batches)
    unpacked: list | None
    layout: _Layout
    started: float  # time.perf_counter() when scoring began


def score_step(model: nn.Module, micro_batches: Sequence[Mapping[str, Any]], config: QTuningConfig, *,
               rules: Sequence[Rule] | None = None, pad_id: int | None = None, padding_side: str | None = None,
               collectives: Collectives | None = None) -> ScoredStep:
    """The first part of :func:`select_step` (same arguments): score every sample of the step,
    one no-grad forward per micro-batch plus any a rule asks for (``Rule.prepare``)."""
    rules = _rules_for(config, rules, micro_batches, "score_step")
    fetched = list(micro_batches)
    started = time.perf_counter()
    host = host_copies(fetched)  # the step's layout on the host: sync 1 of 2 (padded batches)
    for batch in host:
        check_batch(batch)
    collectives = collectives or Collectives(fetched[0]["input_ids"].device)
    layout = _Layout(packed_layout(host[0]), infer_pad_id(host, pad_id), infer_padding_side(host, padding_side))
    scored, unpacked, scores, inputs = _score(model, fetched, host, layout, config, rules, collectives)
    return ScoredStep(fetched, scored, scores, inputs, collectives, host, unpacked, layout, started)


def train_kept(scored: ScoredStep, decision: StepDecision, *, step: int | None = None) -> StepResult:
    """The last part of :func:`select_step`: re-batch (or re-pack) what ``decision`` keeps of
    ``scored`` into as few micro-batches as the batch size allows, as many on every rank.
    ``decision`` is complete (:class:`StepDecision`: ``host`` and ``kept_tokens`` filled), one
    entry per scored micro-batch."""
    if decision.host is None or decision.kept_tokens is None or len(decision.keep) != len(scored.scores):
        raise ValueError("train_kept: the decision needs one keep / token_keep per scored micro-batch, its "
                         "host statistics (core.decision.host_stats) and its kept_tokens count")
    result = StepResult(scored.fetched, 0, pruned=False, scored=scored.scored, scores=scored.scores,
                        decision=decision)
    _train_what_was_kept(result, scored.host, scored.unpacked, scored.layout, scored.collectives, step)
    result.seconds = time.perf_counter() - scored.started
    return result


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
