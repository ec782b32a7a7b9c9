"""Q-Tuning for transformers' Trainer and TRL's SFTTrainer: ``callbacks=[QTuning()]``.

How it hooks in (see the integration notes in the docs): the Trainer fetches all micro-batches of
an optimizer step at once with ``get_batch_samples`` and counts their label tokens before any
forward. ``QTuning`` replaces that method on the trainer *instance*: it fetches the step, scores
every sample with the model being trained (one no-grad forward), runs Algorithm 1 of the paper,
and returns only the kept samples, re-batched into as few micro-batches as the batch size allows,
with the label-token count recomputed. The loss is then exactly the mean cross-entropy over the
kept tokens of the kept samples.

The Trainer decides when to step the optimizer by counting micro-batches, so the list handed
back keeps its length: the micro-batches that are no longer needed are replaced, at the front,
by empty stand-ins that ``training_step`` (also wrapped) skips without any forward or backward.
The last entry is always a real micro-batch, so DDP's gradient all-reduce still happens.
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

from .core import (
    GlobalPool,
    QTuningConfig,
    apply_decision,
    decide,
    median_quadrants,
    score_batch,
    scoring_mode,
)
from .core.batch import collate_rows, padding_side, split_rows
from .core.packing import packed_layout, repack, segments, unpack
from .core.scoring import DEFAULT_CHUNK_SIZE, unwrap_causal_lm
from .decisions import DecisionLog, sample_id

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
    are those of :class:`~qtuning_plugin.core.QTuningConfig` and are validated here.
    Pass it in ``callbacks=[...]`` (it attaches itself when training begins) or call
    :meth:`attach` with the trainer. ``chunk_size`` is the scorer's memory knob.
    ``log_decisions="decisions.jsonl"`` writes, every step, each pool sample's id, error,
    uncertainty, quadrant and fate (see :mod:`qtuning_plugin.decisions`; ``qtuning plot`` draws it).

    Logged every ``logging_steps`` (averaged over the interval), see README for the meaning:
    ``qtuning/kept_samples``, ``qtuning/pool_samples``, ``qtuning/kept_tokens_ratio``,
    ``qtuning/share_q1_noise`` .. ``qtuning/share_q4_calibration``, ``qtuning/level``,
    ``qtuning/score_seconds``, ``qtuning/score_share``, ``qtuning/kept_ppl``,
    ``qtuning/kept_entropy``, ``qtuning/dropped_ppl``, ``qtuning/dropped_entropy``.
    """

    def __init__(self, config: QTuningConfig | Mapping[str, Any] | None = None, *,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, log_decisions: str | os.PathLike | None = None,
                 **fields: Any) -> None:
        if isinstance(config, QTuningConfig):
            if fields:
                raise ValueError("QTuning: pass either a QTuningConfig or its fields, not both")
            self.config = config
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
        self._log: DecisionLog | None = None
        # Running totals over the whole run; saved with checkpoints and restored on resume.
        self.totals: dict[str, float] = {"steps": 0, "pool_samples": 0, "kept_samples": 0,
                                         "label_tokens": 0, "kept_label_tokens": 0, "score_seconds": 0.0}
        self.last_pool: dict[str, torch.Tensor] | None = None  # the latest pool's scores, for plots
        self.last_global_pool: GlobalPool | None = None  # pool: global, the latest step's whole pool
        self._trainer_ref: weakref.ref | None = None
        self._interval: dict[str, list[float]] = defaultdict(list)
        self._step_seconds = 0.0
        self._last_mark: float | None = None

    # ------------------------------------------------------------------ attaching

    @property
    def trainer(self) -> Trainer | None:
        return self._trainer_ref() if self._trainer_ref is not None else None

    def attach(self, trainer: Trainer) -> "QTuning":
        """Hook into ``trainer`` (a ``transformers.Trainer`` or TRL ``SFTTrainer``) before ``train()``.

        Refuses, with a ``ValueError`` saying what to change, what Q-Tuning cannot do exactly:
        RL / preference trainers, sequence or context parallelism, a model that is not a causal
        LM, a trainer that does not count label tokens. Packed batches are supported (a sample
        is a segment, see :mod:`qtuning_plugin.core.packing`).
        """
        if not isinstance(trainer, Trainer):
            raise TypeError(f"QTuning.attach: expected a transformers.Trainer, got {type(trainer).__name__}")
        _refuse_unsupported(trainer)
        others = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, QTuning) and cb is not self]
        if others:
            raise ValueError("QTuning: this trainer already has another QTuning callback; use one")
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
        trainer = self.trainer or _find_trainer(self)
        if trainer is None:
            raise RuntimeError(
                "QTuning could not find its trainer: call QTuning(...).attach(trainer) before "
                "trainer.train()"
            )
        if getattr(trainer, "_qtuning_callback", None) is not self:
            self.attach(trainer)
        else:  # attached before train(): check again, the arguments may have changed since
            _refuse_unsupported(trainer)
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
        totals = saved.get("attributes", {}).get("totals")
        if isinstance(totals, dict):
            self.totals.update(totals)
        if saved.get("args") and saved["args"] != self.config.to_dict():
            logger.warning(
                "QTuning: resuming with %s, but the checkpoint was trained with %s. Set "
                "restore_callback_states_from_checkpoint=True to continue with the checkpoint's.",
                self.config.to_dict(), saved["args"],
            )

    def state(self) -> dict:
        return {"args": self.config.to_dict(), "attributes": {"totals": dict(self.totals)}}

    # ------------------------------------------------------------------ the step

    def _get_batch_samples(self, trainer: Trainer, epoch_iterator, num_batches: int, device):
        originals = trainer._qtuning_originals
        batches, num_items = originals["get_batch_samples"](epoch_iterator, num_batches, device)
        now = time.perf_counter()
        if self._last_mark is not None:
            self._step_seconds += now - self._last_mark
        self._last_mark = now
        if not batches or self.config.prunes_nothing:
            return batches, num_items
        for batch in batches:
            _check_batch(batch)
        layout = packed_layout(batches[0])
        if layout is not None:  # a sample is a segment: score and decide on the segments, unpacked
            pad = _pad_id(batches, trainer)
            unpacked = [unpack(b, layout, pad) for b in batches]
            for u, b in zip(unpacked, batches):
                if not u.rows:  # no segment with a label token: score one anyway, so every rank scores alike
                    row, start, end = segments(b, layout)[0]
                    u.batch = _first_segment(b, row, start, end)
                    u.rows, u.starts, u.lengths = [row], [start], [end - start]
            inputs = [u.batch for u in unpacked]
        else:
            inputs = batches

        model = getattr(trainer, "model_wrapped", None) or trainer.model
        with scoring_mode(model):
            scores = [score_batch(model, b, chunk_size=self.chunk_size) for b in inputs]
        keep, prune, token_keep, levels = self._decide(scores)
        if not any(t.any() for t in token_keep):
            # Only samples without any response token were kept (e.g. truncated away): a loss over
            # zero tokens is 0/0. Train this step unpruned rather than step on a NaN.
            logger.warning("QTuning: the kept samples of step %d have no label token; this step "
                           "is trained unpruned", trainer.state.global_step + 1)
            return batches, num_items
        if layout is None:
            real = _rebatch(trainer, batches, keep, token_keep)
        else:  # re-packing: the count of micro-batches depends on segment lengths; align it across ranks
            real = _repack_step(trainer, batches, unpacked, keep, token_keep, layout)
            real = split_to_count(real, _max_over_ranks(len(real), device), layout)
        stand_ins = [SkippedMicroBatch(input_ids=torch.empty(0, 0, dtype=torch.long, device=device))
                     for _ in range(len(batches) - len(real))]
        num_items = trainer._get_num_items_in_batch(real, device)  # collective under DDP: every rank
        self._record(inputs, scores, keep, prune, token_keep, levels, time.perf_counter() - now)
        return stand_ins + real, num_items

    def _decide(self, scores):
        """Algorithm 1 over each pool of the step: per micro-batch keep [B], prune_tokens [B],
        token_keep [B, T], and the pools' quantile levels."""
        n = len(scores)
        pools = [[i] for i in range(n)] if self.config.pool == "micro_batch" else [list(range(n))]
        global_pool = self._gather_pool(scores) if self.config.pool == "global" else None
        keep, prune, token_keep = [None] * n, [None] * n, [None] * n
        levels = []
        for pool in pools:
            decision = decide([scores[i] for i in pool], self.config, global_pool)
            levels.append(decision.triage.level)
            prune_split = decision.triage.prune_tokens.split([scores[i].ppl.numel() for i in pool])
            for i, k, p, t in zip(pool, decision.keep, prune_split, decision.token_keep):
                keep[i], prune[i], token_keep[i] = k, p, t
        return keep, prune, token_keep, levels

    def _gather_pool(self, scores) -> GlobalPool | None:
        """``pool: global``: every rank's (ppl, entropy), in rank order (a collective: every rank
        calls it once per step, as it scores once per step). None in a single process."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        mine = torch.stack([torch.cat([s.ppl for s in scores]), torch.cat([s.entropy for s in scores])]).cpu()
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine.tolist())
        ppl = torch.tensor([x for g in gathered for x in g[0]], dtype=torch.float64)
        entropy = torch.tensor([x for g in gathered for x in g[1]], dtype=torch.float64)
        groups = torch.tensor([r for r, g in enumerate(gathered) for _ in g[0]], dtype=torch.long)
        self.last_global_pool = GlobalPool(ppl=ppl, entropy=entropy, groups=groups, rank=dist.get_rank())
        return self.last_global_pool

    # ------------------------------------------------------------------ metrics

    def _record(self, batches, scores, keep, prune, token_keep, levels, seconds: float) -> None:
        """Metrics and totals of one step (``batches`` as fetched, before pruning)."""
        ppl = torch.cat([s.ppl for s in scores]).cpu()
        ent = torch.cat([s.entropy for s in scores]).cpu()
        kept = torch.cat(keep).cpu()
        label_tokens = sum(int(s.trainable.sum()) for s in scores)
        kept_tokens = sum(int(t.sum()) for t in token_keep)
        quadrant = median_quadrants(ppl, ent)
        n, k = ppl.numel(), int(kept.sum())
        m = self._interval
        m["kept_samples"].append(k)
        m["pool_samples"].append(n)
        m["kept_tokens_ratio"].append(kept_tokens / max(1, label_tokens))
        for q, name in ((1, "q1_noise"), (2, "q2_misconception"), (3, "q3_redundant"), (4, "q4_calibration")):
            m[f"share_{name}"].append(float((quadrant == q).float().mean()))
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
        if self._log is not None:
            trainer = self.trainer
            step = (trainer.state.global_step if trainer is not None else int(self.totals["steps"]) - 1) + 1
            self._log.write(step, [sample_id(t) for b in batches for t in _row_tokens(b)], ppl.tolist(),
                            ent.tolist(), quadrant.tolist(), kept.tolist(),
                            torch.cat([t.sum(1) for t in token_keep]).tolist(),
                            torch.cat([s.trainable.sum(1) for s in scores]).tolist())

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

def _refuse_unsupported(trainer: Trainer) -> None:
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
    lm = unwrap_causal_lm(trainer.model)
    if not _is_causal_lm(lm):
        raise ValueError(
            f"QTuning needs a decoder-only causal LM (a *ForCausalLM model); got {type(lm).__name__}."
        )
    if not (getattr(trainer, "model_accepts_loss_kwargs", False) or getattr(trainer, "compute_loss_func", None)):
        # The Trainer would average per-micro-batch means instead of dividing the step's summed
        # loss by its label-token count. Axolotl 0.19 switches this off for every model whose
        # forward() does not name `num_items_in_batch`; turn it back on when the model's loss
        # does use it (checked on a 4-token input), else refuse.
        if not _loss_uses_num_items(lm):
            raise ValueError(
                f"QTuning: {type(trainer).__name__} averages per-micro-batch losses "
                "(model_accepts_loss_kwargs is False, no compute_loss_func) and the model's loss "
                "ignores num_items_in_batch, so the loss over the kept tokens could not be exact."
            )
        logger.info("QTuning: setting model_accepts_loss_kwargs=True so that each step's loss is "
                    "the mean over its kept label tokens")
        trainer.model_accepts_loss_kwargs = True


def _loss_uses_num_items(lm: torch.nn.Module) -> bool:
    """Whether the model's own loss divides by ``num_items_in_batch`` when it is given."""
    device = next(lm.parameters()).device
    ids = torch.tensor([[1, 2, 3, 4]], device=device)
    try:
        with scoring_mode(lm), torch.no_grad():
            mean = lm(input_ids=ids, labels=ids, use_cache=False).loss
            summed = lm(input_ids=ids, labels=ids, use_cache=False, num_items_in_batch=1).loss
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


