"""Algorithm 1 over one optimizer step's pools, with the rules the config turns on: :func:`decide_step`.

It takes the step's scores (one :class:`~.scoring.Scores` per scored micro-batch) and returns a
:class:`StepDecision`: which samples each micro-batch keeps and which label tokens stay in the loss.
The per-sample statistics and the rules' features go to the host in one copy; the rules and the
triage run there, the token stage on the device. :func:`~.step.select_step` calls it between
scoring and re-batching; :meth:`qtuning_plugin.QTuning.decide` is the Trainer hook's call of it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from .config import QTuningConfig
from .decision import GlobalPool, HostStats, decide, gather_pool, host_stats
from .distributed import Collectives
from .rules import Pool, Rule, build_rules
from .scoring import Scores

logger = logging.getLogger(__name__)


@dataclass
class StepDecision:
    """Algorithm 1 over every pool of a step, per scored micro-batch: ``keep`` bool [B] and
    ``prune`` bool [B] on the host (rows whose tokens are pruned: Q2), ``token_keep`` bool [B, T]
    on the device (the label positions that stay in the loss); ``levels``: each pool's quantile
    level; ``kept_tokens``: label tokens left in the loss (counted on the host); ``host``: the
    step's per-sample statistics, on the host (:func:`~.decision.host_stats`, the rules' features
    included). A decision built by other means (a random baseline, say) fills these too. ``flags``: per active rule, its decision-log field -> bool [n] over
    the step, the samples it kept out. ``global_pool``: ``pool: global``'s gathered pool (None
    otherwise or in one process)."""

    keep: list[torch.Tensor]
    prune: list[torch.Tensor]
    token_keep: list[torch.Tensor]
    levels: list[float]
    kept_tokens: int
    host: HostStats
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
