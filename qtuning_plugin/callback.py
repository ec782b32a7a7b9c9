"""Q-Tuning for transformers' Trainer and TRL's SFTTrainer: ``callbacks=[QTuning()]``. Trainer glue only.

A Trainer *extension*: besides its events, it replaces three methods on the trainer instance
(:meth:`QTuning.attach`). The Trainer fetches all micro-batches of a step at once with
``get_batch_samples`` and counts their label tokens before any forward; the replacement hands the
step to ``core.select_step`` (score, decide, re-batch: docs/method.md §5) and returns the kept
micro-batches with the count recomputed by the Trainer: the loss is exactly the mean cross-entropy
over the kept tokens of the kept samples. The list keeps its length (the Trainer counts
micro-batches to step the optimizer): those no longer needed are replaced, at the front, by
stand-ins that ``training_step`` (also replaced) skips without a forward or backward; the last is
always real, so DDP's all-reduce still happens. ``log`` is replaced to add the ``qtuning/*``
metrics (:mod:`qtuning_plugin.metrics`) before the reporters see them; every ``plot_every`` steps
the EU plane goes to the trackers (:mod:`qtuning_plugin.live`). A step that did not go through
the hook stops training with an error before its optimizer step.
"""

from __future__ import annotations

import logging
import os
import sys
import weakref
from typing import Any, Mapping

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from .core import QTuningConfig, choose_scoring_path, scoring_mode
from .core.config import without_retired_defaults
from .core.distributed import Collectives, all_agree
from .core.rules import build_rules
from .core.step import StepDecision, decide_step, select_step
from .decision_log import DecisionLog
from .live import LivePlot
from .metrics import StepMetrics
from .support import refuse_unsupported

logger = logging.getLogger(__name__)

_ATTACHED: "weakref.WeakSet[Trainer]" = weakref.WeakSet()


class SkippedMicroBatch(dict):
    """Stands in for a micro-batch whose samples were all pruned. ``training_step`` returns a zero
    loss for it without running the model; it exists only so that the Trainer's micro-batch
    counter (which decides when the optimizer steps) stays right."""


