#!/usr/bin/env python
"""What each arm's selection keeps, by kind of sample, replayed on the pools one arm's runs logged.

No training: seconds. For every logged pool (``decisions`` of the runs of ``--logged-by``, random
pruning by default) each arm decides as it would in a step: its rules keep samples out
(``preset_table.kept_out``), then the paper's triage (``qtuning`` arms, ``core.triage``) or a
screened candidate's selection (``quality.choose``) keeps K of the rest; a random choice counts as
its expectation (K / the samples it chooses from, each). The table gives, per kind, the share of
the pool's samples of that kind kept, and the corrupted share of what was kept.

A screen, not a measurement. The pools are those the logging arm's model saw, not the ones the
arm's own training would have produced; and keeping fewer corrupted samples is not training a
better model: docs/results.md (issue 36) has a candidate that kept almost none and still lost.

    python benchmarks/replay_kinds.py benchmarks/results/gsm8k.runs.jsonl --regimes gsm8k-20-1ep \\
        --arms random-25x100 qtuning-25x50 qtuning-auto-25x50 surprise-entropy-25x100
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preset_table import CANDIDATE_OPTIONS, arm_rules, arm_spec, kept_out
from quality import CORRUPTED, KINDS, choose

from qtuning_plugin.core import kept_count, scored_mask, triage
from qtuning_plugin.core.rules import Pool


def kept(arm: str, ppl: torch.Tensor, entropy: torch.Tensor, rules) -> torch.Tensor:
    """float [n]: how much of each sample of one pool ``arm`` keeps (0 or 1; a random choice its
    expectation)."""
    spec = arm_spec(arm)
    scored = scored_mask(ppl, entropy)
    if spec is None or spec[0] == "full":
        return scored.double()
    k = kept_count(int(scored.sum()), spec[1])
    eligible = scored & ~kept_out(rules, Pool(ppl, entropy)) if rules else scored
    options = {o: spec[3][o] for o in CANDIDATE_OPTIONS if o in spec[3]} if spec[0] == "candidate" else {}
    if spec[0] in ("random", "filtered", "swap") or options == {"select": "random"}:
        return eligible.double() * min(k, int(eligible.sum())) / max(1, int(eligible.sum()))
    if options:
        if options["select"] == "random":
            raise SystemExit(f"{arm}: a random choice within a subset is not replayed")
        return choose(ppl, entropy, eligible, k, **options).double()
    return triage(ppl, entropy, spec[1], eligible=eligible).keep.double()


def replay(rows, regime: str, arms, logged_by: str) -> list[str]:
    runs = [r for r in rows if r["regime"] == regime and r["arm"] == logged_by and r.get("decisions")]
    if not runs:
        return []
    pool, out = Counter(), {arm: Counter() for arm in arms}
    rules = {arm: arm_rules(arm) for arm in arms}
    for run in runs:
        for step in run["decisions"]:
            ppl = torch.tensor(step["ppl"], dtype=torch.float64)
            entropy = torch.tensor(step["entropy"], dtype=torch.float64)
            pool.update(step["kind"])
            for arm in arms:
                for kind, x in zip(step["kind"], kept(arm, ppl, entropy, rules[arm]).tolist()):
                    out[arm][kind] += x
    kinds = [k for k in KINDS if pool[k]]
    lines = [f"### `{regime}`: the pools of {len(runs)} run(s) of {logged_by}", "",
             "| arm | " + " | ".join(f"{k} ({pool[k]})" for k in kinds) + " | corrupted: pool → kept |",
             "|---" * (len(kinds) + 2) + "|"]
    share = sum(pool[k] for k in CORRUPTED) / sum(pool.values())
    for arm in arms:
        total = sum(out[arm].values())
        bad = sum(out[arm][k] for k in CORRUPTED) / total if total else float("nan")
        lines.append(f"| {arm} | " + " | ".join(f"{100 * out[arm][k] / pool[k]:.1f} %" for k in kinds) +
                     f" | {100 * share:.1f} % → {100 * bad:.1f} % |")
    return [*lines, ""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="<out>.runs.jsonl files of benchmarks/quality.py or gsm8k.py")
    p.add_argument("--regimes", nargs="+", help="these regimes (default: every regime the logging arm ran)")
    p.add_argument("--arms", nargs="+", required=True, help="arms of quality.py or gsm8k.py to replay")
    p.add_argument("--logged-by", default="random-25x100", help="whose logged pools to replay on")
    p.add_argument("--out", help="write the tables to this .md (default: print them)")
    args = p.parse_args(argv)
    for arm in args.arms:
        try:
            arm_spec(arm)
        except KeyError:
            p.error(f"--arms: unknown arm {arm!r}")
    rows = []
    for path in args.runs:
        with open(path, encoding="utf-8") as f:
            rows += [json.loads(line) for line in f if line.strip()]
    regimes = args.regimes or list(dict.fromkeys(r["regime"] for r in rows if r["arm"] == args.logged_by))
    if not regimes:
        p.error(f"--logged-by: no run of {args.logged_by!r} in {args.runs}")
    lines = []
    for regime in regimes:
        got = replay(rows, regime, args.arms, args.logged_by)
        if not got:
            p.error(f"no logged pools of {args.logged_by!r} in regime {regime!r} of {args.runs}")
        lines += got
    command = " ".join(["python", "benchmarks/replay_kinds.py", *args.runs, "--regimes", *regimes, "--arms",
                        *args.arms, *(["--logged-by", args.logged_by] if args.logged_by != "random-25x100" else []),
                        *(["--out", args.out] if args.out else [])])
    legend = ("Share of the pools' samples of each kind that each arm keeps, replayed on logged pools (a random "
              "choice: its expectation); corrupted = wrong + swapped + garbled, share of the pools → of what the arm "
              "keeps. A screen: the pools are the logging arm's, and fewer corrupted samples kept is not a better "
              "model.")
    text = "\n".join([f"`{command}`", "", legend, "", *lines])
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
