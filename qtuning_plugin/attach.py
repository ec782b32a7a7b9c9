"""How :class:`~qtuning_plugin.callback.QTuning` sits on a Trainer: the three methods it replaces on
the trainer instance, giving them back, and finding the trainer where none was handed over."""

from __future__ import annotations

import sys
import weakref
from typing import TYPE_CHECKING

import torch
from transformers import Trainer

if TYPE_CHECKING:
    from .callback import QTuning

_ATTACHED: weakref.WeakSet[Trainer] = weakref.WeakSet()
_REPLACED = ("get_batch_samples", "training_step", "log")


class SkippedMicroBatch(dict):
    """Stands in for a micro-batch whose samples were all pruned. ``training_step`` returns a zero
    loss for it without running the model; it exists only so that the Trainer's micro-batch
    counter (which decides when the optimizer steps) stays right."""


def replace_methods(trainer: Trainer, callback: QTuning) -> None:
    """Route ``trainer``'s ``get_batch_samples``, ``training_step`` and ``log`` through ``callback``.
    Each call first checks that the callback is still among the trainer's callbacks: once it is not
    (``remove_callback``, ``pop_callback``, any edit of the list, the Trainer's own swap when it
    restores callbacks from a checkpoint), the trainer gets its own methods back and the call goes
    to them. (Checked at each call rather than by wrapping ``remove_callback``: it sees every way
    out, for the price of a look through a short list.)"""
    originals = trainer.__dict__.setdefault("_qtuning_originals", {name: getattr(trainer, name) for name in _REPLACED})

    def current() -> QTuning | None:
        cb = trainer.__dict__.get("_qtuning_callback")
        if cb is not None and cb in trainer.callback_handler.callbacks:
            return cb
        detach(trainer)
        return None

    def get_batch_samples(epoch_iterator, num_batches, device):
        cb = current()
        if cb is None:
            return originals["get_batch_samples"](epoch_iterator, num_batches, device)
        return cb._get_batch_samples(trainer, epoch_iterator, num_batches, device)

    def training_step(model, inputs, *args, **kwargs):
        if isinstance(inputs, SkippedMicroBatch):
            return torch.zeros((), device=trainer.args.device)
        current()
        return originals["training_step"](model, inputs, *args, **kwargs)

    def log(logs, *args, **kwargs):
        cb = current()
        return originals["log"](logs if cb is None else cb.metrics.with_metrics(logs), *args, **kwargs)

    trainer.get_batch_samples, trainer.training_step, trainer.log = get_batch_samples, training_step, log
    trainer._qtuning_callback = callback
    _ATTACHED.add(trainer)


def detach(trainer: Trainer) -> None:
    """Give ``trainer`` its own methods back (its QTuning callback left it, or training ended)."""
    for name, method in trainer.__dict__.pop("_qtuning_originals", {}).items():
        trainer.__dict__.pop(name, None)
        if getattr(trainer, name) != method:  # it was wrapped on the instance before QTuning came
            setattr(trainer, name, method)
    trainer.__dict__.pop("_qtuning_callback", None)
    _ATTACHED.discard(trainer)


def find_trainer(callback: QTuning) -> Trainer | None:
    """The trainer running ``callback`` now. Where it was handed over (``attach``, called by the user
    or by Axolotl's ``add_callbacks_post_trainer``), that one. Otherwise (a bare
    ``SFTTrainer(callbacks=[QTuning()])`` hands nothing over; TrainerCallback events never receive
    the trainer): the ``self`` of a caller frame (the Trainer calling ``on_train_begin``), else the
    one live trainer it was attached to (the Trainer may have recreated it from a checkpoint)."""
    handed = callback.trainer
    if handed is not None and callback._handed_over and callback in handed.callback_handler.callbacks:
        return handed
    holders = [t for t in list(_ATTACHED) if callback in t.callback_handler.callbacks]
    frame = sys._getframe(1)
    for _ in range(16):
        if frame is None:
            break
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer) and callback in candidate.callback_handler.callbacks:
            return candidate
        frame = frame.f_back
    if len(holders) == 1:
        return holders[0]
    if len(holders) > 1:
        raise RuntimeError("QTuning is in the callbacks of several trainers and could not tell which one "
                           "is training: call QTuning(...).attach(trainer) on the one you train")
    return handed
