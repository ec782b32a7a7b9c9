"""QTuningConfig: the method's knobs, validated once, at construction."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping

POOLS = ("step", "micro_batch", "global")
TOKEN_BUDGETS = ("sample", "batch")
TOP_UPS = ("minmax", "rank")
KEEP_TOKENS = ("lowest", "highest")
REFERENCES = ("none", "base")
# Named combinations of fields: ``QTuning(preset=...)``, ``QTuningConfig.from_dict({"preset": ...})``,
# ``preset:`` in Axolotl's ``qtuning:`` block. Fields given beside a preset override it.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},  # the defaults: the paper's Algorithm 1
    # The paper plus the reference guard (LoRA / QLoRA only): README "Which setting should I use"
    # has the evidence (benchmarks/results/quality-3ep.md).
    "robust": {"reference": "base"},
    # The small-loss trick against wrong labels (the pool's highest-PPL quarter is never kept) with
    # the tokens not learned yet trained in misconception samples; any model, no extra forward.
    # README "Which setting should I use": where it won and lost (benchmarks/results/quality-*.md).
    "small-loss": {"drop_highest_ppl": 0.25, "keep_tokens": "highest"},
}


@dataclass(frozen=True, init=False)
class QTuningConfig:
    """Settings of Q-Tuning (docs/method.md §2-4 and §6).

    Fields (keyword-only):

    - ``sample_ratio`` in (0, 1]: share r_s of each selection pool that is trained
      (K = max(1, floor(r_s * n)) samples). 1 keeps every sample.
    - ``token_ratio`` in (0, 1]: share r_t of the response tokens kept in each misconception
      (Q2) sample. 1 disables token pruning.
    - ``neighbor_lambda`` in [0, 1]: weight of the two neighbours in the context-aware token
      score s_i = (1 - lambda) PPL_i + lambda (PPL_{i-1} + PPL_{i+1}).
    - ``pool``: ``"step"`` selects among all gradient-accumulation micro-batches of one optimizer
      step on one device (the paper); ``"micro_batch"`` selects within each micro-batch alone;
      ``"global"`` ranks each device's step against every device's samples (an all-gather of two
      floats per sample; thresholds identical on all ranks) while each keeps exactly its own K.
      In one process ``"global"`` is ``"step"``.
    - ``token_budget``: ``"sample"`` keeps ceil(r_t |T|) tokens in each Q2 sample (the paper);
      ``"batch"`` reproduces the authors' code drop (one pooled budget, docs/method.md §3).

    Options beyond the paper (off by default; README "Options beyond the paper" says what each
    costs and what is measured of it):

    - ``top_up``: how the top-up ranks the samples left after the core by |p - e|. ``"minmax"``
      (the paper): p, e are PPL and Ent min-max normalised, so one huge PPL flattens every other
      p to about 0; ``"rank"``: p, e are the samples' rank levels in the pool (ties averaged), in [0, 1].
    - ``keep_tokens``: which tokens of a Q2 sample stay in the loss. ``"lowest"`` context score
      (the paper, docs/method.md §3); ``"highest"`` keeps the highest-perplexity ones (the tokens not
      learned yet; the authors' ``fwise`` code path and the paper's "reversed" ablation).
    - ``drop_highest_ppl`` in [0, 1): the small-loss trick (co-teaching's forget rate): in each
      pool the floor(f n) scored samples with the highest PPL are never kept (of equal PPL the
      later goes first), and the triage runs on the others; K still counts them, so their slots go
      to other samples. A plausible wrong label is the pool's highest error once the model has
      learned the task; set f to about the share of wrong labels you expect. 0 (the paper).
    - ``drop_ppl_outliers`` = k > 0, or None: the small-loss trick with a share that adapts to the
      pool: a sample whose log PPL exceeds the pool's median log PPL by more than k scaled median
      absolute deviations (1.4826 MAD, a normal's sd) is never kept (K unchanged, as above). A
      clean pool loses only its outliers, a noisy one its wrong labels once they stand out; k = 2
      is the measured setting (README: the best on clean data, a failure with a third of the pool
      wrong). None (the paper). Exclusive with ``drop_highest_ppl``.
    - ``warmup_steps`` >= 0: the first optimizer steps are trained on every sample, unscored (the
      model first sees the data before judging it; InfoBatch does not prune its first epoch).
    - ``reference``: ``"base"`` turns on the reference guard for adapter training (LoRA / QLoRA):
      each sample's per-token NLL under the base model (adapters switched off) is computed at
      its first sight and cached; once the pool's loss has fallen below its base loss, a sample
      whose largest per-token rise above its base NLL exceeds the pool's median rise by more
      than ``reference_margin`` nats is suspected of a wrong label and not kept (its slot goes
      to another sample; see :mod:`qtuning_plugin.core.reference`). ``"none"`` (the paper).
    - ``reference_margin`` > 0: how far, in nats, a sample's largest rise must exceed the pool's
      median rise to be flagged (0.5: a factor e^0.5 = 1.65 in that token's probability).
    - ``reference_spread`` >= 0: the threshold also rises by this many median absolute deviations
      of the pool's rises, so that a pool whose correct answers all drift (long worked answers)
      flags fewer of them; 0 (the first rule) uses the margin alone.
    - ``reference_sticky``: a sample once flagged stays flagged at its later sightings (by its
      content key, saved with checkpoints). Without it, a wrong answer trained once (as with
      ``keep_tokens="highest"``, which trains its surprising tokens) is learned and stops rising.
    - ``reference_tokens``: inside the misconception samples whose tokens are pruned, a token whose
      NLL rose above its base by more than the pool's median largest rise plus ``reference_margin``
      is never kept (the row keeps its budget of other tokens): a wrong answer's contradicting
      tokens, in a sample the sample rule did not flag.

    Any other name, a value of the wrong type, NaN or a value out of range raises ``ValueError``
    naming the field and what it accepts. ``dataclasses.asdict`` / ``from_dict`` round-trip.
    """

    sample_ratio: float
    token_ratio: float
    neighbor_lambda: float
    pool: str
    token_budget: str
    top_up: str
    keep_tokens: str
    warmup_steps: int
    drop_highest_ppl: float
    drop_ppl_outliers: float | None
    reference: str
    reference_margin: float
    reference_spread: float
    reference_sticky: bool
    reference_tokens: bool

    def __init__(
        self,
        *,
        sample_ratio: float = 0.25,
        token_ratio: float = 0.5,
        neighbor_lambda: float = 0.5,
        pool: str = "step",
        token_budget: str = "sample",
        top_up: str = "minmax",
        keep_tokens: str = "lowest",
        warmup_steps: int = 0,
        drop_highest_ppl: float = 0.0,
        drop_ppl_outliers: float | None = None,
        reference: str = "none",
        reference_margin: float = 0.5,
        reference_spread: float = 0.0,
        reference_sticky: bool = False,
        reference_tokens: bool = False,
        **unknown: Any,
    ) -> None:
        if "preset" in unknown:
            raise ValueError("QTuningConfig: a preset is not a field; use QTuningConfig.from_dict({'preset': "
                             f"{unknown['preset']!r}, ...}}) or QTuning(preset=...); presets: {list(PRESETS)}")
        if unknown:
            raise ValueError(
                f"QTuningConfig: unknown field(s) {sorted(unknown)}; "
                f"allowed fields: {[f.name for f in dataclasses.fields(QTuningConfig)]}"
            )
        set_ = object.__setattr__  # frozen dataclass
        set_(self, "sample_ratio", _ratio("sample_ratio", sample_ratio, low_open=True))
        set_(self, "token_ratio", _ratio("token_ratio", token_ratio, low_open=True))
        set_(self, "neighbor_lambda", _ratio("neighbor_lambda", neighbor_lambda, low_open=False))
        set_(self, "pool", _choice("pool", pool, POOLS))
        set_(self, "token_budget", _choice("token_budget", token_budget, TOKEN_BUDGETS))
        set_(self, "top_up", _choice("top_up", top_up, TOP_UPS))
        set_(self, "keep_tokens", _choice("keep_tokens", keep_tokens, KEEP_TOKENS))
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, numbers.Integral) or warmup_steps < 0:
            raise ValueError(f"QTuningConfig.warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        set_(self, "warmup_steps", int(warmup_steps))
        if (isinstance(drop_highest_ppl, bool) or not isinstance(drop_highest_ppl, numbers.Real)
                or not 0.0 <= drop_highest_ppl < 1.0):  # NaN fails the comparison
            raise ValueError(f"QTuningConfig.drop_highest_ppl must be a number in [0, 1), got {drop_highest_ppl!r}")
        set_(self, "drop_highest_ppl", float(drop_highest_ppl))
        if drop_ppl_outliers is not None and (
                isinstance(drop_ppl_outliers, bool) or not isinstance(drop_ppl_outliers, numbers.Real)
                or not math.isfinite(drop_ppl_outliers) or drop_ppl_outliers <= 0):
            raise ValueError(f"QTuningConfig.drop_ppl_outliers must be null (off) or a finite number > 0 "
                             f"(scaled median absolute deviations), got {drop_ppl_outliers!r}")
        if drop_ppl_outliers is not None and drop_highest_ppl:
            raise ValueError(f"QTuningConfig: drop_highest_ppl ({drop_highest_ppl!r}) and drop_ppl_outliers "
                             f"({drop_ppl_outliers!r}) are two rules for the same drop; set one of them (the "
                             "other to 0 / null)")
        set_(self, "drop_ppl_outliers", None if drop_ppl_outliers is None else float(drop_ppl_outliers))
        set_(self, "reference", _choice("reference", reference, REFERENCES))
        if (isinstance(reference_margin, bool) or not isinstance(reference_margin, numbers.Real)
                or not math.isfinite(reference_margin) or reference_margin <= 0):
            raise ValueError(f"QTuningConfig.reference_margin must be a finite number > 0 (nats), "
                             f"got {reference_margin!r}")
        set_(self, "reference_margin", float(reference_margin))
        if (isinstance(reference_spread, bool) or not isinstance(reference_spread, numbers.Real)
                or not math.isfinite(reference_spread) or reference_spread < 0):
            raise ValueError(f"QTuningConfig.reference_spread must be a finite number >= 0 (median absolute "
                             f"deviations), got {reference_spread!r}")
        set_(self, "reference_spread", float(reference_spread))
        if not isinstance(reference_sticky, bool):
            raise ValueError(f"QTuningConfig.reference_sticky must be true or false, got {reference_sticky!r}")
        set_(self, "reference_sticky", reference_sticky)
        if not isinstance(reference_tokens, bool):
            raise ValueError(f"QTuningConfig.reference_tokens must be true or false, got {reference_tokens!r}")
        set_(self, "reference_tokens", reference_tokens)

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any] | None) -> "QTuningConfig":
        """Build from a mapping (a YAML block, a checkpoint); same validation as the constructor.

        A ``preset`` key names a combination of fields (:data:`PRESETS`); the mapping's other
        fields override the preset's."""
        if fields is None:
            return cls()
        if not isinstance(fields, Mapping):
            raise ValueError(f"QTuningConfig: expected a mapping of fields, got {type(fields).__name__}")
        bad_keys = [k for k in fields if not isinstance(k, str)]
        if bad_keys:
            raise ValueError(f"QTuningConfig: field names must be strings, got {bad_keys!r}")
        fields = dict(fields)
        if "preset" in fields:
            preset = fields.pop("preset")
            if not isinstance(preset, str) or preset not in PRESETS:
                raise ValueError(f"QTuningConfig.preset must be one of {list(PRESETS)}, got {preset!r}")
            fields = {**PRESETS[preset], **fields}
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "QTuningConfig":
        return QTuningConfig(**{**self.to_dict(), **changes})

    @property
    def prunes_nothing(self) -> bool:
        """True when every sample and every token is kept (the scoring pass can be skipped)."""
        return self.sample_ratio == 1 and self.token_ratio == 1


def _ratio(name: str, value: Any, *, low_open: bool) -> float:
    allowed = "(0, 1]" if low_open else "[0, 1]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"QTuningConfig.{name} must be a number in {allowed}, got {value!r} ({type(value).__name__})"
        )
    value = float(value)
    in_range = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if math.isnan(value) or not in_range:
        raise ValueError(f"QTuningConfig.{name} must be a number in {allowed}, got {value!r}")
    return value


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"QTuningConfig.{name} must be one of {list(allowed)}, got {value!r}")
    return value
