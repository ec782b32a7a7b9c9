"""The few collectives a Q-Tuning step needs, as plain ``torch.distributed`` calls.

Rule for every front end: a branch that changes how many forwards or collectives a rank runs is
decided by all ranks together (one of these calls), never by one rank's own data or numerics.
In a single process (or before ``init_process_group``) every function here is local.
"""

from __future__ import annotations

from typing import Any, Sequence

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


class Collectives:
    """What a Q-Tuning step asks of the other processes (:func:`~qtuning_plugin.core.select_step`).

    This default uses ``torch.distributed``'s default group, and every call is local in a single
    process. Pass another object with the same methods to run a step under another launcher, or
    a stand-in in a one-process test. ``device``: where reductions run (the training device)."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = device

    @property
    def world_size(self) -> int:
        return world_size()

    @property
    def rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank() if world_size() > 1 else 0

    def all_reduce_max(self, values: Sequence[int]) -> list[int]:
        """Element-wise maximum over ranks (see :func:`all_reduce_max`)."""
        return all_reduce_max(values, self.device)

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), in rank order; ``[value]`` in one process."""
        if world_size() == 1:
            return [value]
        import torch.distributed as dist

        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, value)
        return out
