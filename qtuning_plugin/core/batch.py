"""Applying a decision to a padded batch: drop rows, mask pruned tokens, trim padding columns."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .scoring import IGNORE_INDEX


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
    - ``token_keep`` bool [B, T] or None: for each row, the positions that stay in the loss
      (aligned with ``labels``, as :func:`~qtuning_plugin.core.decide` returns); every other
      label becomes ``ignore_index``, so the loss counts exactly these positions. None leaves
      the labels as they are. Positions are only removed from the loss, never from the input:
      pruned tokens stay as context.
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
    if token_keep is not None:  # exactly the decided positions stay in the loss
        dropped = ~token_keep.to(labels.device)[rows].bool()
        out["labels"] = out["labels"].masked_fill(dropped[:, cols], ignore_index)
    return out


def padding_side(attention_mask: torch.Tensor) -> str | None:
    """"left" or "right" as seen in a padded batch's mask; None when no row is padded."""
    padded = (attention_mask == 0).any(1)
    if not padded.any():
        return None
    return "left" if bool((attention_mask[padded, 0] == 0).all()) else "right"


def split_rows(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows of a padded batch, each without its padding: per-token tensors ([B, T, ...]) become
    [n_b, ...], per-sample tensors ([B, ...]) become their row; other values are dropped."""
    labels = batch["labels"]
    b, t = labels.shape
    mask = batch.get("attention_mask")
    rows = []
    for i in range(b):
        cols = slice(None)
        if isinstance(mask, torch.Tensor) and mask.shape == (b, t):
            used = (mask[i] != 0).nonzero().squeeze(1)
            if used.numel():
                cols = slice(int(used[0]), int(used[-1]) + 1)
        row = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == b:
                row[key] = value[i, cols] if value.ndim >= 2 and value.shape[1] == t else value[i]
        rows.append(row)
    return rows


def collate_rows(
    rows: list[Mapping[str, torch.Tensor]],
    *,
    side: str = "right",
    pad_values: Mapping[str, int] | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, torch.Tensor]:
    """Pad rows from :func:`split_rows` back into one batch. Per-token keys (those with as many
    entries as the row's ``labels``) are padded on ``side`` with ``pad_values[key]`` (labels with
    ``ignore_index``, every other key with 0 unless given); per-sample keys are stacked."""
    if not rows:
        raise ValueError("collate_rows: no rows")
    if side not in ("left", "right"):
        raise ValueError(f"collate_rows: side must be 'left' or 'right', got {side!r}")
    pad_values = {"labels": ignore_index, **(pad_values or {})}
    t = max(r["labels"].shape[0] for r in rows)
    out = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if all(v.ndim >= 1 and v.shape[0] == r["labels"].shape[0] for v, r in zip(values, rows)):
            fill = pad_values.get(key, 0)
            padded = values[0].new_full((len(rows), t, *values[0].shape[1:]), fill)
            for i, v in enumerate(values):
                n = v.shape[0]
                if side == "left":
                    padded[i, t - n:] = v
                else:
                    padded[i, :n] = v
            out[key] = padded
        else:
            out[key] = torch.stack(values)
    return out
