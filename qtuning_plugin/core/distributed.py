"""The few collectives a Q-Tuning step needs, as plain ``torch.distributed`` calls.

Rule for every front end: a branch that changes how many forwards or collectives a rank runs is
decided by all ranks together (one of these calls), never by one rank's own data or numerics.
In a single process (or before ``init_process_group``) every function here is local.
"""

from __future__ import annotations

from typing import Sequence

import torch


def world_size() -> int:
    """Number of processes in the default group (1 when torch.distributed is not initialised)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def all_reduce_max(values: Sequence[int], device: torch.device | str | None = None) -> list[int]:
    """Element-wise maximum of ``values`` over all ranks (a collective: every rank calls it).

    ``device``: where the reduction runs (the training device; gloo reduces on the CPU)."""
    values = [int(v) for v in values]
    if world_size() == 1:
        return values
    import torch.distributed as dist

    on = "cpu" if dist.get_backend() == "gloo" or device is None else device
    t = torch.tensor(values, dtype=torch.long, device=on)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


def all_agree(flag: bool, device: torch.device | str | None = None) -> bool:
    """True when ``flag`` is True on every rank (a collective)."""
    return not all_reduce_max([int(not flag)], device)[0]
