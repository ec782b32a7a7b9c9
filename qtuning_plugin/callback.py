"""Q-Tuning for transformers' Trainer and TRL's SFTTrainer: ``QTuning(...).attach(trainer)``. Trainer glue only.

A Trainer *extension*: besides its events, it replaces three methods on the trainer instance
(:meth:`QTuning.attach`). The Trainer fetches all micro-batches of a step at once with
``get_batch_samples`` and counts their label tokens before any forward; the replacement scores
the step (``core.score_step``), decides (:meth:`QTuning.decide`) and re-batches
(``core.train_kept``; docs/method.md §5), and returns the kept micro-batches with the count
recomputed by the Trainer: the loss is exactly the mean cross-entropy over the kept tokens of the
kept samples. The list keeps its length (the Trainer counts micro-batches to step the optimizer):
those no longer needed are replaced, at the front, by stand-ins that ``training_step`` (also
replaced) skips without a forward or backward; the last is always real, so DDP's all-reduce still
happens. ``log`` is replaced to add the ``qtuning/*`` metrics (:mod:`qtuning_plugin.metrics`)
before the reporters see them; every ``plot_every`` steps the EU plane goes to the trackers
(:mod:`qtuning_plugin.live`). A step that did not go through the hook stops training with an error
before its optimizer step. The trainer gets its own methods back at the end of ``train()`` and as
soon as the callback is no longer among its callbacks (``trainer.remove_callback``).
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any, Mapping

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from .attach import SkippedMicroBatch, detach, find_trainer, replace_methods
from .core import QTuningConfig, choose_scoring_path, scoring_mode
from .core.distributed import Collectives, all_agree
from .core.rules import build_rules
from .core.step import StepDecision, StepResult, decide_step, score_step, train_kept
from .decision_log import DecisionLog
from .live import LivePlot
from .metrics import StepMetrics
from .support import refuse_unsupported

logger = logging.getLogger(__name__)


class QTuning(TrainerCallback, ExportableState):
    """Q-Tuning as a Trainer callback: ``QTuning(...).attach(trainer)`` before ``trainer.train()``.

    Args:
        config: a :class:`~qtuning_plugin.core.QTuningConfig`, or a mapping of its fields (a
            ``preset`` key names a combination of them); or pass the fields by name:
            ``QTuning(sample_ratio=0.25, token_ratio=0.5)``, ``QTuning(preset="small-loss")``.
            ``help(QTuningConfig)`` / README's options table list them (``chunk_size`` and
            ``log_decisions`` among them).

    Attributes:
        last_step: the latest scored step's :class:`~qtuning_plugin.core.StepResult` (its
            ``scored`` micro-batches, ``scores``, ``decision`` and what was trained); None before
            the first. Read it from any callback event, e.g. ``on_step_end``.
        totals: run totals of the metrics (saved with checkpoints).
        trainer: the trainer it is attached to (None before).

    :meth:`attach` hands it the trainer. Passed only in ``callbacks=[...]`` (a bare
    ``SFTTrainer(callbacks=[QTuning()])``), it finds the trainer when training begins, in the call
    stack (the fallback: callback events are not given the trainer). ``trainer.remove_callback``
    gives the trainer its own methods back. :meth:`decide` is the one method meant to be
    overridden. Metrics (``qtuning/*``, averaged over each logging interval) are
    listed in :mod:`qtuning_plugin.metrics` and README.
    """

    def __init__(self, config: QTuningConfig | Mapping[str, Any] | None = None, **fields: Any) -> None:
        if isinstance(fields.get("log_decisions"), os.PathLike):
            fields["log_decisions"] = os.fspath(fields["log_decisions"])
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
        self.last_step: StepResult | None = None
        self._fetched = False  # did this optimizer step's batches go through the hook?

    @property
    def totals(self) -> dict[str, float]:
        return self.metrics.totals

    @totals.setter
    def totals(self, value: Mapping[str, float]) -> None:  # (the Trainer restores saved attributes so)
        self.metrics.totals.update(value)

    @property
    def last_pool(self) -> dict[str, torch.Tensor] | None:
        return self.metrics.last_pool

    @property
    def trainer(self) -> Trainer | None:
        return self._trainer_ref() if self._trainer_ref is not None else None

    # ------------------------------------------------------------------ attaching

    def attach(self, trainer: Trainer) -> "QTuning":
        """Hook into ``trainer`` (a ``transformers.Trainer`` or TRL ``SFTTrainer``) before ``train()``,
        adding this callback to its callbacks.

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
        if previous is not None and previous is not trainer:  # it moves there, counting afresh
            if previous.__dict__.get("_qtuning_callback") is self:
                detach(previous)
            self._reset()
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        replace_methods(trainer, self)
        self._trainer_ref = weakref.ref(trainer)
        self._handed_over = True
        return self

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = find_trainer(self)
        if trainer is None:
            raise RuntimeError("QTuning could not find its trainer: call QTuning(...).attach(trainer) before "
                               "trainer.train()")
        if trainer.__dict__.get("_qtuning_callback") is not self:  # found, or detached at the last train end
            handed = self._handed_over and self.trainer is trainer
            self.attach(trainer)
            self._handed_over = handed  # found, not handed over: look again at the next train()
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

    def on_train_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer is not None and trainer.__dict__.get("_qtuning_callback") is self:
            detach(trainer)  # the trainer as it was; the next train() attaches again (on_train_begin)

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict:
        """Saved in checkpoints. ``args`` are every field: with
        ``restore_callback_states_from_checkpoint=True`` the Trainer rebuilds the callback from them."""
        return {"args": self.config.to_dict(), "attributes": {"totals": dict(self.totals)}}

    def _restore_from(self, state) -> None:
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        if not isinstance(saved, dict) or not state.global_step:
            return
        attributes = saved.get("attributes") or {}
        if isinstance(attributes.get("totals"), dict):
            self.totals = attributes["totals"]
        saved_args = saved.get("args") or {}
        try:  # fields this version does not take (or refuses) are other settings
            same = QTuningConfig.from_dict(saved_args).decisions() == self.config.decisions()
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
        scored = score_step(model, batches, self.config, rules=self.rules, pad_id=getattr(tok, "pad_token_id", None),
                            padding_side=getattr(tok, "padding_side", None), collectives=Collectives(device))
        result = train_kept(scored, self.decide(scored.scores, scored.inputs), step=trainer.state.global_step)
        self.last_step = result
        self.metrics.record(result, trainer.state.global_step + 1)
        if not result.pruned:
            return batches, num_items
        real = result.micro_batches
        stand_ins = [SkippedMicroBatch(input_ids=torch.empty(0, 0, dtype=torch.long, device=device))
                     for _ in range(len(batches) - len(real))]
        num_items = trainer._get_num_items_in_batch(real, device)  # collective under DDP: every rank
        return stand_ins + real, num_items

    def decide(self, scores, inputs) -> StepDecision:
        """The step's decision from its ``scores`` (one :class:`~qtuning_plugin.core.Scores` per
        scored micro-batch; ``inputs``: what the rules prepared): ``core.decide_step`` with this
        run's config and rules. Override it to decide otherwise on the same scores (the benchmarks'
        random-pruning baseline does); return a complete ``StepDecision`` (``host`` statistics and
        ``kept_tokens`` filled: ``core.step.train_kept``), the same on every rank where it syncs."""
        trainer = self.trainer
        device = trainer.args.device if trainer is not None else None
        return decide_step(scores, self.config, collectives=Collectives(device), rules=self.rules, inputs=inputs)
