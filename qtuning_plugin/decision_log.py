"""Decision logs: what Q-Tuning saw and kept, one jsonl row per pool sample per optimizer step.

Row fields: ``step`` (the optimizer step being trained, 1-based), ``rank`` (process index),
``id`` (:func:`sample_id` of the sample's tokens, the same id ``qtuning analyze`` writes),
``ppl``, ``entropy`` (the sample's error and uncertainty), ``quadrant`` (1-4, by the pool's
medians), ``kept`` (bool), ``kept_tokens`` (label tokens left in the loss) and ``n_tokens``
(label tokens the sample had). Non-finite numbers are written as ``null``. Each rule beyond the
paper (:mod:`qtuning_plugin.core.rules`) that is on adds its own field (its ``log_field``: bool,
the rule kept the sample out of the triage); :func:`rule_fields` lists them and
:func:`rules_table` prints them with their metrics (README's table). They name the samples
worth reading in your dataset: suspected wrong labels, or its hardest samples.

The file is appended to after every step and flushed. When training (re)starts at global step
``s``, rows of steps after ``s`` are removed first: they belong to an interrupted run (resumed
from an earlier checkpoint) or to an earlier run in the same place (``s`` = 0), so the log always
tells this run's history without duplicates. Under several processes rank 0 writes the file
named (``decisions.jsonl``) and rank r > 0 its own beside it (``decisions.rank1.jsonl``, ...:
:func:`rank_path`); :func:`log_paths` finds them all from the name, and ``qtuning plot
decisions.jsonl`` draws them together.

    python -m qtuning_plugin.decision_log     # prints the rules' metrics and fields (markdown)
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from .core.keys import content_key

FIELDS = ("step", "rank", "id", "ppl", "entropy", "quadrant", "kept", "kept_tokens", "n_tokens")


def sample_id(tokens: Sequence[int]) -> str:
    """A stable id of a tokenised sample (padding excluded): its
    :func:`~qtuning_plugin.core.keys.content_key`, 16 hex digits of BLAKE2b over its token ids. The
    same tokens give the same id in any process, run or machine."""
    return content_key(tokens)


def finite_or_none(x: float) -> float | None:
    """``x`` as a float, or None when it is NaN or infinite (JSON has neither)."""
    x = float(x)
    return x if math.isfinite(x) else None


def rank_path(path: str | os.PathLike, rank: int, world_size: int = 2) -> Path:
    """``path`` for rank 0 (or a single process); ``stem.rankN.suffix`` beside it for rank N > 0."""
    path = Path(path)
    if world_size <= 1 or rank == 0:
        return path
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix or '.jsonl'}")


def _rank_files(path: Path) -> dict[int, Path]:
    """Rank N > 0 -> the file :func:`rank_path` gives it beside ``path``, for those that exist."""
    pattern = re.compile(re.escape(path.stem) + r"\.rank([1-9][0-9]*)" + re.escape(path.suffix or ".jsonl") + "$")
    found = {}
    for p in path.parent.glob(f"{glob.escape(path.stem)}.rank*"):
        match = pattern.match(p.name)
        if match and p.is_file():
            found[int(match.group(1))] = p
    return found


def log_paths(path: str | os.PathLike) -> list[Path]:
    """Every rank's file of the log named ``path`` (as given to ``log_decisions``): ``path`` (rank
    0) if it exists, then ``stem.rank1.suffix``, ... in rank order."""
    path = Path(path)
    files = _rank_files(path)
    return ([path] if path.is_file() else []) + [files[r] for r in sorted(files)]


def rule_fields() -> dict[str, list[str]]:
    """Decision-log field -> the rules that write it (their ``name``), from the rules' declarations,
    in the rules' order. Several rules may share a field (``excluded``: the two high-PPL rules)."""
    from .core.rules import rule_classes

    fields: dict[str, list[str]] = {}
    for rule in rule_classes():
        fields.setdefault(rule.log_field, []).append(rule.name)
    return fields


def rules_table() -> str:
    """The rules' metrics and decision-log fields as README's markdown table, from the rules'
    declarations (one row per rule)."""
    from .core.rules import rule_classes

    lines = ["| rule | its options | metric: samples it kept out, per step | decision-log field |",
             "|---|---|---|---|"]
    for rule in rule_classes():
        options = ", ".join(f"`{o.name}`" for o in rule.options)
        lines.append(f"| {rule.name} | {options} | `qtuning/{rule.metric}` | `{rule.log_field}` |")
    return "\n".join(lines)


class DecisionLog:
    """Appends decision rows to a jsonl file (see the module docstring for the contract)."""

    def __init__(self, path: str | os.PathLike, rank: int = 0, world_size: int = 1) -> None:
        self.path = rank_path(path, rank, world_size)
        self.rank = rank
        self._named, self._world_size = Path(path), world_size

    def start(self, global_step: int) -> int:
        """Drop the rows of steps after ``global_step`` (atomically); returns how many were dropped.
        Rank 0 also deletes the files of ranks this run does not have (an earlier run's, with more
        processes), so that ``qtuning plot`` draws this run's ranks only."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            for rank, stale in _rank_files(self._named).items():
                if rank >= self._world_size:
                    stale.unlink(missing_ok=True)
        if not self.path.exists():
            return 0
        keep, dropped = [], 0
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a crash
                    dropped += 1
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= global_step:
                    keep.append(line if line.endswith("\n") else line + "\n")
                else:
                    dropped += 1
        if dropped:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(keep), encoding="utf-8")
            os.replace(tmp, self.path)
        return dropped

    def write(self, step: int, ids: Iterable[str], ppl, entropy, quadrant, kept, kept_tokens, n_tokens,
              flags: dict[str, Sequence[bool]] | None = None) -> None:
        """Append one row per sample; ``flags`` (name -> one bool per sample, e.g. ``excluded``)
        adds those fields to every row."""
        flags = {name: list(values) for name, values in (flags or {}).items()}
        rows = []
        for j, (i, p, e, q, k, kt, nt) in enumerate(zip(ids, ppl, entropy, quadrant, kept, kept_tokens, n_tokens)):
            row = {"step": int(step), "rank": self.rank, "id": i, "ppl": finite_or_none(p),
                   "entropy": finite_or_none(e), "quadrant": int(q), "kept": bool(k),
                   "kept_tokens": int(kt), "n_tokens": int(nt)}
            row.update((name, bool(values[j])) for name, values in flags.items())
            rows.append(json.dumps(row))
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("\n".join(rows) + "\n")
            f.flush()


def read_log(path: str | os.PathLike) -> list[dict]:
    """Rows of a decision log, in order: the file ``path`` alone, or, where ranks > 0 wrote files
    beside it (:func:`log_paths`), every rank's rows, rank by rank (a line cut short by a crash is
    ignored). The same id can appear twice in one step: a pool may hold two copies of a sample."""
    path = Path(path)
    paths = log_paths(path)
    if not paths:
        raise FileNotFoundError(f"no such decision log: {path}")
    rows = [row for p in paths for row in _lines(p)]
    for row in rows:
        if not all(k in row for k in ("step", "id", "quadrant", "kept")):
            raise ValueError(f"{path} is not a Q-Tuning decision log (a row lacks step / id / quadrant / kept)")
    return rows


def _lines(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                yield row


if __name__ == "__main__":
    print(rules_table())
