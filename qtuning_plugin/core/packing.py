"""Packed batches: a sample is a segment of a packed row. Unpack to score and decide, re-pack the kept.

Two layouts are recognised:

- ``"position_ids"``: a segment starts where ``position_ids == 0``. TRL padding-free / BFD packing
  sends one row and no ``attention_mask`` (TRL >= 1.16 also ``cu_seq_lens_q/k``,
  ``max_length_q/k`` and ``seq_idx``, rebuilt for the re-packed rows); Axolotl's multipack
  collator for non-flash attention sends several rows with an all-ones ``attention_mask``
  (0 on padding) and restarting ``position_ids``.
- ``"segment_ids"`` (Axolotl multipack): ``attention_mask`` holds 1, 2, 3, ... for the segments of
  each row and 0 for padding; ``position_ids`` restart in every segment.

:func:`unpack` turns a packed micro-batch into an ordinary right-padded batch, one row per segment
that has at least one label token (a segment without one contributes nothing to the loss:
padding, or a sample whose response was truncated away), so that the scorer and Algorithm 1 run
unchanged whatever attention kernel the model uses. :func:`repack` packs the kept segments,
their pruned tokens' labels masked, back into rows no longer than the originals, so that the
dropped segments cost no compute.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from .fused import IGNORE_INDEX
from .heads import forward_inputs
from .scoring import DEFAULT_CHUNK_SIZE, Scores, assemble, score_positions, trainable_positions

logger = logging.getLogger(__name__)

LAYOUTS = ("position_ids", "segment_ids")
_VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def packed_layout(batch: Mapping[str, Any]) -> str | None:
    """``"position_ids"``, ``"segment_ids"`` or None for an ordinary padded batch."""
    mask, pos = batch.get("attention_mask"), batch.get("position_ids")
    if mask is None:
        if pos is not None or any(k in batch for k in _VARLEN_KEYS):
            return "position_ids"
        return None
    if not (isinstance(mask, torch.Tensor) and mask.ndim == 2 and mask.numel()):
        return None
    if int(mask.max()) > 1:
        return "segment_ids"
    if isinstance(pos, torch.Tensor) and pos.shape == mask.shape and pos.shape[1] > 1:
        # a position restarting right after a real token (left padding only ends in a restart)
        if ((pos[:, 1:] == 0) & (mask[:, 1:] != 0) & (mask[:, :-1] != 0)).any():
            return "position_ids"
    return None


@dataclass
class Unpacked:
    """One row per segment: ``batch`` (input_ids / attention_mask / labels, right-padded) and, per
    row, the segment's place in the packed micro-batch (``rows``, ``starts``, ``lengths``)."""

    batch: dict[str, torch.Tensor]
    rows: list[int]
    starts: list[int]
    lengths: list[int]
    packed: bool = True  # False for :func:`first_segment`'s stand-in, scored as the padded batch it is
    # the packed micro-batch's _segment_table, kept for score_packed (computed once per micro-batch)
    table: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)


