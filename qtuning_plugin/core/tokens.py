"""Token stage of Q-Tuning (docs/method.md §3): inside misconception (Q2) samples, keep the tokens
with the lowest context-aware perplexity score and mask the rest out of the loss."""

from __future__ import annotations

from typing import Sequence

import torch

from .config import OPTIONS

# The config's declarations check the arguments of the same meaning (one message for one range).
_OPTION = {o.name: o for o in OPTIONS if o.name in ("token_ratio", "neighbor_lambda", "keep_tokens")}

# exp(700) ~ 1e304: three of them still sum below float64's max. Beyond nll = 700 (p < 1e-304)
# scores saturate and ties go to the earlier position (the spec allows clamping before exp).
_MAX_NLL = 700.0


def context_scores(nll: torch.Tensor, trainable: torch.Tensor, neighbor_lambda: float) -> torch.Tensor:
    """s_i = (1 - lambda) PPL_i + lambda (PPL_{i-1} + PPL_{i+1}) on [B, T], float64 (paper Eq. 7).

    PPL_i = exp(nll_i); a neighbour outside the trainable positions (prompt, padding, another
    segment, beyond the row) contributes 0. Values at non-trainable positions are meaningless.
    """
    # A NaN nll (a broken forward) scores as the worst token.
    x = nll.to(torch.float64).nan_to_num(nan=_MAX_NLL).clamp(max=_MAX_NLL)
    ppl = torch.where(trainable.bool(), torch.exp(x), 0.0)
    left = torch.nn.functional.pad(ppl[:, :-1], (1, 0))
    right = torch.nn.functional.pad(ppl[:, 1:], (0, 1))
    return (1.0 - neighbor_lambda) * ppl + neighbor_lambda * (left + right)


def tokens_to_keep(n_trainable: torch.Tensor, token_ratio: float) -> torch.Tensor:
    """k = ceil(r_t * |T| - 1e-9) per row (the tolerance makes 0.7 * 10 keep 7)."""
    return torch.ceil(n_trainable.to(torch.float64) * token_ratio - 1e-9).clamp(min=0).long()


def _keep_lowest(scores: torch.Tensor, trainable: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per row of [R, T], True at the k[row] trainable positions with the lowest score
    (stable: of equal scores, the earlier position is kept)."""
    masked = scores.masked_fill(~trainable, float("inf"))
    order = torch.sort(masked, dim=1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return (rank < k.unsqueeze(1)) & trainable


def token_keep_mask(
    nll: torch.Tensor,
    trainable: torch.Tensor,
    token_ratio: float,
    neighbor_lambda: float = 0.5,
    keep: str = "lowest",
) -> torch.Tensor:
    """Which trainable tokens of each row stay in the loss (docs/method.md §3), bool [B, T].

    ``nll`` [B, T]: per-token negative log-likelihood; ``trainable`` [B, T] bool: the positions
    T of each row (labels != -100 after the causal shift). Each row keeps exactly
    k = ceil(r_t |T_row|) of its trainable positions, those with the lowest context score
    (``keep="highest"``: the highest; ties to the earlier position either way); non-trainable
    positions and rows without trainable tokens are all False.
    """
    _check_token_args("token_keep_mask", nll, trainable, token_ratio, neighbor_lambda, keep)
    trainable = trainable.bool()
    scores = _oriented(context_scores(nll, trainable, neighbor_lambda), keep)
    return _keep_lowest(scores, trainable, tokens_to_keep(trainable.sum(1), token_ratio))


def pooled_token_keep_mask(
    nll: Sequence[torch.Tensor],
    trainable: Sequence[torch.Tensor],
    n_drop: int,
    neighbor_lambda: float = 0.5,
    keep: str = "lowest",
    *,
    n_candidates: int | None = None,
) -> list[torch.Tensor]:
    """The authors' code-drop rule (``token_budget="batch"``): over several [B_i, T_i] batches
    pooled together, drop the ``n_drop`` trainable tokens with the highest context score
    (each score computed within its own row, as in :func:`context_scores`; ``keep="highest"``:
    the lowest); of equal scores the later token (batch, row, column order) is dropped first.
    Returns the keep masks, bool [B_i, T_i]. ``n_candidates``: how many trainable tokens there
    are, if the caller knows (counted here otherwise: a device-to-host copy).
    """
    flat_scores, flat_trainable = [], []
    for x, m in zip(nll, trainable, strict=True):
        _check_token_args("pooled_token_keep_mask", x, m, None, neighbor_lambda, keep)
        flat_scores.append(_oriented(context_scores(x, m.bool(), neighbor_lambda), keep).reshape(-1))
        flat_trainable.append(m.bool().reshape(-1))
    scores, mask = torch.cat(flat_scores)[None], torch.cat(flat_trainable)[None]
    total = int(mask.sum()) if n_candidates is None else int(n_candidates)
    k = torch.tensor([max(0, total - int(n_drop))], device=scores.device)
    keep = _keep_lowest(scores, mask, k)[0]
    return [part.reshape(m.shape) for part, m in zip(keep.split([m.numel() for m in trainable]), trainable)]


def _oriented(scores: torch.Tensor, keep: str) -> torch.Tensor:
    """Scores whose lowest values are the tokens to keep."""
    return scores if keep == "lowest" else -scores


def _check_token_args(where, nll, trainable, token_ratio, neighbor_lambda, keep="lowest"):
    _OPTION["keep_tokens"].check(keep, label=f"{where}: keep")
    if nll.ndim != 2 or nll.shape != trainable.shape:
        raise ValueError(f"{where}: nll and trainable must both be [B, T], got {tuple(nll.shape)} and "
                         f"{tuple(trainable.shape)}")
    if token_ratio is not None:
        _OPTION["token_ratio"].check(token_ratio, label=f"{where}: token_ratio")
    _OPTION["neighbor_lambda"].check(neighbor_lambda, label=f"{where}: neighbor_lambda")
