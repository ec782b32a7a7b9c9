#!/usr/bin/env python
"""One arm against the others, regime by regime, from the runs that ``benchmarks/quality.py`` recorded.

``quality.py`` reports each regime's arms against random pruning; this table puts one arm (a
preset) in a row per regime, paired by seed against random pruning at its token budget and at its
compute, against the other rules, with the corrupted share of its pools and of what it kept, and
the share of useful samples its rules kept out (replayed from the logged pools with the package's
rules). Last, a line per regime on issue 36's target for a preset (no harm against random pruning at
the same compute, and help where the pools hold wrong labels; :func:`target`). No training: seconds.

    python benchmarks/preset_table.py benchmarks/results/quality-3ep.runs.jsonl --precision fp32 \\
        --out benchmarks/results/preset-auto-3ep.md     # preset auto (issue 29)
    python benchmarks/preset_table.py benchmarks/results/gsm8k.runs.jsonl --metrics answer_accuracy answer_nll
        # benchmarks/gsm8k.py's runs (its arms too), on the final answer instead of exact match and solution NLL
    python benchmarks/preset_table.py benchmarks/results/quality-1ep-auto.runs.jsonl \\
        benchmarks/results/quality-3ep.runs.jsonl benchmarks/results/gsm8k.runs.jsonl \\
        --out benchmarks/results/preset-auto-target.md   # auto on every cell measured, synthetic and GSM8K
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gsm8k import ARMS as GSM8K_ARMS
from quality import ARMS, corrupted_share, mean_sd, paired, spec_of

from qtuning_plugin.core import QTuningConfig
from qtuning_plugin.core.rules import Pool, Rule, build_rules

VERSUS = {"random-25x50": "random 25 x 50 (same token budget)", "random-25x100": "random 25 x 100 (same compute)",
          "qtuning-smallloss-highest-25x50": "small-loss", "qtuning-25x50": "the paper",
          "qtuning-auto-25x50": "auto", "full": "full data"}
ARMS_TABLE = ("random-25x50", "random-25x100", "qtuning-25x50", "qtuning-smallloss-highest-25x50", "qtuning-auto-25x50",
              "full")


CANDIDATE_OPTIONS = ("select", "within", "avoid_q1")  # a Candidate's own arguments, not QTuningConfig options


def arm_spec(arm: str):
    """An arm's spec, from benchmarks/gsm8k.py's arms or quality.py's (retired ones included)."""
    return GSM8K_ARMS[arm] if arm in GSM8K_ARMS else spec_of(arm)


def arm_rules(arm: str):
    """The package's rules an arm turns on (fresh instances), or None for an arm that runs none
    (random, full) or whose rules need features the pools did not log."""
    spec = arm_spec(arm)
    if spec is None or spec[0] not in ("qtuning", "candidate", "filtered"):
        return None
    options = {k: v for k, v in (spec[3] if len(spec) > 3 else {}).items() if k not in CANDIDATE_OPTIONS}
    rules = build_rules(QTuningConfig(sample_ratio=spec[1], token_ratio=spec[2], **options))
    if not rules or any(type(r).features is not Rule.features for r in rules):  # features not logged
        return None
    return rules


def logged_pool(step) -> Pool:
    """One logged pool (a decision-log step of a run) as the rules read it."""
    return Pool(torch.tensor(step["ppl"], dtype=torch.float64), torch.tensor(step["entropy"], dtype=torch.float64))


def kept_out(rules, pool: Pool) -> torch.Tensor:
    """bool [n]: the samples of ``pool`` that ``rules`` keep out, as in a training step (a pool whose
    every scored sample they would keep out is decided without them: nothing kept out)."""
    out = torch.zeros(pool.ppl.shape, dtype=torch.bool)
    for rule in rules:
        out |= rule.exclude(pool)
    if pool.scored.any() and not (pool.scored & ~out).any():
        out[:] = False
    return out


def useful_kept_out(runs, arm: str) -> float | None:
    """Share of the useful samples that ``arm``'s rules keep out, replayed on its logged pools
    (:func:`kept_out`). None for an arm without rules or pools, or whose rules need features the
    pools did not log."""
    rules = arm_rules(arm)
    if rules is None:
        return None
    useful = out_useful = 0
    for run in runs:
        for step in run.get("decisions") or []:
            for kind, x in zip(step["kind"], kept_out(rules, logged_pool(step)).tolist()):
                useful += kind == "useful"
                out_useful += x and kind == "useful"
    return out_useful / useful if useful else None


BASELINE = "random-25x100"  # issue 36's target is set against random pruning at the same compute
NOISY = 0.10  # "helps" is asked where at least this share of the pools is corrupted
SEEDS = 5  # the target's seed count: no harm on 3 of 5 seeds (60 %), helps on 4 of 5 (80 %)


