"""Algorithm 1 of the paper for one selection pool: triage the samples, then prune the tokens of
the kept misconception samples. Pure torch; the front ends call :func:`decide` once per pool."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .config import QTuningConfig
from .scoring import Scores
from .tokens import pooled_token_keep_mask, token_keep_mask
from .triage import Triage, triage


@dataclass
class GlobalPool:
    """Every rank's scores of one step (``pool: global``), concatenated in rank order.

    ``groups`` [N] holds each sample's rank; ``rank`` is this process's. The triage runs on the
    whole pool (identical on every rank) and this rank takes its own part: exactly
    K = max(1, floor(r_s n_rank)) of its own samples. ``eligible`` [N]: every rank's, as in
    :func:`decide`."""

    ppl: torch.Tensor
    entropy: torch.Tensor
    groups: torch.Tensor
    rank: int
    eligible: torch.Tensor | None = None


@dataclass
class Decision:
    """What to train from a pool made of one or more padded batches (in pool order).

    - ``triage``: the sample-stage decision over the whole pool (n = sum of the B_i).
    - ``keep``: per batch, bool [B_i], the rows to train.
    - ``token_keep``: per batch, bool [B_i, T_i], the label positions that stay in the loss
      (all trainable positions of Q4 rows, the pruned subset for Q2 rows, nothing for dropped rows).
    """

    triage: Triage
    keep: list[torch.Tensor]
    token_keep: list[torch.Tensor]


def decide(scores: Sequence[Scores], config: QTuningConfig, global_pool: GlobalPool | None = None,
           eligible: torch.Tensor | None = None, avoid_tokens: Sequence[torch.Tensor] | None = None) -> Decision:
    """Run both stages of Q-Tuning on a pool whose batches were scored by ``score_batch``.

    Rows without a score (no trainable token, or a NaN from a broken forward) are not samples:
    they are never kept and do not count in K or in the batch token budget (see :func:`triage`).

    With ``global_pool`` the sample stage ranks this rank's samples (``scores``) against every
    rank's; the token stage is per sample and needs only this rank's scores.

    ``eligible`` (bool [n] over the pool, the reference guard's verdict; None: all): samples
    marked False are never kept, but K still counts them (see :func:`triage`). ``avoid_tokens``
    (bool [B_i, T_i] per batch, ``reference_tokens``): tokens never kept in a pruned (Q2) row."""
    if not scores:
        raise ValueError("decide: the pool is empty")
    sizes = [s.ppl.numel() for s in scores]
    if global_pool is None:
        result = triage(torch.cat([s.ppl for s in scores]), torch.cat([s.entropy for s in scores]),
                        config.sample_ratio, top_up=config.top_up, eligible=eligible,
                        drop_highest=config.drop_highest_ppl, drop_outliers=config.drop_ppl_outliers)
    else:
        whole = triage(global_pool.ppl, global_pool.entropy, config.sample_ratio, groups=global_pool.groups,
                       top_up=config.top_up, eligible=global_pool.eligible, drop_highest=config.drop_highest_ppl,
                       drop_outliers=config.drop_ppl_outliers)
        own = global_pool.groups == global_pool.rank
        if int(own.sum()) != sum(sizes):
            raise ValueError(f"decide: the global pool holds {int(own.sum())} samples of rank "
                             f"{global_pool.rank}, its scores {sum(sizes)}")
        device = scores[0].ppl.device
        result = Triage(keep=whole.keep[own].to(device), prune_tokens=whole.prune_tokens[own].to(device),
                        level=whole.level, core=whole.core[own].to(device), excluded=whole.excluded[own].to(device))
    keep = list(result.keep.split(sizes))
    prune = list(result.prune_tokens.split(sizes))

    # Rows whose tokens are pruned; every other kept row keeps all its trainable positions.
    candidates = [s.trainable & p[:, None] for s, p in zip(scores, prune)]
    avoid = list(avoid_tokens) if avoid_tokens is not None else [None] * len(scores)
    if config.token_ratio == 1:
        pruned_keep = candidates
    elif config.token_budget == "sample":
        pruned_keep = [token_keep_mask(s.nll, c, config.token_ratio, config.neighbor_lambda, config.keep_tokens, a)
                       for s, c, a in zip(scores, candidates, avoid)]
    else:  # "batch": the authors' code drop, one budget round(r_s r_t N) over the pool's N tokens
        # (of its samples: rows without a score, e.g. without any label token, are not in the pool)
        pool_tokens = sum(int(s.input_tokens[~(s.ppl.isnan() | s.entropy.isnan())].sum()) for s in scores)
        kept_tokens = sum(int(s.input_tokens[k].sum()) for s, k in zip(scores, keep))
        n_drop = max(0, kept_tokens - round(config.sample_ratio * config.token_ratio * pool_tokens))
        pruned_keep = pooled_token_keep_mask([s.nll for s in scores], candidates, n_drop,
                                             config.neighbor_lambda, config.keep_tokens)
    if avoid_tokens is not None and (config.token_ratio == 1 or config.token_budget == "batch"):
        pruned_keep = [pk & ~a for pk, a in zip(pruned_keep, avoid)]  # (the per-sample budget chose around them)
    token_keep = [
        torch.where(p[:, None], pk, s.trainable) & k[:, None]
        for s, k, p, pk in zip(scores, keep, prune, pruned_keep)
    ]
    return Decision(triage=result, keep=keep, token_keep=token_keep)
