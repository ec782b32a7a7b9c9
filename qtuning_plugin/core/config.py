"""QTuningConfig: Q-Tuning's settings, declared once and validated in one place.

Three groups of fields: **the paper** (Algorithm 1 and the readings of it the paper or the
authors' code allow), **the rules** (behaviours beyond the paper, each declared by its module in
:mod:`.rules`), and **runtime** (how it runs, never what it decides). Each field is an
:class:`~qtuning_plugin.core.options.Option`: its help line and accepted values live there, and the
Axolotl ``qtuning:`` block, the ``qtuning demo`` flags and README's table are derived from them.

    python -m qtuning_plugin.core.config      # prints the options table (markdown)
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Mapping

from .options import Option
from .rules import rule_classes

PAPER = (
    Option("sample_ratio", 0.25, "share r_s of each pool trained: K = max(1, floor(r_s n)) samples; 1 keeps every "
           "sample", kind="ratio", group="paper", open_low=True),
    Option("token_ratio", 0.5, "share r_t of the response tokens kept in each misconception (Q2) sample; 1 keeps "
           "every token", kind="ratio", group="paper", open_low=True),
    Option("neighbor_lambda", 0.5, "weight of the two neighbours in the token score s_i = (1 - lambda) PPL_i + "
           "lambda (PPL_i-1 + PPL_i+1)", kind="ratio", group="paper"),
    Option("pool", "step", "what one triage ranks: every micro-batch of an optimizer step on one device (the paper), "
           "each micro-batch alone, or every device's step (each keeps its own K)", kind="choice", group="paper",
           choices=("step", "micro_batch", "global")),
    Option("token_budget", "sample", "'sample': ceil(r_t n) of the n response tokens of each Q2 sample (the paper); 'batch': one "
           "pooled budget over the pool, as in the authors' code", kind="choice", group="paper",
           choices=("sample", "batch")),
    Option("keep_tokens", "lowest", "which tokens of a Q2 sample stay in the loss: 'lowest' context score (the "
           "paper) or 'highest' (the tokens not learned yet: the paper's reversed ablation)", kind="choice",
           group="paper", choices=("lowest", "highest")),
)
RUNTIME = (
    Option("chunk_size", 256, "scoring memory knob: positions whose vocabulary distribution is computed at once "
           "(about 3 x chunk_size x vocab floats at the peak)", kind="integer", group="runtime", low=1),
    Option("log_decisions", None, "write every step's decisions (each sample's id, error, uncertainty, quadrant, "
           "fate) to this jsonl file; `qtuning plot` draws it", kind="path", group="runtime", optional=True),
    Option("plot_every", 50, "every this many optimizer steps, send the latest pool's EU plane as an image to the "
           "trackers of report_to that take one (wandb, tensorboard, mlflow, trackio); 0: never",
           kind="integer", group="runtime", low=0),
)
OPTIONS: tuple[Option, ...] = (*PAPER, *(o for rule in rule_classes() for o in rule.options), *RUNTIME)

# Named combinations of fields: ``QTuning(preset=...)``, ``preset:`` in a ``qtuning:`` block,
# ``qtuning demo --preset``. Fields given beside a preset override it.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},  # the defaults: the paper's Algorithm 1
    # the small-loss rule against wrong labels with the tokens not learned yet trained
    "small-loss": {"drop_highest_ppl": 0.25, "keep_tokens": "highest"},
    # no noise rate to set: answers the model's uncertainty cannot explain never kept, and the tokens
    # not learned yet trained
    "auto": {"drop_surprising": 0.5, "keep_tokens": "highest"},
}

# Options and presets the evidence retired (docs/options.md, "Retired options"): what replaced each.
RETIRED = {
    "top_up": "removed: the top-up is the paper's (min-max |p - e|); 'rank' did not help",
    "warmup_steps": "removed: training every sample unscored first did not help",
    "reference_spread": "removed: the reference guard uses its margin alone (reference_margin)",
    "reference_sticky": "removed: the reference guard judges each sighting afresh",
    "reference_tokens": "removed: the reference guard flags samples, not tokens",
}
RETIRED_PRESETS = {"robust": "retired: small-loss beat it; use preset: small-loss, or reference: base by hand"}


def _declare(cls):
    """Give ``cls`` one dataclass field per option (in :data:`OPTIONS` order), keyword-only."""
    cls.__annotations__ = {o.name: Any for o in OPTIONS}
    for option in OPTIONS:
        setattr(cls, option.name, option.field())
    return dataclass(frozen=True, kw_only=True)(cls)


@_declare
class QTuningConfig:
    """Settings of Q-Tuning; every field is keyword-only and has a default (``QTuningConfig()`` is
    the paper at 25 % of the samples x 50 % of the misconception tokens). ``help(QTuningConfig)``
    or README's table lists them; :data:`OPTIONS` holds each field's help and accepted values.

    A value of the wrong type, NaN or out of range, an unknown or retired name raises
    ``ValueError`` naming the field and what it accepts (or what replaced it).
    ``from_dict`` / ``to_dict`` round-trip."""

    def __post_init__(self) -> None:
        for option in OPTIONS:
            object.__setattr__(self, option.name, option.check(getattr(self, option.name)))
        for rule in rule_classes():
            rule.check(self)

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
            if isinstance(preset, str) and preset in RETIRED_PRESETS:
                raise ValueError(f"QTuningConfig.preset {preset!r} is {RETIRED_PRESETS[preset]}")
            if not isinstance(preset, str) or preset not in PRESETS:
                raise ValueError(f"QTuningConfig.preset must be one of {list(PRESETS)}, got {preset!r}")
            fields = {**PRESETS[preset], **fields}
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "QTuningConfig":
        return QTuningConfig(**{**self.to_dict(), **changes})

    def decisions(self) -> dict[str, Any]:
        """The fields that change what is decided (every group but runtime)."""
        return {o.name: getattr(self, o.name) for o in OPTIONS if o.group != "runtime"}

    def paper(self) -> "QTuningConfig":
        """This config without its rules: what the paper's Algorithm 1 decides at the same ratios."""
        return self.replace(**{o.name: o.default for o in OPTIONS if o.group == "rules"})

    @property
    def prunes_nothing(self) -> bool:
        """True when every sample and every token is kept (the scoring pass can be skipped)."""
        return self.sample_ratio == 1 and self.token_ratio == 1