def _check_batch(batch: Mapping[str, Any]) -> None:
    if "labels" not in batch:
        raise ValueError("QTuning: the training batches have no 'labels'; use a causal-LM collator "
                         "(TRL's SFTTrainer or DataCollatorForLanguageModeling) that provides them.")
    if packed_layout(batch) == "position_ids" and "position_ids" not in batch:
        raise ValueError("QTuning: this padding-free batch has no position_ids, so its segments (samples) "
                         "cannot be told apart.")
    if "shift_labels" in batch:
        raise ValueError("QTuning: batches with shift_labels (sequence parallelism) are not supported.")


def _first_segment(batch, row: int, start: int, end: int) -> dict:
    """One segment of a packed micro-batch as a 1-row batch, its labels all -100."""
    return {"input_ids": batch["input_ids"][row:row + 1, start:end],
            "attention_mask": torch.ones(1, end - start, dtype=torch.long, device=batch["input_ids"].device),
            "labels": torch.full((1, end - start), -100, dtype=batch["labels"].dtype, device=batch["labels"].device)}


def _repack_step(trainer, batches, unpacked, keep, token_keep, layout) -> list[dict]:
    """Packed steps: the kept segments, pruned tokens' labels masked, re-packed into rows no longer
    than the fetched ones (so the dropped segments cost nothing). If first-fit needs more
    micro-batches than were fetched (it never did in the tests), the fetched batches are kept and
    only their labels are masked: exact, but without the saving."""
    pieces = []
    for u, k, t in zip(unpacked, keep, token_keep):
        for i in k.nonzero().squeeze(1).tolist():
            n = u.lengths[i]
            labels = torch.where(t[i, :n], u.batch["labels"][i, :n], -100)
            pieces.append((u.batch["input_ids"][i, :n], labels))
    pad = _pad_id(batches, trainer)
    out = repack(pieces, layout, batches[-1], row_capacity=max(b["input_ids"].shape[1] for b in batches),
                 rows_per_batch=max(b["input_ids"].shape[0] for b in batches), pad_id=pad)
    if len(out) <= len(batches):
        return out
    logger.warning("QTuning: the kept segments did not re-pack into %d micro-batches; masking labels instead",
                   len(batches))
    masked = []
    for b, u, k, t in zip(batches, unpacked, keep, token_keep):
        labels = torch.full_like(b["labels"], -100)
        for i in k.nonzero().squeeze(1).tolist():
            r, s, n = u.rows[i], u.starts[i], u.lengths[i]
            labels[r, s:s + n] = torch.where(t[i, :n], u.batch["labels"][i, :n], -100)
        masked.append({**b, "labels": labels})
    return masked


