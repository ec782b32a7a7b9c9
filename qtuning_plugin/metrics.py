"""What the Trainer hook reports of each scored step: the ``qtuning/*`` metrics (averaged over each
logging interval), run totals (saved with checkpoints), the latest pool (for plots) and the
decision log. Reads only host tensors on the hot path; the decision log, when on, copies each
row's kept-token count too."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Mapping, Sequence

import torch

from .core import median_quadrants, scored_mask
from .core.step import StepResult
from .decision_log import DecisionLog, sample_id

QUADRANT_METRICS = ((1, "q1_noise"), (2, "q2_misconception"), (3, "q3_redundant"), (4, "q4_calibration"))


class StepMetrics:
    """Metrics of one training run. ``rules``: the active rules (each adds its metric and its
    decision-log field); ``log``: a :class:`~qtuning_plugin.decision_log.DecisionLog` or None."""

    def __init__(self, rules: Sequence[Any] = ()) -> None:
        self.rules = list(rules)
        # Running totals over the whole run; saved with checkpoints and restored on resume.
        self.totals: dict[str, float] = {"steps": 0, "pool_samples": 0, "kept_samples": 0, "label_tokens": 0,
                                         "kept_label_tokens": 0, "score_seconds": 0.0,
                                         **{rule.metric: 0 for rule in self.rules}}
        self.last_pool: dict[str, torch.Tensor] | None = None  # the latest pool's scores, for plots
        self.log: DecisionLog | None = None
        self._interval: dict[str, list[float]] = defaultdict(list)
        self._step_seconds = 0.0
        self._last_mark: float | None = None

    def restart(self) -> None:
        """A new interval at train start (after a resume, say)."""
        self._interval.clear()
        self._step_seconds, self._last_mark = 0.0, None

    def mark_fetch(self) -> None:
        """Called when a step's batches are fetched: the time between fetches is a step's time."""
        now = time.perf_counter()
        if self._last_mark is not None:
            self._step_seconds += now - self._last_mark
        self._last_mark = now

    def record(self, result: StepResult, step: int) -> None:
        """Metrics and totals of one scored step (``step``: the optimizer step, 1-based)."""
        d = result.decision
        ppl, ent, n_tokens = d.host.ppl, d.host.entropy, d.host.n_tokens
        kept = torch.cat(d.keep)
        quadrant = median_quadrants(ppl, ent)
        scored = scored_mask(ppl, ent)  # rows without a label token are no samples
        n, k = int(scored.sum()), int(kept.sum())
        label_tokens, kept_tokens = int(n_tokens.sum()), int(d.kept_tokens)
        m = self._interval
        m["kept_samples"].append(k)
        m["pool_samples"].append(n)
        m["unscored_samples"].append(ppl.numel() - n)
        m["kept_tokens_ratio"].append(kept_tokens / max(1, label_tokens))
        if n:
            scored_quadrant = median_quadrants(ppl[scored], ent[scored])
            for q, name in QUADRANT_METRICS:
                m[f"share_{name}"].append(float((scored_quadrant == q).float().mean()))
        m["level"].append(sum(d.levels) / len(d.levels))
        m["score_seconds"].append(result.seconds)
        for name, mask in (("kept", kept), ("dropped", ~kept)):
            for metric, values in (("ppl", ppl), ("entropy", ent)):
                finite = values[mask][torch.isfinite(values[mask])]
                if finite.numel():
                    m[f"{name}_{metric}"].append(float(finite.mean()))
        for key, value in (("steps", 1), ("pool_samples", n), ("kept_samples", k), ("label_tokens", label_tokens),
                           ("kept_label_tokens", kept_tokens), ("score_seconds", result.seconds)):
            self.totals[key] += value
        self.last_pool = {"ppl": ppl, "entropy": ent, "keep": kept, "quadrant": quadrant,
                          "prune_tokens": torch.cat(d.prune), **d.host.features}
        for rule in self.rules:
            flagged = d.flags.get(rule.log_field, torch.zeros(ppl.shape, dtype=torch.bool))
            m[rule.metric].append(int(flagged.sum()))
            self.totals[rule.metric] = self.totals.get(rule.metric, 0) + m[rule.metric][-1]
            self.last_pool[rule.log_field] = flagged
        if self.log is not None:
            self._write_log(result, step, quadrant, kept)

    def _write_log(self, result: StepResult, step: int, quadrant, kept) -> None:
        d = result.decision
        kept_tokens = torch.cat([t.sum(1) for t in d.token_keep]).tolist()  # (a copy, only with a log)
        flags = {name: mask.tolist() for name, mask in d.flags.items()}
        self.log.write(step, [sample_id(t) for b in result.scored for t in row_tokens(b)], d.host.ppl.tolist(),
                       d.host.entropy.tolist(), quadrant.tolist(), kept.tolist(), kept_tokens,
                       d.host.n_tokens.long().tolist(), flags)

    def with_metrics(self, logs: dict) -> dict:
        """Add the interval's averages to a training log (the dict every reporter receives)."""
        if "loss" not in logs or not self._interval:
            return logs
        if self._last_mark is not None:
            self.mark_fetch()
        out = {f"qtuning/{k}": sum(v) / len(v) for k, v in self._interval.items() if v}
        if self._step_seconds > 0:
            out["qtuning/score_share"] = sum(self._interval["score_seconds"]) / self._step_seconds
        self._interval.clear()
        self._step_seconds = 0.0
        return {**logs, **out}


def row_tokens(batch: Mapping[str, Any]) -> list[list[int]]:
    """Each row's token ids without padding (what :func:`~qtuning_plugin.decision_log.sample_id` hashes)."""
    ids = batch["input_ids"].cpu()
    mask = batch.get("attention_mask")
    if mask is None:
        return ids.tolist()
    mask = mask.cpu().bool()
    return [row[m].tolist() for row, m in zip(ids, mask)]
