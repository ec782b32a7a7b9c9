"""Applying a decision to a padded batch: drop rows, mask pruned tokens, trim padding columns."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .scoring import IGNORE_INDEX, trainable_positions


def apply_decision(
    batch: Mapping[str, Any],
    keep: torch.Tensor,
    token_keep: torch.Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, Any]:
    """A new padded batch with only the kept rows, pruned tokens out of the loss, and no column
    that is padding in every remaining row.

    - ``keep`` bool [B]: rows to keep (at least one).
    - ``token_keep`` bool [B, T] or None: for each row, the trainable positions that stay in the
      loss (aligned with ``labels``, as :func:`~qtuning_plugin.core.token_keep_mask` returns);
      every other label becomes ``ignore_index``. None leaves the labels as they are. Positions
      are only removed from the loss, never from the input: pruned tokens stay as context.
    - Every tensor whose first dimension is B is indexed by row; those with a second dimension T
      lose the leading and trailing columns where ``attention_mask`` is 0 in all kept rows (left
      or right padding). Without ``attention_mask`` no column is trimmed. Other values are kept.

    The input batch is not modified.
    """
    labels = batch["labels"]
    b, t = labels.shape
    keep = keep.to(device=labels.device, dtype=torch.bool)
    if keep.shape != (b,):
        raise ValueError(f"apply_decision: keep must be bool [{b}], got shape {tuple(keep.shape)}")
    if not keep.any():
        raise ValueError("apply_decision: no row kept; a batch needs at least one row")
    if token_keep is not None and token_keep.shape != (b, t):
        raise ValueError(f"apply_decision: token_keep must be bool [{b}, {t}], got {tuple(token_keep.shape)}")

    rows = keep.nonzero().squeeze(1)
    cols = slice(None)
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape == (b, t):
        used = (mask[rows] != 0).any(0).nonzero().squeeze(1)
        if used.numel():
            cols = slice(int(used[0]), int(used[-1]) + 1)

    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == b:
            value = value[rows]
            if value.ndim >= 2 and value.shape[1] == t:
                value = value[:, cols]
        out[key] = value
    if token_keep is not None:
        pruned = trainable_positions(labels[rows], ignore_index) & ~token_keep.to(labels.device)[rows].bool()
        out["labels"] = out["labels"].masked_fill(pruned[:, cols], ignore_index)
    return out