def _max_over_ranks(n: int, device) -> int:
    """The largest ``n`` over all ranks (a collective), ``n`` itself in one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return n
    t = torch.tensor([n], device=device if dist.get_backend() != "gloo" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def split_to_count(real: list[dict], target: int, layout: str) -> list[dict]:
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
            pieces = _pieces(out[i], layout)
            half = len(pieces) // 2
            template = out[i]
            cap = template["input_ids"].shape[1]
            rows = template["input_ids"].shape[0]
            pad = _pad_id([template], None)
            first = repack(pieces[:half], layout, template, cap, rows, pad)
            second = repack(pieces[half:], layout, template, cap, rows, pad)
            out[i:i + 1] = first + second
        else:
            j = min(range(len(out)), key=lambda k: out[k]["input_ids"].numel())
            out.insert(0, {**out[j], "labels": torch.full_like(out[j]["labels"], -100)})
    return out


def _pieces(batch: Mapping[str, Any], layout: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(batch["input_ids"][r, s:e], batch["labels"][r, s:e]) for r, s, e in segments(batch, layout)]


def _row_tokens(batch: Mapping[str, Any]) -> list[list[int]]:
    """Each row's token ids without padding (what :func:`~qtuning_plugin.decisions.sample_id` hashes)."""
    ids = batch["input_ids"].cpu()
    mask = batch.get("attention_mask")
    if mask is None:
        return ids.tolist()
    mask = mask.cpu().bool()
    return [row[m].tolist() for row, m in zip(ids, mask)]