def _segment_table(batch: Mapping[str, Any], layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every segment of a packed batch, with a constant number of host syncs (not one per segment):

    - ``table`` long [S, 3]: per segment, the flat index of its first token, its length, and its
      label tokens after the causal shift;
    - ``first`` bool [R, T]: True at each segment's first token;
    - ``which`` long [R * T]: the segment of each flat position, -1 on padding.

    A segment ends at the next one's start or at the first padding token; padding is no segment."""
    if layout == "position_ids":
        pos, mask = batch["position_ids"], batch.get("attention_mask")
        valid = mask != 0 if mask is not None else torch.ones_like(pos, dtype=torch.bool)
        first = pos == 0
        first[:, 1:] |= valid[:, 1:] & ~valid[:, :-1]  # where padding ends
    elif layout == "segment_ids":
        ids = batch["attention_mask"]
        valid = ids != 0
        first = torch.ones_like(valid)
        first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    else:
        raise ValueError(f"unknown packed layout {layout!r}; expected one of {list(LAYOUTS)}")
    first[:, 0] = True
    first &= valid
    flat_first, member = first.flatten(), valid.flatten()
    # a real token's segment starts at the last first token before it (no padding lies between:
    # the first real token after padding starts a segment)
    which = torch.where(member, flat_first.long().cumsum(0) - 1, -1)
    heads = flat_first.nonzero().squeeze(1)
    labelled = member & (batch["labels"].flatten() != IGNORE_INDEX) & ~flat_first
    at = which.clamp(min=0)
    length = torch.zeros(heads.numel(), dtype=torch.long, device=heads.device).index_add_(0, at, member.long())
    n_labels = torch.zeros_like(length).index_add_(0, at, labelled.long())
    return torch.stack([heads, length, n_labels], 1), first, which


def segments(batch: Mapping[str, Any], layout: str) -> list[tuple[int, int, int]]:
    """(row, start, end) of every segment of a packed batch, in order (two host syncs, whatever the count)."""
    t = batch["input_ids"].shape[1]
    return [(f // t, f % t, f % t + n) for f, n, _ in _segment_table(batch, layout)[0].tolist()]


def unpack(batch: Mapping[str, Any], layout: str, pad_id: int = 0) -> Unpacked:
    """The segments with at least one label token (after the causal shift) as a right-padded batch
    (gathered in one go: a constant number of host syncs per micro-batch, not one per segment)."""
    ids, labels = batch["input_ids"], batch["labels"]
    t = ids.shape[1]
    segment_table = _segment_table(batch, layout)
    kept = [(f, n) for f, n, k in segment_table[0].tolist() if k > 0]
    heads, lengths = torch.tensor(kept, dtype=torch.long, device=ids.device).view(-1, 2).unbind(1)
    col = torch.arange(max((n for _, n in kept), default=1), device=ids.device)
    inside = col[None] < lengths[:, None]
    at = (heads[:, None] + col[None]).clamp(max=max(ids.numel() - 1, 0))
    out = {"input_ids": ids.flatten()[at].masked_fill(~inside, pad_id),
           "attention_mask": inside.long(),
           "labels": labels.flatten()[at].masked_fill(~inside, IGNORE_INDEX)}
    out["labels"][:, 0] = IGNORE_INDEX  # never predicted from the previous segment
    return Unpacked(out, [f // t for f, _ in kept], [f % t for f, _ in kept], [n for _, n in kept],
                    table=segment_table)


def score_packed(model, batch: Mapping[str, Any], layout: str, unpacked: Unpacked, *,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> Scores:
    """Scores of ``unpacked``'s rows (the labelled segments of a packed micro-batch) from one forward
    over the packed rows as they come, not padded to the longest segment: a bin holding one
    3,000-token segment and twenty 50-token ones costs 4,000 tokens, as in training.

    The model keeps the segments apart by their restarting ``position_ids`` (transformers builds a
    block-causal mask from them when no ``attention_mask`` is passed; flash-attention kernels read
    the varlen metadata, passed as the collator made it for TRL's padding-free rows), so each
    segment is scored as if alone, as in :func:`unpack`'s padded batch."""
    ids, labels = batch["input_ids"], batch["labels"]
    r, t = ids.shape
    table, first, which = unpacked.table if unpacked.table is not None else _segment_table(batch, layout)
    inside = which >= 0
    flat = torch.arange(r * t, device=ids.device)
    # the position of each token within its segment; 0 on padding (a segment of its own)
    position = torch.where(inside, flat - table[which.clamp(min=0), 0], 0).view(r, t)
    trainable = inside.view(r, t) & (labels != IGNORE_INDEX) & ~first
    inputs = {"input_ids": ids, "position_ids": position}
    if layout == "position_ids" and "attention_mask" not in batch:  # TRL's rows: its varlen metadata as made
        inputs.update({k: v for k, v in forward_inputs(batch).items() if k not in ("input_ids", "position_ids")})
    nll, ent = score_positions(model, inputs, labels, trainable, chunk_size)
    u_trainable = trainable_positions(unpacked.batch["labels"])
    lengths = torch.tensor(unpacked.lengths, dtype=torch.long, device=ids.device)
    return assemble(nll, ent, u_trainable, lengths)


def repack(pieces: Sequence[tuple[torch.Tensor, torch.Tensor]], layout: str, template: Mapping[str, Any],
           row_capacity: int, rows_per_batch: int, pad_id: int = 0) -> list[dict[str, Any]]:
    """Pack ``pieces`` (input_ids [L], labels [L] of each kept segment) into micro-batches.

    ``"position_ids"``: each micro-batch is one row of at most ``row_capacity`` tokens (TRL
    flattens a micro-batch into one row); ``"segment_ids"``: up to ``rows_per_batch`` rows of at
    most ``row_capacity`` tokens each (Axolotl's bins). Segments are placed first-fit in
    decreasing length. Non-tensor entries and the varlen keys of ``template`` (the original
    micro-batch) are carried over / rebuilt.
    """
    order = sorted(range(len(pieces)), key=lambda i: -pieces[i][0].numel())
    bins: list[list[int]] = []
    fill: list[int] = []
    for i in order:
        n = pieces[i][0].numel()
        if n > row_capacity:
            raise ValueError(f"repack: a segment of {n} tokens does not fit a row of {row_capacity}")
        for b, used in enumerate(fill):
            if used + n <= row_capacity:
                bins[b].append(i)
                fill[b] += n
                break
        else:
            bins.append([i])
            fill.append(n)
    extras = {k: v for k, v in template.items() if not isinstance(v, torch.Tensor) and k not in _VARLEN_KEYS}
    device = pieces[0][0].device if pieces else template["input_ids"].device
    if layout not in LAYOUTS:
        raise ValueError(f"unknown packed layout {layout!r}; expected one of {list(LAYOUTS)}")
    if layout == "position_ids" and "attention_mask" not in template:  # TRL: one row per micro-batch
        return [{**_one_row([pieces[i] for i in b], template, device), **extras} for b in bins]
    batches = []
    for start in range(0, len(bins), rows_per_batch):
        rows = bins[start:start + rows_per_batch]
        t = max(sum(pieces[i][0].numel() for i in b) for b in rows)
        ids = torch.full((len(rows), t), pad_id, dtype=template["input_ids"].dtype, device=device)
        labels = torch.full((len(rows), t), IGNORE_INDEX, dtype=template["labels"].dtype, device=device)
        mask = torch.zeros((len(rows), t), dtype=template["attention_mask"].dtype, device=device)
        pos = torch.zeros((len(rows), t), dtype=torch.long, device=device)
        for r, b in enumerate(rows):
            at = 0
            for seg, i in enumerate(b, 1):
                x, y = pieces[i]
                span = slice(at, at + x.numel())
                ids[r, span], labels[r, span], pos[r, span] = x, y, torch.arange(x.numel(), device=device)
                mask[r, span] = seg if layout == "segment_ids" else 1
                at += x.numel()
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if "position_ids" in template:
            batch["position_ids"] = pos.to(template["position_ids"].dtype)
        if "cu_seq_lens_q" in template:  # varlen metadata over the flattened rows, as Axolotl computes it
            starts = (pos.flatten() == 0).nonzero().squeeze(1)
            batch.update(_varlen(template, torch.cat([starts, torch.tensor([pos.numel()], device=device)])))
        batches.append({**batch, **extras})
    return batches


def _one_row(pieces, template, device) -> dict[str, Any]:
    ids = torch.cat([x for x, _ in pieces])[None].to(template["input_ids"].dtype)
    labels = torch.cat([y for _, y in pieces])[None].to(template["labels"].dtype)
    lengths = torch.tensor([x.numel() for x, _ in pieces], device=device)
    pos = torch.cat([torch.arange(int(n), device=device) for n in lengths])[None]
    out = {"input_ids": ids, "labels": labels,
           "position_ids": pos.to(template["position_ids"].dtype) if "position_ids" in template else pos}
    out.update(_varlen(template, torch.cat([torch.zeros(1, dtype=torch.long, device=device), lengths.cumsum(0)])))
    if "seq_idx" in template:
        out["seq_idx"] = torch.repeat_interleave(torch.arange(lengths.numel(), device=device),
                                                 lengths)[None].to(template["seq_idx"].dtype)
    return out


def _varlen(template: Mapping[str, Any], cu: torch.Tensor) -> dict[str, Any]:
    """The varlen keys ``template`` has, rebuilt from ``cu``: the flattened rows' segment offsets."""
    out = {key: cu.to(template[key].dtype) for key in ("cu_seq_lens_q", "cu_seq_lens_k") if key in template}
    return {**out, **{key: int(cu.diff().max()) for key in ("max_length_q", "max_length_k") if key in template}}


def first_segment(batch: Mapping[str, Any], layout: str) -> Unpacked:
    """The first segment of a packed micro-batch as a 1-row batch, its labels all masked: what a
    micro-batch with no labelled segment is scored as, so that every rank scores alike."""
    row, start, end = segments(batch, layout)[0]
    ids = batch["input_ids"]
    one = {"input_ids": ids[row:row + 1, start:end],
           "attention_mask": torch.ones(1, end - start, dtype=torch.long, device=ids.device),
           "labels": torch.full((1, end - start), IGNORE_INDEX, dtype=batch["labels"].dtype, device=ids.device)}
    return Unpacked(one, [row], [start], [end - start], packed=False)


def repack_kept(batches: Sequence[Mapping[str, Any]], unpacked: Sequence[Unpacked], keep: Sequence[torch.Tensor],
                token_keep: Sequence[torch.Tensor], layout: str, pad_id: int = 0) -> list[dict[str, Any]]:
    """A packed step's kept segments, pruned tokens' labels masked, re-packed into rows no longer
    than the fetched ones (so the dropped segments cost nothing). If first-fit needs more
    micro-batches than were fetched (it never did in the tests), the fetched batches are returned
    with only their labels masked: exact, but without the saving."""
    kept = [(j, u, i) for j, (u, k) in enumerate(zip(unpacked, keep)) for i in k.nonzero().squeeze(1).tolist()]
    labels = [torch.where(token_keep[j][i, :u.lengths[i]], u.batch["labels"][i, :u.lengths[i]], IGNORE_INDEX)
              for j, u, i in kept]
    pieces = [(u.batch["input_ids"][i, :u.lengths[i]], y) for (_, u, i), y in zip(kept, labels)]
    out = repack(pieces, layout, batches[-1], row_capacity=max(b["input_ids"].shape[1] for b in batches),
                 rows_per_batch=max(b["input_ids"].shape[0] for b in batches), pad_id=pad_id)
    if len(out) <= len(batches):
        return out
    logger.warning("QTuning: the kept segments did not re-pack into %d micro-batches; masking labels instead",
                   len(batches))
    masked = [{**b, "labels": torch.full_like(b["labels"], IGNORE_INDEX)} for b in batches]
    for (j, u, i), y in zip(kept, labels):
        masked[j]["labels"][u.rows[i], u.starts[i]:u.starts[i] + u.lengths[i]] = y
    return masked


def split_to_count(real: list[dict[str, Any]], target: int, layout: str, pad_id: int = 0) -> list[dict[str, Any]]:
    """Packed steps under several processes: every rank must run the same number of training
    forwards (FSDP / ZeRO-3 gather parameters in each, TRL gathers metrics in each), but how many
    re-packed micro-batches the kept segments need depends on their lengths. Split the re-packed
    micro-batch holding the most segments in two until there are ``target``; a micro-batch of one
    segment cannot be split, so as a last resort the smallest one is repeated with every label
    masked (a forward and a zero gradient: the loss and its token count are unchanged)."""
    out = list(real)
    while len(out) < target:
        counts = [len(segments(b, layout)) for b in out]
        i = max(range(len(out)), key=lambda j: counts[j])
        if counts[i] >= 2:
            template = out[i]
            pieces = [(template["input_ids"][r, s:e], template["labels"][r, s:e])
                      for r, s, e in segments(template, layout)]
            half = len(pieces) // 2
            cap, rows = template["input_ids"].shape[1], template["input_ids"].shape[0]
            out[i:i + 1] = (repack(pieces[:half], layout, template, cap, rows, pad_id)
                            + repack(pieces[half:], layout, template, cap, rows, pad_id))
        else:
            j = min(range(len(out)), key=lambda k: out[k]["input_ids"].numel())
            out.insert(0, {**out[j], "labels": torch.full_like(out[j]["labels"], IGNORE_INDEX)})
    return out


def masked_segment(batch: Mapping[str, Any], layout: str, pad_id: int = 0) -> dict[str, Any]:
    """One segment of a packed micro-batch, re-packed alone with every label masked (a rank that
    kept nothing still runs the forwards the others run)."""
    row, start, end = segments(batch, layout)[0]
    piece = (batch["input_ids"][row, start:end], torch.full_like(batch["labels"][row, start:end], IGNORE_INDEX))
    return repack([piece], layout, batch, row_capacity=end - start, rows_per_batch=1, pad_id=pad_id)[0]
