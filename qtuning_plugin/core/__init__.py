"""Q-Tuning's algorithm in pure torch (no TRL, no Axolotl): score, triage, prune tokens, apply.

Read top to bottom: :mod:`.config` (the settings, declared once), :mod:`.scoring` (the
Error-Uncertainty plane), :mod:`.sample_stage` (the triage), :mod:`.tokens` (token stage),
:mod:`.decision` (both stages on a pool), :mod:`.batch` and :mod:`.packing` (applying a decision
to padded and packed batches), :mod:`.step_decision` (both stages on a step's pools, with the
rules) and :mod:`.step` (one optimizer step for any training loop: :func:`select_step` =
:func:`score_step` + :func:`decide_step` + :func:`train_kept`). :mod:`.rules` holds the behaviours beyond the paper, one module each;
:mod:`.distributed` the collectives a step needs.
"""

import importlib

# Loaded on first use (PEP 562), so that `qtuning --help` and `from .core.config import ...` do
# not import torch: name -> the submodule that defines it. No submodule is named like a name
# exported here: importing a submodule binds it on the package under its own name.
_HOMES = {
    "apply_decision": "batch",
    "QTuningConfig": "config",
    "Decision": "decision", "GlobalPool": "decision", "HostStats": "decision", "decide": "decision",
    "host_stats": "decision",
    "Collectives": "distributed",
    "Rule": "rules", "Pool": "rules", "build_rules": "rules",
    "ReferenceCache": "rules.reference",
    "Scores": "scoring", "choose_scoring_path": "scoring", "score_batch": "scoring", "scoring_mode": "scoring",
    "trainable_positions": "scoring",
    "StepResult": "step", "ScoredStep": "step", "select_step": "step", "score_step": "step", "train_kept": "step",
    "label_tokens": "step",
    "StepDecision": "step_decision", "decide_step": "step_decision",
    "context_scores": "tokens", "pooled_token_keep_mask": "tokens", "token_keep_mask": "tokens",
    "QUADRANT_NAMES": "sample_stage", "Triage": "sample_stage", "kept_count": "sample_stage",
    "median_quadrants": "sample_stage", "scored_mask": "sample_stage", "triage": "sample_stage",
}

__all__ = [
    "QTuningConfig",
    "Scores",
    "score_batch",
    "choose_scoring_path",
    "scoring_mode",
    "trainable_positions",
    "Triage",
    "triage",
    "kept_count",
    "median_quadrants",
    "QUADRANT_NAMES",
    "scored_mask",
    "token_keep_mask",
    "pooled_token_keep_mask",
    "context_scores",
    "Decision",
    "GlobalPool",
    "HostStats",
    "decide",
    "host_stats",
    "apply_decision",
    "select_step",
    "score_step",
    "train_kept",
    "ScoredStep",
    "StepResult",
    "StepDecision",
    "decide_step",
    "Collectives",
    "Rule",
    "Pool",
    "build_rules",
    "ReferenceCache",
]


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_HOMES})