def _rebatch(trainer, batches, keep, token_keep) -> list[dict]:
    """The kept rows of the step, pruned tokens masked, sorted by length and padded into as few
    micro-batches as the collator's batch size allows (padding side and pad id as it used)."""
    rows = []
    for batch, k, t in zip(batches, keep, token_keep):
        if k.any():
            rows += split_rows(apply_decision(batch, k, t))
    rows.sort(key=lambda r: -r["labels"].shape[0])  # similar lengths together: less padding
    size = max(b["labels"].shape[0] for b in batches)
    pad = {"input_ids": _pad_id(batches, trainer)}
    side = _padding_side(batches, trainer)
    extras = {k: v for k, v in batches[0].items() if not isinstance(v, torch.Tensor)}
    return [{**collate_rows(rows[i:i + size], side=side, pad_values=pad), **extras}
            for i in range(0, len(rows), size)]


def _padding_side(batches, trainer) -> str:
    for b in batches:
        if "attention_mask" in b and (side := padding_side(b["attention_mask"])):
            return side
    tok = getattr(trainer, "processing_class", None)
    return getattr(getattr(tok, "tokenizer", tok), "padding_side", None) or "right"


def _pad_id(batches, trainer) -> int:
    for b in batches:
        mask = b.get("attention_mask")
        if mask is not None and (mask == 0).any():
            return int(b["input_ids"][mask == 0][0])
    tok = getattr(trainer, "processing_class", None)
    tok = getattr(tok, "tokenizer", tok)
    pad = getattr(tok, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def _find_trainer(callback: QTuning) -> Trainer | None:
    """The trainer running ``callback``: one it was attached to earlier (the Trainer may have
    recreated the callback from a checkpoint), else the ``self`` of a caller frame."""
    for trainer in list(_ATTACHED):
        if callback in trainer.callback_handler.callbacks:
            return trainer
    frame = sys._getframe(1)
    for _ in range(16):
        if frame is None:
            break
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer) and callback in candidate.callback_handler.callbacks:
            return candidate
        frame = frame.f_back
    return None
