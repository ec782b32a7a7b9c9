"""Q-Tuning's algorithm in pure torch (no TRL, no Axolotl): score, triage, prune tokens, apply.

Read top to bottom: :mod:`.scoring` (the Error-Uncertainty plane), :mod:`.triage` (sample stage),
:mod:`.tokens` (token stage), :mod:`.decision` (both stages on a pool), :mod:`.batch` and
:mod:`.packing` (applying a decision to padded and packed batches), :mod:`.step` (one optimizer
step for any training loop: :func:`select_step`). :mod:`.reference` is the reference guard,
:mod:`.distributed` the collectives a step needs.
"""

from .batch import apply_decision
from .config import QTuningConfig
from .decision import Decision, GlobalPool, decide
from .distributed import Collectives
from .reference import ReferenceCache
from .scoring import Scores, choose_scoring_path, score_batch, scoring_mode, trainable_positions
from .tokens import context_scores, pooled_token_keep_mask, token_keep_mask
from .step import StepDecision, StepResult, decide_step, select_step
from .triage import QUADRANT_NAMES, Triage, kept_count, median_quadrants, triage

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
    "decide",
    "apply_decision",
    "select_step",
    "StepResult",
    "StepDecision",
    "decide_step",
    "Collectives",
    "ReferenceCache",
]
