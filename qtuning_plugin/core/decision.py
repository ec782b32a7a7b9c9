"""Algorithm 1 of the paper for one selection pool: triage the samples (on the host), then prune the
tokens of the kept misconception samples (on the scores' device). Pure torch; the step
(:mod:`.step`) calls :func:`decide` once per pool."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .config import QTuningConfig
from .sample_stage import Triage, scored_mask, triage
from .scoring import Scores
from .tokens import pooled_token_keep_mask, token_keep_mask, tokens_to_keep


@dataclass
class HostStats:
    """A pool's per-sample statistics on the host, float64 [n] each: ``ppl``, ``entropy``
    (NaN: no score), ``input_tokens`` (non-padding tokens), ``n_tokens`` (label tokens), and the
    rules' ``features`` by name. :func:`host_stats` makes them in one device-to-host copy."""

    ppl: torch.Tensor
    entropy: torch.Tensor
    input_tokens: torch.Tensor
    n_tokens: torch.Tensor
    features: dict[str, torch.Tensor]

    def subset(self, index: torch.Tensor | slice) -> "HostStats":
        return HostStats(self.ppl[index], self.entropy[index], self.input_tokens[index], self.n_tokens[index],
                         {k: v[index] for k, v in self.features.items()})


def host_stats(scores: Sequence[Scores], features: dict[str, torch.Tensor] | None = None) -> HostStats:
    """Every per-sample number the decision needs, copied to the host at once (one sync)."""
    features = features or {}
    columns = [torch.cat([s.ppl.double() for s in scores]), torch.cat([s.entropy.double() for s in scores]),
               torch.cat([s.input_tokens.double() for s in scores]), torch.cat([s.n_tokens.double() for s in scores]),
               *(f.to(scores[0].ppl.device, torch.float64) for f in features.values())]
    host = torch.stack(columns).cpu()
    return HostStats(host[0], host[1], host[2], host[3], dict(zip(features, host[4:])))


@dataclass
class GlobalPool:
    """Every rank's scores of one step (``pool: global``), concatenated in rank order, on the host.

    ``groups`` [N] holds each sample's rank; ``rank`` is this process's. The triage runs on the
    whole pool (identical on every rank) and this rank takes its own part: exactly
    K = max(1, floor(r_s n_rank)) of its own samples. ``eligible`` [N]: every rank's."""

    ppl: torch.Tensor
    entropy: torch.Tensor
    groups: torch.Tensor
    rank: int
    eligible: torch.Tensor | None = None


def gather_pool(host: HostStats, collectives: Any, eligible: torch.Tensor) -> tuple[GlobalPool, HostStats]:
    """``pool: global``: every rank's statistics and eligibility, in rank order, on the host (a
    collective: every rank calls it once per step)."""
    columns = [host.ppl, host.entropy, host.input_tokens, host.n_tokens, *host.features.values(),
               eligible.to(torch.float64)]
    gathered = [torch.tensor(g, dtype=torch.float64) for g in collectives.all_gather(torch.stack(columns).tolist())]
    whole = torch.cat(gathered, dim=1)
    groups = torch.cat([torch.full((g.shape[1],), r, dtype=torch.long) for r, g in enumerate(gathered)])
    names = list(host.features)
    stats = HostStats(whole[0], whole[1], whole[2], whole[3], dict(zip(names, whole[4:4 + len(names)])))
    return GlobalPool(ppl=stats.ppl, entropy=stats.entropy, groups=groups, rank=collectives.rank,
                      eligible=whole[-1] > 0), stats


@dataclass
class Decision:
    """What to train from a pool made of one or more padded batches (in pool order).

    - ``triage``: the sample-stage decision over the whole pool (n = sum of the B_i), on the host.
    - ``keep``: per batch, bool [B_i] on the host, the rows to train.
    - ``token_keep``: per batch, bool [B_i, T_i] on the scores' device, the label positions that
      stay in the loss (all trainable positions of Q4 rows, the pruned subset for Q2 rows,
      nothing for dropped rows).
    - ``kept_tokens``: the label tokens left in the loss over the pool (from host counts).
    """

    triage: Triage
    keep: list[torch.Tensor]
    token_keep: list[torch.Tensor]
    kept_tokens: int


