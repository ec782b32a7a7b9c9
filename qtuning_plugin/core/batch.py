"""Padded batches: apply a decision (drop rows, mask pruned tokens, trim padding columns), and
re-batch a step's kept rows into as few micro-batches as the batch size allows."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from .scoring import IGNORE_INDEX


def host_copies(batches: Sequence[Mapping[str, Any]],
                keys: Sequence[str] = ("input_ids", "labels", "attention_mask", "position_ids")) -> list[dict[str, Any]]:
    """The integer per-token tensors of ``batches`` (``keys`` present) on the host, in one
    device-to-host copy: the layout of a step (padding, labels, segments) read once, so that
    deciding and re-batching never wait for the device again."""
    parts = [(i, k, b[k]) for i, b in enumerate(batches) for k in keys if isinstance(b.get(k), torch.Tensor)]
    out: list[dict[str, Any]] = [{} for _ in batches]
    if not parts:
        return out
    flat = torch.cat([t.reshape(-1).to(torch.long) for _, _, t in parts]).cpu()
    for (i, k, t), x in zip(parts, flat.split([t.numel() for _, _, t in parts])):
        out[i][k] = x.view(t.shape).to(t.dtype)
    return out


def apply_decision(
    batch: Mapping[str, Any],
    keep: torch.Tensor,
    token_keep: torch.Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    host_mask: torch.Tensor | None = None,
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

    The input batch is not modified. ``keep`` on the host and ``host_mask`` (the batch's
    ``attention_mask`` on the host, if it has one) spare the waits for the device.
    """
    labels = batch["labels"]
    b, t = labels.shape
    keep = keep.to(dtype=torch.bool).cpu()
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
        cols = used_columns(host_mask if host_mask is not None else mask.cpu(), rows)
    rows = rows.to(labels.device)

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


def used_columns(mask: torch.Tensor, rows: torch.Tensor) -> slice:
    """The columns of a host ``mask`` [B, T] that are not padding in every one of ``rows``."""
    used = (mask[rows] != 0).any(0).nonzero().squeeze(1)
    return slice(int(used[0]), int(used[-1]) + 1) if used.numel() else slice(None)


def padding_side(attention_mask: torch.Tensor) -> str | None:
    """"left" or "right" as seen in a padded batch's mask; None when no row is padded."""
    padded = (attention_mask == 0).any(1)
    if not padded.any():
        return None
    return "left" if bool((attention_mask[padded, 0] == 0).all()) else "right"


def split_rows(batch: Mapping[str, Any], host_mask: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """The rows of a padded batch, each without its padding: per-token tensors ([B, T, ...]) become
    [n_b, ...], per-sample tensors ([B, ...]) become their row; other values are dropped.
    ``host_mask``: the batch's ``attention_mask`` on the host, if the caller has it."""
    labels = batch["labels"]
    b, t = labels.shape
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape == (b, t):
        mask = host_mask if host_mask is not None else mask.cpu()
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


def infer_pad_id(batches: Sequence[Mapping[str, Any]], default: int | None = None) -> int:
    """The pad id a collator used: read from a padded position of ``batches``, else ``default``
    (the tokenizer's), else 0."""
    for b in batches:
        mask = b.get("attention_mask")
        if isinstance(mask, torch.Tensor) and (mask == 0).any():
            return int(b["input_ids"][mask == 0][0])
    return int(default) if default is not None else 0


def infer_padding_side(batches: Sequence[Mapping[str, Any]], default: str | None = None) -> str:
    """"left" or "right", as seen in ``batches``, else ``default`` (the tokenizer's), else "right"."""
    for b in batches:
        mask = b.get("attention_mask")
        if isinstance(mask, torch.Tensor) and (side := padding_side(mask)):
            return side
    return default or "right"


def rebatch(batches: Sequence[Mapping[str, Any]], keep: Sequence[torch.Tensor], token_keep: Sequence[torch.Tensor],
            *, pad_id: int, side: str, host: Sequence[Mapping[str, torch.Tensor]] | None = None) -> list[dict[str, Any]]:
    """The kept rows of a step's padded micro-batches, labels outside ``token_keep`` masked, sorted
    by length and padded (``side``, ``pad_id``) into as few micro-batches as the largest fetched one
    holds rows. An empty list when no row is kept. ``keep`` on the host and ``host`` (each batch's
    :func:`host_copies`) spare the waits for the device."""
    rows = []
    for i, (batch, k, t) in enumerate(zip(batches, keep, token_keep)):
        k = k.cpu()
        if k.any():
            mask = host[i].get("attention_mask") if host is not None else None
            kept_mask = None
            if mask is not None:  # the kept rows' mask, trimmed as apply_decision trims them
                at = k.nonzero().squeeze(1)
                kept_mask = mask[at][:, used_columns(mask, at)]
            rows += split_rows(apply_decision(batch, k, t, host_mask=mask), kept_mask)
    rows.sort(key=lambda r: -r["labels"].shape[0])  # similar lengths together: less padding
    size = max(b["labels"].shape[0] for b in batches)
    return _collate_groups([rows[i:i + size] for i in range(0, len(rows), size)], batches, pad_id, side)


def fill_to_count(real: list[dict[str, Any]], target: int, batches: Sequence[Mapping[str, Any]], *,
                  pad_id: int, side: str) -> list[dict[str, Any]]:
    """Padded steps under several processes: ``target`` micro-batches (the most any rank needs).
    The kept rows are spread over more, smaller micro-batches; if there are fewer rows than
    ``target`` (or none, on a rank whose samples all lack a label token), the rest are one-row
    micro-batches whose labels are all masked: a forward and a zero gradient, so the loss and
    its token count are unchanged."""
    if len(real) >= target:
        return real
    rows = [r for b in real for r in split_rows(b)]
    n = min(len(rows), target)
    groups = [rows[i::n] for i in range(n)] if n else []
    out = _collate_groups(groups, batches, pad_id, side) if groups else []
    filler = split_rows(batches[0])[:1]
    filler = [{**filler[0], "labels": torch.full_like(filler[0]["labels"], IGNORE_INDEX)}]
    while len(out) < target:
        out.insert(0, _collate_groups([filler], batches, pad_id, side)[0])
    return out


def _collate_groups(groups, batches, pad_id: int, side: str) -> list[dict[str, Any]]:
    extras = {k: v for k, v in batches[0].items() if not isinstance(v, torch.Tensor)}
    return [{**collate_rows(g, side=side, pad_values={"input_ids": pad_id}), **extras} for g in groups if g]
