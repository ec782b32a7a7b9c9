"""Rules beyond the paper: small pieces that keep samples out of the triage.

The paper's Algorithm 1 is the spine (:mod:`..sample_stage`, :mod:`..tokens`). A *rule* adds one
behaviour to it without touching it: it marks samples of a pool that are not eligible; the
triage runs on the others while K still counts every scored sample, so their slots go to other
samples. Each rule is one module of this package and owns:

- its config fields (``options``: merged into :class:`~qtuning_plugin.core.config.QTuningConfig`,
  the Axolotl block, the CLI and README's table) and any check across them (:meth:`Rule.check`);
- per-sample features it needs computed on the device (:meth:`Rule.features`; copied to the host
  with the pool's statistics, in the step's one copy) and any extra forward (:meth:`Rule.prepare`);
- the mask it contributes (:meth:`Rule.exclude`, on the host);
- its metric (``qtuning/<metric>``: samples it kept out per step) and its decision-log field;
- whether it keeps state across steps within a run (``stateful``: a cache, say; not checkpointed).

Adding a rule is adding a module here that defines a :class:`Rule` subclass (found by
:func:`rule_classes`), plus its tests. Rules never import the modules above them (config, step).

The config imports these modules for their options, and ``qtuning --help`` imports the config, so
they load without torch (seconds on a small machine): they use :data:`torch`, a stand-in that
imports torch on first use, and import other core modules inside the functions that need them.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

from ..options import Option

if TYPE_CHECKING:
    import torch

    from ..scoring import Scores
else:
    class _Torch:
        """``torch``, imported on first attribute access."""

        def __getattr__(self, name: str) -> Any:
            import torch as module

            return getattr(module, name)

    torch = _Torch()


@dataclass
class Pool:
    """One selection pool on the host: float64 [n] statistics per sample (NaN: no score), and the
    rules' features, by name (see :meth:`Rule.features`)."""

    ppl: torch.Tensor
    entropy: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def scored(self) -> torch.Tensor:
        """bool [n]: samples with a score (a label token and no NaN)."""
        from ..sample_stage import scored_mask

        return scored_mask(self.ppl, self.entropy)

    def subset(self, index: torch.Tensor) -> "Pool":
        return Pool(self.ppl[index], self.entropy[index], {k: v[index] for k, v in self.features.items()})


class Rule:
    """A behaviour beyond the paper (see the package's docstring). Subclasses set the class
    attributes and override :meth:`exclude`; the rest is optional."""

    name: ClassVar[str]  # how README and errors call it
    position: ClassVar[int] = 100  # where its options stand in the config (lower first)
    options: ClassVar[tuple[Option, ...]] = ()
    metric: ClassVar[str]  # logged as qtuning/<metric>: samples this rule kept out, per step
    log_field: ClassVar[str]  # decision-log field (bool per sample), written only while the rule is on
    # True: the rule decides on this process's own pool even under ``pool: global`` (its features
    # are per-rank, e.g. per-token statistics); its verdict is gathered with the scores.
    local: ClassVar[bool] = False
    # True: the rule keeps state across steps (a cache, say); callers create it once per run. A
    # checkpoint does not carry it: a resumed run starts it afresh.
    stateful: ClassVar[bool] = False

    def __init__(self, config: Any) -> None:
        self.config = config

    @classmethod
    def is_active(cls, config: Any) -> bool:
        """Whether ``config`` turns this rule on."""
        raise NotImplementedError

    @classmethod
    def check(cls, config: Any) -> None:
        """Checks across fields (each field alone is checked by its :class:`Option`)."""

    def prepare(self, step: "StepContext") -> dict[str, Any]:
        """Before deciding, inside the scoring pass: extra forwards, returned as named inputs of
        :meth:`features` (every rank calls it, with the same forwards and collectives)."""
        return {}

    def features(self, scores: Sequence[Scores], inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Per-sample features [n] over the step's micro-batches (on their device), copied to the
        host with the pool's statistics; :meth:`exclude` reads them from ``pool.features``."""
        return {}

    def exclude(self, pool: Pool) -> torch.Tensor:
        """bool [n] on the host: the samples of ``pool`` this rule keeps out of the triage."""
        raise NotImplementedError


@dataclass
class StepContext:
    """What :meth:`Rule.prepare` may use: the model as training calls it, the step's micro-batches
    as scored (padded), their scores, how each was scored (None: as the padded batch; else a
    callable that scores it again, e.g. packed), the collectives, the scorer's chunk size, and
    the scored micro-batches' ``input_ids`` / ``labels`` / ``attention_mask`` on the host, where
    the step has them (None otherwise: read them from ``scored``, a device-to-host copy)."""

    model: torch.nn.Module
    scored: Sequence[Mapping[str, torch.Tensor]]
    scores: Sequence[Scores]
    scorers: Sequence[Any]
    collectives: Any
    chunk_size: int
    host: Sequence[Mapping[str, torch.Tensor]] | None = None


def rule_classes() -> list[type[Rule]]:
    """Every rule of this package, by ``position``."""
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        found += [v for v in vars(module).values()
                  if isinstance(v, type) and issubclass(v, Rule) and v is not Rule and v.__module__ == module.__name__]
    return sorted(found, key=lambda c: c.position)


def build_rules(config: Any) -> list[Rule]:
    """The rules ``config`` turns on, one fresh instance each (hold them for the whole run: a rule
    may keep state across steps)."""
    return [cls(config) for cls in rule_classes() if cls.is_active(config)]


__all__ = ["Pool", "Rule", "StepContext", "build_rules", "rule_classes", "torch"]