def _check_names(init):
    @functools.wraps(init)
    def checked(self, *args: Any, **fields: Any) -> None:
        if args:
            raise ValueError("QTuningConfig takes its fields by name, e.g. QTuningConfig(sample_ratio=0.25)")
        if "preset" in fields:
            raise ValueError("QTuningConfig: a preset is not a field; use QTuningConfig.from_dict({'preset': "
                             f"{fields['preset']!r}, ...}}) or QTuning(preset=...); presets: {list(PRESETS)}")
        retired = sorted(k for k in fields if k in RETIRED)
        if retired:
            raise ValueError("; ".join(f"QTuningConfig.{k} was {RETIRED[k]}" for k in retired))
        unknown = sorted(k for k in fields if k not in {o.name for o in OPTIONS})
        if unknown:
            raise ValueError(f"QTuningConfig: unknown field(s) {unknown}; allowed fields: {[o.name for o in OPTIONS]}")
        init(self, **fields)
    return checked


QTuningConfig.__init__ = _check_names(QTuningConfig.__init__)


def options_table() -> str:
    """README's options table (markdown), from :data:`OPTIONS`."""
    lines = ["| option | default | accepts | what it does |", "|---|---|---|---|"]
    for group, title in (("paper", "the paper"), ("rules", "rules beyond the paper"), ("runtime", "runtime")):
        lines.append(f"| **{title}** | | | |")
        for o in (o for o in OPTIONS if o.group == group):
            default = "null" if o.default is None else o.default
            lines.append(f"| `{o.name}` | `{default}` | {o.allowed()} | {o.help} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(options_table())
