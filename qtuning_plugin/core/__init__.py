"""Q-Tuning's algorithm in pure torch (no TRL, no Axolotl): score, triage, prune tokens, apply.

Read top to bottom: :mod:`.config` (the settings, declared once), :mod:`.scoring` (the
Error-Uncertainty plane), :mod:`.triage` (sample stage), :mod:`.tokens` (token stage),
:mod:`.decision` (both stages on a pool), :mod:`.batch` and :mod:`.packing` (applying a decision
to padded and packed batches), :mod:`.step` (one optimizer step for any training loop:
:func:`select_step`). :mod:`.rules` holds the behaviours beyond the paper, one module each;
:mod:`.distributed` the collectives a step needs.
"""

import importlib
import sys
import types

# Loaded on first use (PEP 562), so that `qtuning --help` and `from .core.config import ...` do
# not import torch: name -> the submodule that defines it.
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
    "StepDecision": "step", "StepResult": "step", "decide_step": "step", "select_step": "step",
    "label_tokens": "step",
    "context_scores": "tokens", "pooled_token_keep_mask": "tokens", "token_keep_mask": "tokens",
    "QUADRANT_NAMES": "triage", "Triage": "triage", "kept_count": "triage", "median_quadrants": "triage",
    "triage": "triage",
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
    "StepResult",
    "StepDecision",
    "decide_step",
    "Collectives",
    "Rule",
    "Pool",
    "build_rules",
    "ReferenceCache",
]


class _Core(types.ModuleType):
    def __setattr__(self, name, value):
        # The import system binds a submodule on its package once it is loaded; here `triage` is
        # the function (as exported from the start), not its module `core.triage`.
        if name == "triage" and isinstance(value, types.ModuleType):
            value = value.triage
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Core


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_HOMES})
