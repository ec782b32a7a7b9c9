"""Count host syncs on a CPU: a stand-in for CUDA's ``torch.cuda.set_sync_debug_mode``.

Tensors tagged as "on the device" (the batches; then every tensor computed from one) are followed
through a ``TorchFunctionMode``. An operation that would make a CUDA host wait for the device is
recorded with the line of ``qtuning_plugin`` that asked for it: reading values (``item``,
``tolist``, ``bool()``, ``int()``, ``float()``, ``numpy``, printing), copying to the host
(``cpu``, ``to("cpu")``), and operations whose output size depends on the values (``nonzero``,
boolean-mask indexing, ``masked_select``, ``unique``, ``bincount``, ``repeat_interleave``,
``torch.equal``). Operations inside the model's own forward (transformers, peft) are not ours and
are not counted. On a CPU the host and the "device" are one, so what is followed is where a
value comes from: a tensor made on the host (``torch.zeros(n)``, ``torch.tensor``, a host copy)
is untagged, also after ``.to(device)``, until a value from the device is written into it. The
count is exact for values derived from the batches and the model's outputs.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_TAG = "_qtuning_on_device"
_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "__format__", "__repr__",
          "equal", "allclose"}
_SIZED = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount", "repeat_interleave"}
_PACKAGE = os.sep + "qtuning_plugin" + os.sep
_TORCH = os.sep + "torch" + os.sep


def on_device(x: Any) -> Any:
    """Tag every tensor of ``x`` (a tensor, or a dict / list of them) as being on the device."""
    if isinstance(x, torch.Tensor):
        setattr(x, _TAG, True)
    elif isinstance(x, dict):
        for v in x.values():
            on_device(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            on_device(v)
    return x


def _tensors(x: Any):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)


def _tagged(x: Any) -> bool:
    return any(getattr(t, _TAG, False) for t in _tensors(x))


class CountSyncs(TorchFunctionMode):
    """``with CountSyncs() as syncs: ...``; ``syncs.calls``: (operation, file:line) of each sync."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        device_input = _tagged(args) or _tagged(kwargs)
        to_host = name == "cpu" or (name == "to" and _targets_cpu(args[1:], kwargs))  # (see _targets_cpu)
        if device_input and (name in _READS or name in _SIZED or to_host or _mask_index(name, args)):
            where = _caller()
            if where is not None:
                self.calls.append((name, where))
        out = func(*args, **kwargs)
        if device_input and to_host and isinstance(out, torch.Tensor) and getattr(out, _TAG, False):
            out = out.detach()  # on a CPU, .cpu() returns the tensor itself: the host copy is a new one
        elif device_input and not to_host and name not in _READS:
            for t in _tensors(out):
                setattr(t, _TAG, True)
            if (name.endswith("_") and not name.startswith("__")) or name.startswith("__i") or name == "__setitem__":
                # in place: the tensor written to is on the device now
                setattr(args[0], _TAG, True)
        return out


def _targets_cpu(args, kwargs) -> bool:
    """``.to("cpu")`` spelt with a string. On a CPU the device of a batch is "cpu" too, so a
    ``.to(x.device)`` (a move between devices, or none) cannot be told from a copy to the host: the
    package copies to the host with ``.cpu()`` only, which is always counted."""
    target = kwargs.get("device", args[0] if args else None)
    return isinstance(target, str) and target.startswith("cpu")


def _mask_index(name: str, args) -> bool:
    """Indexing with a boolean mask that is on the device (its size depends on its values)."""
    if name not in ("__getitem__", "__setitem__", "index_put_", "index_put"):
        return False
    index = args[1] if len(args) > 1 else None
    return any(t.dtype == torch.bool and getattr(t, _TAG, False) for t in _tensors(index))


def _caller() -> str | None:
    """file:line of the first frame outside torch and this file, if it is qtuning_plugin's."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if _TORCH not in path and not path.endswith("syncs.py"):
            return f"{os.path.basename(path)}:{frame.f_lineno}" if _PACKAGE in path else None
        frame = frame.f_back
    return None