def no_harm(p, higher: bool) -> tuple[bool | None, str]:
    """Issue 36's "no harm" on one metric, from :func:`quality.paired`'s (mean, sd, wins, ties, n):
    the mean difference not worse and at least 60 % of the seeds not worse (3 of 5). With fewer than
    5 seeds: False once the seeds still to run cannot reach 3 of 5, else None (open)."""
    mean, _, wins, ties, n = p
    count, mean_ok = wins + ties, (mean >= 0) if higher else (mean <= 0)
    if n < SEEDS:
        return (False if count + SEEDS - n < math.ceil(0.6 * SEEDS) else None), f"{count} of {n} not worse"
    return mean_ok and count >= math.ceil(0.6 * n), f"{count} of {n} not worse"


def helps(pa, pn) -> bool | None:
    """Issue 36's "helps": better on at least 80 % of the seeds (4 of 5) on one metric, and on its mean,
    without harm on the other. With fewer than 5 seeds: False once neither metric can get there, else
    None (open)."""
    # (better on, its mean better, no harm on, is that one higher-is-better)
    routes = ((pa, pa[0] > 0, pn, False), (pn, pn[0] < 0, pa, True))
    if min(pa[4], pn[4]) >= SEEDS:
        return any(p[2] >= math.ceil(0.8 * p[4]) and better and no_harm(q, higher)[0] is True
                   for p, better, q, higher in routes)
    if any(p[2] + SEEDS - p[4] >= math.ceil(0.8 * SEEDS) and no_harm(q, higher)[0] is not False
           for p, _, q, higher in routes):
        return None
    return False


def target(rows, arm: str, regimes) -> list[str]:
    """One line per regime: ``arm`` against random pruning at the same compute on issue 36's target.
    No harm reads the NLL alone on GSM8K (the whole solution: the final answer rewards copying the
    last computation, and greedy exact match is 0-2 of 32 there) and both metrics elsewhere."""
    word = {True: "yes", False: "**no**", None: "open"}
    lines = [("| regime | seeds | corrupted pool | exact match: Δ (seeds not worse) | NLL: Δ (seeds not worse) | "
              "no harm | helps |"), "|---|---|---|---|---|---|---|"]
    for regime in regimes:
        rs = [r for r in rows if r["regime"] == regime]
        pa, pn = paired(rs, arm, BASELINE, "accuracy"), paired(rs, arm, BASELINE, "nll")
        if pa is None:
            continue
        (ok_a, seen_a), (ok_n, seen_n) = no_harm(pa, True), no_harm(pn, False)
        verdicts = [ok_n] if regime.startswith("gsm8k-") else [ok_a, ok_n]
        harm = False if False in verdicts else (None if None in verdicts else True)
        pool = statistics.mean(corrupted_share(r)[0] for r in rs if r["arm"] == arm)
        lines.append(f"| {regime} | {pa[4]} | {100 * pool:.1f} % | {100 * pa[0]:+.1f} pp ({seen_a}) | "
                     f"{pn[0]:+.3f} ({seen_n}) | {word[harm]} | {word[helps(pa, pn)] if pool >= NOISY else '-'} |")
    return lines


