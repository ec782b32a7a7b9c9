#!/usr/bin/env python
"""Can a per-sample score tell a wrong label from a useful sample? Read from logged pools, no training.

Every run of ``benchmarks/quality.py`` logs, for each pool it decided, each sample's kind (useful,
wrong, garbled, redundant), PPL and entropy. The random-pruning arms log them without acting on
them, so their pools follow a training trajectory no selection has shaped. This script reports,
per regime:

- AUROC of wrong vs useful samples for PPL and for entropy: the chance that a wrong answer scores
  above a useful one (0.5: no separation), over the first 4 steps and the rest;
- the triage replayed on the same pools with ``drop_highest_ppl`` = 0, 1/8, 1/4, 3/8 (the small-loss
  trick) and ``drop_ppl_outliers`` = 1.5, 2, 3 (its adaptive share): the share of corrupted (wrong
  + garbled) samples in what it would keep, against the pools', and the share of useful samples
  the rule keeps out of the triage;
- and, replayed the same way, a rule that is not in the package: ``drop_ppl_outliers`` with the
  spread measured on the pool's lower half only (median minus the values below it), the side
  that wrong answers do not reach, k = 1.5, 2, 2.5: can a pool statistic estimate the noise rate
  when a third of the pool is wrong?

    python benchmarks/separation.py benchmarks/results/quality-1ep.runs.jsonl benchmarks/results/quality-3ep.runs.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict

import torch

from qtuning_plugin.core import QTuningConfig, triage
from qtuning_plugin.core.rules import Pool, build_rules

CORRUPTED = ("wrong", "swapped", "garbled")


def auroc(positive, negative) -> float:
    """P(a positive scores above a negative), ties counting one half."""
    if not positive or not negative:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def pools_of(files, arm: str, precision: str | None):
    """{regime: [(step index within its run, pool), ...]} from the runs of ``arm`` (and
    ``precision``, if given)."""
    pools = defaultdict(list)
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                run = json.loads(line)
                if run["arm"] != arm or (precision and run.get("precision", precision) != precision):
                    continue
                pools[run["regime"]] += list(enumerate(run.get("decisions") or []))
    return pools


def separation(pools) -> dict:
    scores = defaultdict(lambda: defaultdict(list))  # (phase, score) -> kind -> values
    for step, pool in pools:
        phase = "first 4 steps" if step < 4 else "later steps"
        for i, kind in enumerate(pool["kind"]):
            for name in ("PPL", "entropy"):
                scores[phase, name][kind].append(pool[name.lower()][i])
    return {key: auroc(v["wrong"], v["useful"]) for key, v in sorted(scores.items())}


def lower_half_outliers(ppl: torch.Tensor, k: float) -> torch.Tensor:
    """bool [n]: log PPL above the pool's (lower) median by more than k x 1.4826 x the median of
    (median - x) over the x at or below the median: ``drop_ppl_outliers`` with a spread that the
    samples above the median do not set."""
    x = ppl.to(torch.float64).log()
    median = x.median()
    spread = 1.4826 * (median - x[x <= median]).median()
    return x > median + k * spread


def replay(pools, sample_ratio: float, exclude=None, **fields) -> tuple[float, float, float]:
    """(corrupted share of the pools, of what the triage would keep, share of the useful samples
    kept out) with the package's rules that the :class:`QTuningConfig` ``fields`` turn on (e.g.
    ``drop_highest_ppl=0.25``, ``drop_ppl_outliers=2.0``; none: the paper) and ``exclude`` (a
    function of the pool, a :class:`~qtuning_plugin.core.rules.Pool`, returning a bool mask: a
    rule that is not in the package). What they keep out goes to the triage as its ``eligible``
    complement (K unchanged), as in a training step."""
    rules = build_rules(QTuningConfig(sample_ratio=sample_ratio, **fields))
    seen, kept, excluded = Counter(), Counter(), Counter()
    for _, pool in pools:
        stats = Pool(torch.tensor(pool["ppl"], dtype=torch.float64), torch.tensor(pool["entropy"], dtype=torch.float64))
        out = torch.zeros(stats.ppl.shape, dtype=torch.bool)
        for rule in rules:
            out |= rule.exclude(stats)
        if exclude is not None:
            out |= exclude(stats)
        result = triage(stats.ppl, stats.entropy, sample_ratio, eligible=~out)
        for kind, k, x in zip(pool["kind"], result.keep.tolist(), out.tolist()):
            seen[kind] += 1
            kept[kind] += k
            excluded[kind] += x
    return _corrupted_share(seen), _corrupted_share(kept), excluded["useful"] / max(1, seen["useful"])


def _corrupted_share(counts: Counter) -> float:
    return sum(counts[k] for k in CORRUPTED) / max(1, sum(counts.values()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="<out>.runs.jsonl files of benchmarks/quality.py")
    p.add_argument("--arm", default="random-25x50", help="whose logged pools to read (default: random-25x50)")
    p.add_argument("--precision", choices=["fp32", "bf16 autocast"], help="only runs at this precision")
    p.add_argument("--sample-ratio", type=float, default=0.25)
    args = p.parse_args(argv)
    for regime, pools in pools_of(args.runs, args.arm, args.precision).items():
        if not pools:
            continue
        print(f"{regime}: {len(pools)} pools of {args.arm}")
        for (phase, name), value in separation(pools).items():
            print(f"  AUROC wrong > useful, {name:8} {phase:14} {value:.2f}")
        rules = [(f"drop_highest_ppl {f:<5}", {"drop_highest_ppl": f}) for f in (0.0, 0.125, 0.25, 0.375)]
        rules += [(f"drop_ppl_outliers {k:<4}", {"drop_ppl_outliers": k}) for k in (1.5, 2.0, 3.0)]
        rules += [(f"lower-half outliers {k:<4}", {"exclude": lambda p, k=k: lower_half_outliers(p.ppl, k)})
                  for k in (1.5, 2.0, 2.5)]
        rules += [(f"drop_surprising {m:<5}", {"drop_surprising": m}) for m in (0.25, 0.5, 1.0)]
        for name, rule in rules:
            pool, kept, useful_out = replay(pools, args.sample_ratio, **rule)
            print(f"  {name}: corrupted {100 * pool:.1f} % of the pools, {100 * kept:.1f} % of what the "
                  f"triage keeps; {100 * useful_out:.1f} % of the useful samples kept out")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
