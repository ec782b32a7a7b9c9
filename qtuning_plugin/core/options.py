"""One option of :class:`~qtuning_plugin.core.config.QTuningConfig`: its default, its help line and
the values it accepts, checked in one place (:meth:`Option.check`). The config's dataclass fields,
the Axolotl ``qtuning:`` schema, the ``qtuning demo`` flags and README's options table are all
derived from these declarations, and the core functions check their arguments with them (one
message for one range). Pure Python (no torch)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Option:
    """A config field.

    - ``kind``: ``"ratio"`` (a number in [low, 1], or (low, 1] with ``open_low``), ``"number"``
      (a finite number >= ``low``, > ``low`` with ``open_low``, < ``high`` with ``high`` set),
      ``"choice"`` (one of ``choices``), ``"integer"`` (>= ``low``), ``"path"`` (a non-empty
      string or None).
    - ``optional``: None is accepted too (the option is off).
    - ``group``: ``"paper"``, ``"rules"`` or ``"runtime"`` (runtime options change how it runs,
      never what it decides).
    """

    name: str
    default: Any
    help: str
    kind: str
    group: str
    choices: tuple[str, ...] = ()
    low: float = 0.0
    high: float | None = None
    open_low: bool = False
    optional: bool = False

    def allowed(self) -> str:
        """The accepted values, in words (for errors, the CLI and the docs)."""
        if self.kind == "choice":
            text = f"one of {list(self.choices)}"
        elif self.kind == "ratio":
            text = f"a number in {'(' if self.open_low else '['}{self.low:g}, 1]"
        elif self.kind == "number" and self.high is None:
            text = f"a finite number {'>' if self.open_low else '>='} {self.low:g}"
        elif self.kind == "number":
            text = f"a number in {'(' if self.open_low else '['}{self.low:g}, {self.high:g})"
        elif self.kind == "integer":
            text = f"an integer >= {self.low:g}"
        else:
            text = "a file path"
        return f"null (off) or {text}" if self.optional else text

    def check(self, value: Any, label: str | None = None) -> Any:
        """``value`` normalised (ints to floats for numbers), or ``ValueError`` naming the field and
        what it accepts. ``label``: how the error names the value (``QTuningConfig.<name>`` unless
        given; a core function checking its argument passes ``"<function>: <argument>"``)."""
        if value is None and self.optional:
            return None
        bad = ValueError(f"{label or f'QTuningConfig.{self.name}'} must be {self.allowed()}, got {value!r}")
        if self.kind == "choice":
            if not isinstance(value, str) or value not in self.choices:
                raise bad
            return value
        if self.kind == "path":
            if not isinstance(value, str) or not value:
                raise bad
            return value
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise bad
        if self.kind == "integer":
            if not isinstance(value, numbers.Integral) or value < self.low:
                raise bad
            return int(value)
        try:
            value = float(value)
        except OverflowError:  # an int beyond float's range
            raise bad from None
        high = 1.0 if self.kind == "ratio" else self.high
        ok = math.isfinite(value) and (value > self.low if self.open_low else value >= self.low)
        ok = ok and (high is None or (value <= high if self.kind == "ratio" else value < high))
        if not ok:
            raise bad
        return value

    def field(self) -> dataclasses.Field:
        """The dataclass field of this option (its metadata holds the option)."""
        return dataclasses.field(default=self.default, metadata={"option": self, "help": self.help})