def table(rows, arm: str, regimes=None) -> list[str]:
    regimes = regimes or list(dict.fromkeys(r["regime"] for r in rows if r["arm"] == arm))
    others = [b for b in VERSUS if b != arm]
    lines = [f"| regime | {arm}: exact match | NLL | " + " | ".join(f"vs {VERSUS[b]}: exact match (wins / ties), "
                                                                    "NLL (wins)" for b in others) +
             " | corrupted: pool → kept | useful kept out |", "|---" * (5 + len(others)) + "|"]
    for regime in regimes:
        rs = [r for r in rows if r["regime"] == regime]
        mine = [r for r in rs if r["arm"] == arm]
        acc, nll = mean_sd(r["accuracy"] for r in mine), mean_sd(r["nll"] for r in mine)
        cells = []
        for b in others:
            a, n = paired(rs, arm, b, "accuracy"), paired(rs, arm, b, "nll")
            cells.append("-" if a is None else f"{100 * a[0]:+.1f} pp ({a[2]} / {a[3]} of {a[4]}), "
                                               f"{n[0]:+.3f} ({n[2]} of {n[4]})")
        shares = [corrupted_share(r) for r in mine]
        out = useful_kept_out(mine, arm)
        lines.append(f"| {regime} ({len(mine)} seeds) | {100 * acc[0]:.1f} ± {100 * acc[1]:.1f} % | "
                     f"{nll[0]:.3f} ± {nll[1]:.3f} | " + " | ".join(cells) +
                     f" | {100 * statistics.mean(p for p, _ in shares):.1f} % → "
                     f"{100 * statistics.mean(k for _, k in shares):.1f} % | "
                     f"{'-' if out is None else f'{100 * out:.1f} %'} |")
    lines += ["", "| regime | arm | seeds | exact match | NLL | corrupted: pool → kept |", "|---|---|---|---|---|---|"]
    for regime in regimes:
        for b in (*ARMS_TABLE, arm):
            rs = [r for r in rows if r["regime"] == regime and r["arm"] == b]
            if not rs or (b == arm and b in ARMS_TABLE):
                continue
            acc, nll = mean_sd(r["accuracy"] for r in rs), mean_sd(r["nll"] for r in rs)
            shares = [corrupted_share(r) for r in rs]
            lines.append(f"| {regime} | {b} | {len(rs)} | {100 * acc[0]:.1f} ± {100 * acc[1]:.1f} % | "
                         f"{nll[0]:.3f} ± {nll[1]:.3f} | {100 * statistics.mean(p for p, _ in shares):.1f} % → "
                         f"{100 * statistics.mean(k for _, k in shares):.1f} % |")
    lines += ["", (f"Issue 36's target, against random pruning at the same compute ({BASELINE}): **no harm**: the "
              "mean difference not worse and at least 3 of 5 paired seeds not worse (60 % of the seeds; a tie is "
              "not worse), on the NLL of the whole solution on GSM8K (`gsm8k-*`), on exact match and NLL elsewhere; "
              f"**helps**, asked where at least {100 * NOISY:.0f} % of the pools is corrupted: better on at least 4 "
              "of 5 seeds (80 %) and on the mean on one metric, with no harm on the other. With fewer than 5 "
              "seeds a verdict is open until the seeds still to run could no longer settle it."), "",
              *target(rows, arm, regimes)]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="<out>.runs.jsonl files of benchmarks/quality.py or gsm8k.py")
    p.add_argument("--arm", default="qtuning-auto-25x50", choices=list({**ARMS, **GSM8K_ARMS}))
    p.add_argument("--precision", choices=["fp32", "bf16 autocast"], help="only runs at this precision")
    p.add_argument("--regimes", nargs="+", help="these regimes, in this order (default: every regime the arm ran)")
    p.add_argument("--out", help="write the tables to this .md (default: print them)")
    p.add_argument("--metrics", nargs=2, metavar=("ACCURACY", "NLL"), default=["accuracy", "nll"],
                   help="the run keys reported as exact match (higher is better) and NLL (lower is better); "
                        "benchmarks/gsm8k.py's runs also have answer_accuracy and answer_nll")
    args = p.parse_args(argv)
    rows = []
    for path in args.runs:
        with open(path, encoding="utf-8") as f:
            rows += [r for r in map(json.loads, filter(str.strip, f))
                     if not args.precision or r.get("precision", args.precision) == args.precision]
    missing = sorted({k for r in rows for k in args.metrics if k not in r})
    if missing:
        p.error(f"--metrics: the runs have no {', '.join(missing)}")
    rows = [{**r, "accuracy": r[args.metrics[0]], "nll": r[args.metrics[1]]} for r in rows]
    ran = {r["regime"] for r in rows if r["arm"] == args.arm}
    if not ran or not set(args.regimes or ()) <= ran:
        p.error(f"no run of arm {args.arm!r} in {sorted(set(args.regimes or ()) - ran) or 'any regime'} of {args.runs}"
                + (f" at {args.precision}" if args.precision else ""))
    command = " ".join(["python", "benchmarks/preset_table.py", *args.runs, "--arm", args.arm,
                        *(["--precision", repr(args.precision) if " " in args.precision else args.precision]
                          if args.precision else []), *(["--regimes", *args.regimes] if args.regimes else []),
                        *(["--metrics", *args.metrics] if args.metrics != ["accuracy", "nll"] else []),
                        *(["--out", args.out] if args.out else [])])
    legend = ("Paired by seed: the mean difference, and the seeds won (higher exact match, lower NLL) / tied of "
              "those both arms ran. Corrupted = wrong + swapped + garbled, mean over seeds of its share of the pools "
              "and of what the arm kept. Useful kept out: the share of the useful samples its rules kept out, "
              "replayed on its logged pools.")
    if args.metrics != ["accuracy", "nll"]:
        legend += f" Exact match: the runs' {args.metrics[0]}; NLL: their {args.metrics[1]}."
    text = "\n".join([f"`{command}`", "", legend, "", *table(rows, args.arm, args.regimes)]) + "\n"
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