def decide(scores: Sequence[Scores], config: QTuningConfig, global_pool: GlobalPool | None = None,
           eligible: torch.Tensor | None = None, host: HostStats | None = None) -> Decision:
    """Run both stages of Q-Tuning on a pool whose batches were scored by ``score_batch``.

    Rows without a score (no trainable token, or a NaN from a broken forward) are not samples:
    they are never kept and do not count in K or in the batch token budget (see :func:`triage`).

    With ``global_pool`` the sample stage ranks this rank's samples (``scores``) against every
    rank's; the token stage is per sample and needs only this rank's scores. ``eligible`` (bool
    [n] on the host; None: all): samples marked False are never kept, but K still counts them.
    ``host``: the pool's :func:`host_stats`, if the caller has them (else copied here)."""
    if not scores:
        raise ValueError("decide: the pool is empty")
    sizes = [s.ppl.numel() for s in scores]
    host = host_stats(scores) if host is None else host
    if global_pool is None:
        result = triage(host.ppl, host.entropy, config.sample_ratio, eligible=eligible)
    else:
        whole = triage(global_pool.ppl, global_pool.entropy, config.sample_ratio, groups=global_pool.groups,
                       eligible=global_pool.eligible)
        own = global_pool.groups == global_pool.rank
        if int(own.sum()) != sum(sizes):
            raise ValueError(f"decide: the global pool holds {int(own.sum())} samples of rank "
                             f"{global_pool.rank}, its scores {sum(sizes)}")
        result = Triage(keep=whole.keep[own], prune_tokens=whole.prune_tokens[own], level=whole.level,
                        core=whole.core[own])
    keep = list(result.keep.split(sizes))
    prune = list(result.prune_tokens.split(sizes))
    token_keep, kept_tokens = _token_stage(scores, config, host, result, keep, prune)
    return Decision(triage=result, keep=keep, token_keep=token_keep, kept_tokens=kept_tokens)


def _token_stage(scores, config, host, result, keep, prune):
    """Per batch, the kept label positions (on the device), and how many there are (on the host)."""
    device = scores[0].nll.device
    prune_dev = [p.to(device) for p in prune]
    candidates = [s.trainable & p[:, None] for s, p in zip(scores, prune_dev)]
    n_tokens = host.n_tokens.long()
    whole_rows = int(n_tokens[result.keep & ~result.prune_tokens].sum())
    pruned_rows = n_tokens[result.prune_tokens]
    if config.token_ratio == 1:
        pruned_keep, kept = candidates, whole_rows + int(pruned_rows.sum())
    elif config.token_budget == "sample":
        pruned_keep = [token_keep_mask(s.nll, c, config.token_ratio, config.neighbor_lambda, config.keep_tokens)
                       for s, c in zip(scores, candidates)]
        kept = whole_rows + int(tokens_to_keep(pruned_rows, config.token_ratio).sum())
    else:  # "batch": the authors' code drop, one budget round(r_s r_t N) over the pool's N tokens
        # (of its samples: rows without a score, e.g. without any label token, are not in the pool)
        pool_tokens = int(host.input_tokens[scored_mask(host.ppl, host.entropy)].sum())
        kept_inputs = int(host.input_tokens[result.keep].sum())
        n_drop = max(0, kept_inputs - round(config.sample_ratio * config.token_ratio * pool_tokens))
        n_candidates = int(pruned_rows.sum())
        pruned_keep = pooled_token_keep_mask([s.nll for s in scores], candidates, n_drop, config.neighbor_lambda,
                                             config.keep_tokens, n_candidates=n_candidates)
        kept = whole_rows + n_candidates - min(n_drop, n_candidates)
    token_keep = [torch.where(p[:, None], pk, s.trainable) & k.to(device)[:, None]
                  for s, k, p, pk in zip(scores, keep, prune_dev, pruned_keep)]
    return token_keep, kept
