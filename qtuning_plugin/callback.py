"""Q-Tuning for transformers' Trainer and TRL's SFTTrainer: ``callbacks=[QTuning()]``. Trainer glue only.

How it hooks in: the Trainer fetches all micro-batches of an optimizer step at once with
``get_batch_samples`` and counts their label tokens before any forward. ``QTuning`` replaces that
method on the trainer *instance*: it fetches the step, hands it to ``core.select_step`` (score,
decide, re-batch: docs/method.md §5) and returns the kept micro-batches with the label-token count
recomputed by the Trainer. The loss is then exactly the mean cross-entropy over the kept tokens of
the kept samples.

The Trainer decides when to step the optimizer by counting micro-batches, so the list handed
back keeps its length: the micro-batches that are no longer needed are replaced, at the front,
by empty stand-ins that ``training_step`` (also wrapped) skips without any forward or backward.
The last entry is always a real micro-batch, so DDP's gradient all-reduce still happens. Under
several processes the scoring path is chosen by all ranks together at train start. A step that
did not go through the hook stops training with an error before its optimizer step.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import weakref
from collections import defaultdict
from typing import Any, Mapping

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from .core import GlobalPool, QTuningConfig, choose_scoring_path, median_quadrants, scoring_mode
from .core.distributed import Collectives, all_agree
from .core.reference import ReferenceCache, adapter_switch
from .core.scoring import DEFAULT_CHUNK_SIZE, unwrap_causal_lm
from .core.step import StepDecision, StepResult, decide_step, select_step
from .decision_log import DecisionLog, sample_id

logger = logging.getLogger(__name__)

# Trainers of TRL whose batches are not SFT samples with labels (RL, preference, distillation).
_SFT_TRAINERS = {"SFTTrainer", "_BaseTrainer"}

_ATTACHED: "weakref.WeakSet[Trainer]" = weakref.WeakSet()


class SkippedMicroBatch(dict):
    """Stands in for a micro-batch whose samples were all pruned. ``training_step`` returns a zero
    loss for it without running the model; it exists only so that the Trainer's micro-batch
    counter (which decides when the optimizer steps) stays right."""


class QTuning(TrainerCallback, ExportableState):
    """Q-Tuning as a Trainer callback.

    ``QTuning(sample_ratio=0.25, token_ratio=0.5)`` or ``QTuning(QTuningConfig(...))``; the fields
    are those of :class:`~qtuning_plugin.core.QTuningConfig` and are validated here;
    ``QTuning(preset="robust")`` starts from a named combination of them (``core.config.PRESETS``).
    Pass it in ``callbacks=[...]`` (it attaches itself when training begins) or call
    :meth:`attach` with the trainer. ``chunk_size`` is the scorer's memory knob.
    ``log_decisions="decisions.jsonl"`` writes, every step, each pool sample's id, error,
    uncertainty, quadrant and fate (see :mod:`qtuning_plugin.decision_log`; ``qtuning plot`` draws it).

    Logged every ``logging_steps`` (averaged over the interval), see README for the meaning:
    ``qtuning/kept_samples``, ``qtuning/pool_samples`` (samples with a label token),
    ``qtuning/unscored_samples`` (rows without one: never kept), ``qtuning/kept_tokens_ratio``,
    ``qtuning/share_q1_noise`` .. ``qtuning/share_q4_calibration``, ``qtuning/level``,
    ``qtuning/score_seconds``, ``qtuning/score_share``, ``qtuning/kept_ppl``,
    ``qtuning/kept_entropy``, ``qtuning/dropped_ppl``, ``qtuning/dropped_entropy``; with
    ``reference="base"``, ``qtuning/suspected_samples``; with ``drop_highest_ppl`` or
    ``drop_ppl_outliers``, ``qtuning/high_ppl_excluded`` (samples those rules kept out).
    """

    def __init__(self, config: QTuningConfig | Mapping[str, Any] | None = None, *,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, log_decisions: str | os.PathLike | None = None,
                 **fields: Any) -> None:
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
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise ValueError(f"QTuning.chunk_size must be a positive integer, got {chunk_size!r}")
        self.chunk_size = chunk_size
        if log_decisions is not None and not (isinstance(log_decisions, (str, os.PathLike)) and str(log_decisions)):
            raise ValueError(f"QTuning.log_decisions must be a file path (jsonl) or None, got {log_decisions!r}")
        if log_decisions is not None and os.path.isdir(log_decisions):
            raise ValueError(f"QTuning.log_decisions must be a file path, {str(log_decisions)!r} is a directory")
        self.log_decisions = log_decisions
        self._trainer_ref: weakref.ref | None = None
        self._reset()

    def _reset(self) -> None:
        """The state of one training run (a fresh one when the callback moves to another trainer)."""
        self._log: DecisionLog | None = None
        # Running totals over the whole run; saved with checkpoints and restored on resume. "steps"
        # counts the pruned steps, "warmup_steps" the unpruned ones before them; the label-token
        # totals count both.
        self.totals: dict[str, float] = {"steps": 0, "warmup_steps": 0, "pool_samples": 0, "kept_samples": 0,
                                         "label_tokens": 0, "kept_label_tokens": 0, "score_seconds": 0.0}
        self.last_pool: dict[str, torch.Tensor] | None = None  # the latest pool's scores, for plots
        self.last_global_pool: GlobalPool | None = None  # pool: global, the latest step's whole pool
        self._interval: dict[str, list[float]] = defaultdict(list)
        self._step_seconds = 0.0
        self._last_mark: float | None = None
        self._fetched = False  # did this optimizer step's batches go through the hook?
        # reference: base, the base model's per-token NLL of each sample seen (by content)
        self._reference = ReferenceCache() if self.config.reference == "base" else None

    # ------------------------------------------------------------------ attaching

    @property
    def trainer(self) -> Trainer | None:
        return self._trainer_ref() if self._trainer_ref is not None else None

    def attach(self, trainer: Trainer) -> "QTuning":
        """Hook into ``trainer`` (a ``transformers.Trainer`` or TRL ``SFTTrainer``) before ``train()``.

        Refuses, with a ``ValueError`` saying what to change, what Q-Tuning cannot do exactly:
        RL / preference trainers, sequence or context parallelism, ``torch.compile``, PEFT prompt
        learning, a model that is not a causal LM, a trainer that does not count label tokens.
        Packed batches are supported (a sample is a segment, see :mod:`qtuning_plugin.core.packing`).
        Attaching to a second trainer moves the callback there (the first gets its methods back).
        """
        if not isinstance(trainer, Trainer):
            raise TypeError(f"QTuning.attach: expected a transformers.Trainer, got {type(trainer).__name__}")
        _refuse_unsupported(trainer, self.config)
        others = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, QTuning) and cb is not self]
        if others:
            raise ValueError("QTuning: this trainer already has another QTuning callback; use one")
        previous = self.trainer
        if previous is not None and previous is not trainer:
            # One QTuning object handed to a second trainer: it moves there (the first trainer gets
            # its own methods back) and starts counting afresh.
            _detach(previous)
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
        trainer.log = lambda logs, *a, **kw: originals["log"](me._with_metrics(logs), *a, **kw)
        trainer._qtuning_callback = self
        self._trainer_ref = weakref.ref(trainer)
        _ATTACHED.add(trainer)
        return self

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = _find_trainer(self)
        if trainer is None:
            raise RuntimeError(
                "QTuning could not find its trainer: call QTuning(...).attach(trainer) before "
                "trainer.train()"
            )
        if getattr(trainer, "_qtuning_callback", None) is not self or self.trainer is not trainer:
            self.attach(trainer)
        else:  # attached before train(): check again, the arguments may have changed since
            _refuse_unsupported(trainer, self.config)
        if not self.config.prunes_nothing:
            # Decide, on every rank together, whether scoring can use its own head or needs the
            # model's full logits (a second forward): never a per-rank, per-step branch.
            model = getattr(trainer, "model_wrapped", None) or trainer.model
            with scoring_mode(model):
                choose_scoring_path(model, agree=lambda ok: all_agree(ok, args.device))
        self._fetched = False
        self._restore_from(state)
        if self.log_decisions is not None:
            self._log = DecisionLog(self.log_decisions, rank=args.process_index, world_size=args.world_size)
            dropped = self._log.start(state.global_step)
            if dropped:
                logger.info("QTuning: removed %d rows of steps after %d from %s (an earlier or interrupted run)",
                            dropped, state.global_step, self._log.path)
        self._interval.clear()
        self._step_seconds, self._last_mark = 0.0, None

    def _restore_from(self, state) -> None:
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        if not isinstance(saved, dict) or not state.global_step:
            return
        attributes = saved.get("attributes") or {}
        totals = attributes.get("totals")
        if isinstance(totals, dict):
            self.totals.update(totals)
        suspects = attributes.get("reference_suspects")
        if self._reference is not None and self.config.reference_sticky and isinstance(suspects, list):
            self._reference.suspected.update(k for k in suspects if isinstance(k, str))
        saved_config = {k: v for k, v in (saved.get("args") or {}).items() if k not in ("chunk_size", "log_decisions")}
        try:  # a checkpoint of an older version lacks newer fields: compare with their defaults
            same = QTuningConfig.from_dict(saved_config) == self.config
        except ValueError:
            same = False
        if saved_config and not same:
            logger.warning(
                "QTuning: resuming with %s, but the checkpoint was trained with %s. Set "
                "restore_callback_states_from_checkpoint=True to continue with the checkpoint's.",
                self.config.to_dict(), saved_config,
            )

    def state(self) -> dict:
        """Saved in checkpoints. ``args`` are every constructor argument: with
        ``restore_callback_states_from_checkpoint=True`` the Trainer rebuilds the callback from them."""
        log = None if self.log_decisions is None else os.fspath(self.log_decisions)
        attributes = {"totals": dict(self.totals)}
        if self._reference is not None and self.config.reference_sticky:
            # the samples flagged so far (content keys), flagged again after a resume
            attributes["reference_suspects"] = sorted(self._reference.suspected)
        return {"args": {**self.config.to_dict(), "chunk_size": self.chunk_size, "log_decisions": log},
                "attributes": attributes}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self._fetched:
            raise RuntimeError(
                f"QTuning: optimizer step {state.global_step + 1} was not fetched through the Trainer's "
                "get_batch_samples, so it was neither scored nor pruned (did this transformers version "
                "change how the Trainer fetches batches, or was the trainer's get_batch_samples replaced "
                "after QTuning attached?). Stopping rather than training unpruned without a word."
            )
        self._fetched = False

    # ------------------------------------------------------------------ the step

    def _get_batch_samples(self, trainer: Trainer, epoch_iterator, num_batches: int, device):
        originals = trainer._qtuning_originals
        batches, num_items = originals["get_batch_samples"](epoch_iterator, num_batches, device)
        self._fetched = True  # checked before the optimizer step (on_pre_optimizer_step)
        now = time.perf_counter()
        if self._last_mark is not None:
            self._step_seconds += now - self._last_mark
        self._last_mark = now
        if not batches or self.config.prunes_nothing:
            return batches, num_items
        tok = getattr(trainer, "processing_class", None)
        tok = getattr(tok, "tokenizer", tok)
        model = getattr(trainer, "model_wrapped", None) or trainer.model
        result = select_step(model, batches, self.config, step=trainer.state.global_step, reference=self._reference,
                             chunk_size=self.chunk_size, pad_id=getattr(tok, "pad_token_id", None),
                             padding_side=getattr(tok, "padding_side", None), collectives=Collectives(device),
                             decide_fn=self._decide)
        if result.scores is None:  # warming up: every sample is trained, unscored
            for key in ("label_tokens", "kept_label_tokens"):
                self.totals[key] += result.num_label_tokens
            self.totals["warmup_steps"] += 1
            return batches, num_items
        self._record(result)
        if not result.pruned:
            return batches, num_items
        real = result.micro_batches
        stand_ins = [SkippedMicroBatch(input_ids=torch.empty(0, 0, dtype=torch.long, device=device))
                     for _ in range(len(batches) - len(real))]
        num_items = trainer._get_num_items_in_batch(real, device)  # collective under DDP: every rank
        return stand_ins + real, num_items

    def _decide(self, scores, references=None, prior=None) -> StepDecision:
        """The step's decision from its scores (``core.decide_step``); subclasses may replace it
        (the benchmarks' random-pruning baseline does)."""
        return decide_step(scores, self.config, references, Collectives(self._device()), prior)

    def _device(self):
        trainer = self.trainer
        return trainer.args.device if trainer is not None else None

    # ------------------------------------------------------------------ metrics

    def _record(self, result: StepResult) -> None:
        """Metrics and totals of one scored step (``result.scored``: the micro-batches as scored)."""
        batches, scores, d = result.scored, result.scores, result.decision
        keep, prune, token_keep, levels, seconds = d.keep, d.prune, d.token_keep, d.levels, result.seconds
        if d.global_pool is not None:
            self.last_global_pool = d.global_pool
        ppl = torch.cat([s.ppl for s in scores]).cpu()
        ent = torch.cat([s.entropy for s in scores]).cpu()
        kept = torch.cat(keep).cpu()
        label_tokens = sum(int(s.trainable.sum()) for s in scores)
        kept_tokens = sum(int(t.sum()) for t in token_keep)
        quadrant = median_quadrants(ppl, ent)
        scored = ~(torch.isnan(ppl) | torch.isnan(ent))  # rows without a label token are no samples
        n, k = int(scored.sum()), int(kept.sum())
        m = self._interval
        m["kept_samples"].append(k)
        m["pool_samples"].append(n)
        m["unscored_samples"].append(ppl.numel() - n)
        m["kept_tokens_ratio"].append(kept_tokens / max(1, label_tokens))
        if n:
            scored_quadrant = median_quadrants(ppl[scored], ent[scored])
            for q, name in ((1, "q1_noise"), (2, "q2_misconception"), (3, "q3_redundant"), (4, "q4_calibration")):
                m[f"share_{name}"].append(float((scored_quadrant == q).float().mean()))
        m["level"].append(sum(levels) / len(levels))
        m["score_seconds"].append(seconds)
        for name, mask in (("kept", kept), ("dropped", ~kept)):
            for metric, values in (("ppl", ppl), ("entropy", ent)):
                finite = values[mask][torch.isfinite(values[mask])]
                if finite.numel():
                    m[f"{name}_{metric}"].append(float(finite.mean()))
        self.totals["steps"] += 1
        self.totals["pool_samples"] += n
        self.totals["kept_samples"] += k
        self.totals["label_tokens"] += label_tokens
        self.totals["kept_label_tokens"] += kept_tokens
        self.totals["score_seconds"] += seconds
        self.last_pool = {"ppl": ppl, "entropy": ent, "keep": kept, "quadrant": quadrant,
                          "prune_tokens": torch.cat(prune).cpu()}
        if self._reference is not None:
            suspects = d.suspects
            m["suspected_samples"].append(int(suspects.sum()) if suspects is not None else 0)
            self.totals["suspected_samples"] = self.totals.get("suspected_samples", 0) + m["suspected_samples"][-1]
            if suspects is not None:
                self.last_pool["suspect"] = suspects
                self.last_pool["excess_max"], self.last_pool["excess_mean"] = (x.cpu() for x in d.excess)
        if d.excluded is not None:  # drop_highest_ppl / drop_ppl_outliers
            m["high_ppl_excluded"].append(int(d.excluded.sum()))
            self.totals["high_ppl_excluded"] = self.totals.get("high_ppl_excluded", 0) + m["high_ppl_excluded"][-1]
            self.last_pool["excluded"] = d.excluded
        if self._log is not None:
            trainer = self.trainer
            step = (trainer.state.global_step if trainer is not None else int(self.totals["steps"]) - 1) + 1
            flags = {}
            if d.excluded is not None:
                flags["excluded"] = d.excluded.tolist()
            if d.suspects is not None:  # (reference: base)
                flags["suspect"] = d.suspects.tolist()
            self._log.write(step, [sample_id(t) for b in batches for t in _row_tokens(b)], ppl.tolist(),
                            ent.tolist(), quadrant.tolist(), kept.tolist(),
                            torch.cat([t.sum(1) for t in token_keep]).tolist(),
                            torch.cat([s.trainable.sum(1) for s in scores]).tolist(), flags)

    def _with_metrics(self, logs: dict) -> dict:
        """Add the interval's averages to a training log (the dict every reporter receives)."""
        if "loss" not in logs or not self._interval:
            return logs
        now = time.perf_counter()
        if self._last_mark is not None:
            self._step_seconds += now - self._last_mark
            self._last_mark = now
        out = {f"qtuning/{k}": sum(v) / len(v) for k, v in self._interval.items() if v}
        if self._step_seconds > 0:
            out["qtuning/score_share"] = sum(self._interval["score_seconds"]) / self._step_seconds
        self._interval.clear()
        self._step_seconds = 0.0
        return {**logs, **out}


# ---------------------------------------------------------------------- checks and helpers

def _refuse_unsupported(trainer: Trainer, config: QTuningConfig) -> None:
    trl_classes = [c.__name__ for c in type(trainer).__mro__
                   if c.__module__.split(".")[0] == "trl" and c.__name__ not in _SFT_TRAINERS]
    if trl_classes:
        raise ValueError(
            f"QTuning prunes supervised fine-tuning batches; {trl_classes[0]} is an RL / preference / "
            "distillation trainer whose batches are not SFT samples. Use it without QTuning."
        )
    for owner in (trainer.args, getattr(trainer, "accelerator", None)):
        pc = getattr(owner, "parallelism_config", None)
        if pc is not None and any((getattr(pc, name, 1) or 1) > 1 for name in ("cp_size", "sp_size")):
            raise ValueError(
                "QTuning does not support sequence / context parallelism (parallelism_config with "
                "cp_size or sp_size > 1): each rank would see only a shard of every sample."
            )
    for name in ("sequence_parallel_degree", "context_parallel_size", "sequence_parallel_size"):
        if (getattr(trainer.args, name, 1) or 1) > 1:
            raise ValueError(f"QTuning does not support sequence / context parallelism ({name} > 1).")
    if getattr(trainer.args, "torch_compile", False) or any(
            type(m).__name__ == "OptimizedModule" for m in (trainer.model, getattr(trainer, "model_wrapped", None))):
        raise ValueError("QTuning does not support torch.compile (torch_compile=True or a compiled model): "
                         "the scoring pass reads the backbone's hidden state through a module hook, which a "
                         "compiled graph does not run. Train with torch_compile=False.")
    peft_config = getattr(trainer.model, "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False):
        raise ValueError(
            f"QTuning does not support PEFT prompt learning ({type(peft_config).__name__}: prompt / prefix / "
            "p-tuning add virtual tokens that the scorer's per-token alignment with the labels does not "
            "account for). Use LoRA / QLoRA or full fine-tuning."
        )
    if config.reference == "base" and adapter_switch(trainer.model) is None:
        raise ValueError(
            "QTuning: reference='base' needs adapter training (a PEFT LoRA / QLoRA model): the base model "
            f"is the trained model with its adapters switched off, and {type(trainer.model).__name__} has "
            "none. Use reference='none' for full fine-tuning.")
    lm = unwrap_causal_lm(trainer.model)
    if not _is_causal_lm(lm):
        raise ValueError(
            f"QTuning needs a decoder-only causal LM (a *ForCausalLM model); got {type(lm).__name__}."
        )
    if config.prunes_nothing:
        return  # every step passes through untouched: the trainer's loss normalisation stays its own
    if not (getattr(trainer, "model_accepts_loss_kwargs", False) or getattr(trainer, "compute_loss_func", None)):
        # The Trainer would average per-micro-batch means instead of dividing the step's summed
        # loss by its label-token count. Axolotl 0.19 switches this off for every model whose
        # forward() does not name `num_items_in_batch`; turn it back on when the model's loss
        # does use it (checked on a 4-token input), else refuse.
        if not _loss_uses_num_items(getattr(trainer, "model_wrapped", None) or trainer.model):
            raise ValueError(
                f"QTuning: {type(trainer).__name__} averages per-micro-batch losses "
                "(model_accepts_loss_kwargs is False, no compute_loss_func) and the model's loss "
                "ignores num_items_in_batch, so the loss over the kept tokens could not be exact."
            )
        logger.info("QTuning: setting model_accepts_loss_kwargs=True so that each step's loss is "
                    "the mean over its kept label tokens")
        trainer.model_accepts_loss_kwargs = True


def _loss_uses_num_items(model: torch.nn.Module) -> bool:
    """Whether the model's own loss divides by ``num_items_in_batch`` when it is given: two forwards
    on 4 tokens, through the model as training calls it (a DDP / FSDP wrapper once the Trainer has
    wrapped it: sharded weights are gathered as in training, and every rank runs the same forwards)."""
    device = next(model.parameters()).device
    ids = torch.tensor([[1, 2, 3, 4]], device=device)
    try:
        with scoring_mode(model), torch.no_grad():
            mean = model(input_ids=ids, labels=ids, use_cache=False).loss
            summed = model(input_ids=ids, labels=ids, use_cache=False, num_items_in_batch=1).loss
    except TypeError:
        return False
    return bool(torch.isclose(summed, mean * 3, rtol=1e-3))


def _is_causal_lm(model: torch.nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal_names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    names = [c.__name__ for c in type(model).__mro__]
    named_causal = any(n in causal_names or n.endswith("ForCausalLM") for n in names)
    backbone = getattr(model, getattr(model, "base_model_prefix", "") or "_", None)
    return (named_causal and not getattr(getattr(model, "config", None), "is_encoder_decoder", False)
            and isinstance(backbone, torch.nn.Module) and model.get_output_embeddings() is not None)


def _row_tokens(batch: Mapping[str, Any]) -> list[list[int]]:
    """Each row's token ids without padding (what :func:`~qtuning_plugin.decision_log.sample_id` hashes)."""
    ids = batch["input_ids"].cpu()
    mask = batch.get("attention_mask")
    if mask is None:
        return ids.tolist()
    mask = mask.cpu().bool()
    return [row[m].tolist() for row, m in zip(ids, mask)]


def _detach(trainer: Trainer) -> None:
    """Give ``trainer`` its own methods back (its QTuning callback moved to another trainer)."""
    for name, method in trainer.__dict__.pop("_qtuning_originals", {}).items():
        trainer.__dict__.pop(name, None)
        if getattr(trainer, name) != method:  # it was wrapped on the instance before QTuning came
            setattr(trainer, name, method)
    trainer.__dict__.pop("_qtuning_callback", None)
    _ATTACHED.discard(trainer)


def _find_trainer(callback: QTuning) -> Trainer | None:
    """The trainer running ``callback`` now: the ``self`` of a caller frame (the Trainer calling
    ``on_train_begin``), else the one live trainer it was attached to (the Trainer may have
    recreated the callback from a checkpoint)."""
    frame = sys._getframe(1)
    for _ in range(16):
        if frame is None:
            break
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer) and callback in candidate.callback_handler.callbacks:
            return candidate
        frame = frame.f_back
    holders = [t for t in list(_ATTACHED) if callback in t.callback_handler.callbacks]
    if len(holders) == 1:
        return holders[0]
    if len(holders) > 1:
        raise RuntimeError("QTuning is in the callbacks of several trainers and could not tell which one "
                           "is training: call QTuning(...).attach(trainer) on the one you train")
    return callback.trainer