class QTuning(TrainerCallback, ExportableState):
    """Q-Tuning as a Trainer callback.

    Args:
        config: a :class:`~qtuning_plugin.core.QTuningConfig`, or a mapping of its fields (a
            ``preset`` key names a combination of them); or pass the fields by name:
            ``QTuning(sample_ratio=0.25, token_ratio=0.5)``, ``QTuning(preset="small-loss")``.
            ``help(QTuningConfig)`` / README's options table list them (``chunk_size`` and
            ``log_decisions`` among them).

    Pass it in ``callbacks=[...]`` (it attaches itself when training begins) or call
    :meth:`attach` with the trainer. Metrics (``qtuning/*``, averaged over each logging interval)
    are listed in :mod:`qtuning_plugin.metrics` and README.
    """

    def __init__(self, config: QTuningConfig | Mapping[str, Any] | None = None, **fields: Any) -> None:
        if isinstance(fields.get("log_decisions"), os.PathLike):
            fields["log_decisions"] = os.fspath(fields["log_decisions"])
        fields = without_retired_defaults(fields)  # (a checkpoint of an earlier version: every field)
        if isinstance(config, QTuningConfig):
            if fields:
                raise ValueError("QTuning: pass either a QTuningConfig or its fields, not both")
            self.config = config
        elif config is not None and not isinstance(config, Mapping):
            raise ValueError(
                f"QTuning: the settings are passed by name, e.g. QTuning(sample_ratio=0.25, token_ratio=0.5); "
                f"got {config!r} as the first argument (it takes a QTuningConfig or a mapping of its fields)")
        else:
            self.config = QTuningConfig.from_dict({**(config or {}), **fields})
        log = self.config.log_decisions
        if log is not None and os.path.isdir(log):
            raise ValueError(f"QTuning.log_decisions must be a file path, {log!r} is a directory")
        self._trainer_ref: weakref.ref | None = None
        self._handed_over = False  # attach() was called by the user or Axolotl (not found by on_train_begin)
        self._reset()

    def _reset(self) -> None:
        """The state of one training run (a fresh one when the callback moves to another trainer)."""
        self.rules = build_rules(self.config)
        self.metrics = StepMetrics(self.rules)
        self.live = LivePlot(self.config.plot_every)  # the EU plane in the trackers
        self._fetched = False  # did this optimizer step's batches go through the hook?

    @property
    def totals(self) -> dict[str, float]:
        return self.metrics.totals

    @totals.setter
    def totals(self, value: Mapping[str, float]) -> None:  # (the Trainer restores saved attributes so)
        self.metrics.totals.update(value)

    @property
    def rule_states(self) -> dict[str, dict]:
        """Each active rule's state across steps, by class name (saved with checkpoints)."""
        return {type(r).__name__: r.state_dict() for r in self.rules if r.state_dict()}

    @rule_states.setter
    def rule_states(self, value: Mapping[str, Mapping]) -> None:
        for rule in self.rules:
            rule.load_state_dict((value or {}).get(type(rule).__name__) or {})

    @property
    def last_pool(self) -> dict[str, torch.Tensor] | None:
        return self.metrics.last_pool

    @property
    def trainer(self) -> Trainer | None:
        return self._trainer_ref() if self._trainer_ref is not None else None

    # ------------------------------------------------------------------ attaching

    def attach(self, trainer: Trainer) -> "QTuning":
        """Hook into ``trainer`` (a ``transformers.Trainer`` or TRL ``SFTTrainer``) before ``train()``.

        Refuses, with a ``ValueError`` saying what to change, what Q-Tuning cannot do exactly
        (:func:`~qtuning_plugin.support.refuse_unsupported`). Attaching to a second trainer moves
        the callback there (the first gets its methods back)."""
        if not isinstance(trainer, Trainer):
            raise TypeError(f"QTuning.attach: expected a transformers.Trainer, got {type(trainer).__name__}")
        refuse_unsupported(trainer, self.config, self.rules)
        others = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, QTuning) and cb is not self]
        if others:
            raise ValueError("QTuning: this trainer already has another QTuning callback; use one")
        previous = self.trainer
        if previous is not None and previous is not trainer:
            _detach(previous)  # one QTuning handed to a second trainer moves there, counting afresh
            self._reset()
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        originals = trainer.__dict__.setdefault("_qtuning_originals", {
            "get_batch_samples": trainer.get_batch_samples,
            "training_step": trainer.training_step,
            "log": trainer.log,
        })
        me = weakref.proxy(self)
        trainer.get_batch_samples = lambda it, n, device: me._get_batch_samples(trainer, it, n, device)
        trainer.training_step = lambda model, inputs, *a, **kw: (
            torch.zeros((), device=trainer.args.device) if isinstance(inputs, SkippedMicroBatch)
            else originals["training_step"](model, inputs, *a, **kw))
        trainer.log = lambda logs, *a, **kw: originals["log"](me.metrics.with_metrics(logs), *a, **kw)
        trainer._qtuning_callback = self
        self._trainer_ref = weakref.ref(trainer)
        _ATTACHED.add(trainer)
        self._handed_over = True
        return self

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = _find_trainer(self)
        if trainer is None:
            raise RuntimeError("QTuning could not find its trainer: call QTuning(...).attach(trainer) before "
                               "trainer.train()")
        if getattr(trainer, "_qtuning_callback", None) is not self or self.trainer is not trainer:
            self.attach(trainer)
            self._handed_over = False  # found, not handed over: look again at the next train()
        else:  # attached before train(): check again, the arguments may have changed since
            refuse_unsupported(trainer, self.config, self.rules)
        if not self.config.prunes_nothing:
            # Decide, on every rank together, whether scoring can use its own head or needs the
            # model's full logits (a second forward): never a per-rank, per-step branch.
            model = getattr(trainer, "model_wrapped", None) or trainer.model
            with scoring_mode(model):
                choose_scoring_path(model, agree=lambda ok: all_agree(ok, args.device))
        self._fetched = False
        self._restore_from(state)
        self.metrics.log = None
        if self.config.log_decisions is not None:
            self.metrics.log = DecisionLog(self.config.log_decisions, rank=args.process_index,
                                           world_size=args.world_size)
            dropped = self.metrics.log.start(state.global_step)
            if dropped:
                logger.info("QTuning: removed %d rows of steps after %d from %s (an earlier or interrupted run)",
                            dropped, state.global_step, self.metrics.log.path)
        self.metrics.restart()
        self.live.start(trainer)

    def on_step_end(self, args, state, control, **kwargs):
        title = f"step {state.global_step}: the pool on the Error-Uncertainty plane (filled: kept)"
        self.live.step_end(self.trainer, state.global_step, self.last_pool, title)

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict:
        """Saved in checkpoints. ``args`` are every field: with
        ``restore_callback_states_from_checkpoint=True`` the Trainer rebuilds the callback from them."""
        rules = self.rule_states
        return {"args": self.config.to_dict(),
                "attributes": {"totals": dict(self.totals), **({"rule_states": rules} if rules else {})}}

    def _restore_from(self, state) -> None:
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        if not isinstance(saved, dict) or not state.global_step:
            return
        attributes = saved.get("attributes") or {}
        if isinstance(attributes.get("totals"), dict):
            self.totals = attributes["totals"]
        if isinstance(attributes.get("rule_states"), dict):
            self.rule_states = attributes["rule_states"]
        saved_args = saved.get("args") or {}
        try:  # a checkpoint of an older version may hold retired fields, or lack newer ones
            same = QTuningConfig.from_dict(without_retired_defaults(saved_args)).decisions() == self.config.decisions()
        except ValueError:
            same = False
        if saved_args and not same:
            logger.warning(
                "QTuning: resuming with %s, but the checkpoint was trained with %s. Set "
                "restore_callback_states_from_checkpoint=True to continue with the checkpoint's.",
                self.config.decisions(), saved_args,
            )

    # ------------------------------------------------------------------ the step

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self._fetched:
            raise RuntimeError(
                f"QTuning: optimizer step {state.global_step + 1} was not fetched through the Trainer's "
                "get_batch_samples, so it was neither scored nor pruned (did this transformers version "
                "change how the Trainer fetches batches, or was the trainer's get_batch_samples replaced "
                "after QTuning attached?). Stopping rather than training unpruned without a word."
            )
        self._fetched = False

    def _get_batch_samples(self, trainer: Trainer, epoch_iterator, num_batches: int, device):
        batches, num_items = trainer._qtuning_originals["get_batch_samples"](epoch_iterator, num_batches, device)
        self._fetched = True  # checked before the optimizer step (on_pre_optimizer_step)
        self.metrics.mark_fetch()
        if not batches or self.config.prunes_nothing:
            return batches, num_items
        tok = getattr(trainer, "processing_class", None)
        tok = getattr(tok, "tokenizer", tok)
        model = getattr(trainer, "model_wrapped", None) or trainer.model
        result = select_step(model, batches, self.config, rules=self.rules, step=trainer.state.global_step,
                             pad_id=getattr(tok, "pad_token_id", None),
                             padding_side=getattr(tok, "padding_side", None), collectives=Collectives(device),
                             decide_fn=self._decide)
        self._record(result)
        if not result.pruned:
            return batches, num_items
        real = result.micro_batches
        stand_ins = [SkippedMicroBatch(input_ids=torch.empty(0, 0, dtype=torch.long, device=device))
                     for _ in range(len(batches) - len(real))]
        num_items = trainer._get_num_items_in_batch(real, device)  # collective under DDP: every rank
        return stand_ins + real, num_items

    def _record(self, result) -> None:
        """Metrics, totals and the decision log of one scored step; subclasses may extend it (the
        benchmarks record each sample's kind)."""
        trainer = self.trainer
        self.metrics.record(result, (trainer.state.global_step if trainer is not None else 0) + 1)

    def _decide(self, scores, inputs) -> StepDecision:
        """The step's decision from its scores (``core.decide_step`` with this run's rules);
        subclasses may replace it (the benchmarks' random-pruning baseline does)."""
        trainer = self.trainer
        device = trainer.args.device if trainer is not None else None
        return decide_step(scores, self.config, collectives=Collectives(device), rules=self.rules, inputs=inputs)


# ---------------------------------------------------------------------- finding and leaving the trainer

def _detach(trainer: Trainer) -> None:
    """Give ``trainer`` its own methods back (its QTuning callback moved to another trainer)."""
    for name, method in trainer.__dict__.pop("_qtuning_originals", {}).items():
        trainer.__dict__.pop(name, None)
        if getattr(trainer, name) != method:  # it was wrapped on the instance before QTuning came
            setattr(trainer, name, method)
    trainer.__dict__.pop("_qtuning_callback", None)
    _ATTACHED.discard(trainer)


def _find_trainer(callback: QTuning) -> Trainer | None:
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
