#!/usr/bin/env python
"""Can memory across steps estimate the share of wrong labels? Replayed on logged pools, no training.

Issue 29's first step: before a rule trains on an estimate of the noise rate, check the estimate on
the pools the quality runs logged. The random-pruning arms (``random-25x50``) log each pool's
samples (kind, PPL, entropy) along a training trajectory no selection shaped. For every run, after
each step, each estimator below sees every sample scored so far in that run (a window over steps,
as loss truncation's ring buffer) and estimates the corrupted share (wrong + swapped + garbled);
the truth is the corrupted share of the same window. Reported per regime, over the runs' seeds: the
estimate against the truth at the end of the first epoch and at the last step; and per kind of
sample, the share the ``drop_surprising`` verdict keeps out (on useful samples, its cost).

Estimators (x = log PPL, a sample's mean answer NLL, over the window):

- ``gmm-bic``: a two-component Gaussian mixture on x (EM); the upper component's weight, when the
  mixture beats one Gaussian by more than ``--bic-margin`` in BIC (the model-selection guard that
  should leave clean data alone), else 0.
- ``mad-k``: the share of the window above median(x) + k * 1.4826 * MAD(x) (the outlier rule of
  ``drop_ppl_outliers``, over the window instead of one pool), k = 2, 3.
- ``recent-gmm``: ``gmm-bic`` over the last 64 samples only (one epoch of these runs: the model
  as it is now, not as it was).
- ``memory-gmm``: per-sample memory (a content key, as the guard's cache): for each sample seen
  before, its x now minus its x at first sight (a wrong label's loss falls less); ``gmm-bic`` on
  those differences, over the samples seen at least twice (0 before any is).
- ``surprise-m``: the share of the window whose log PPL exceeds its entropy by more than m nats
  per token (the ``drop_surprising`` rule's verdict, which needs no fit: for labels drawn from the
  model, log PPL - Ent is 0 on average), m = 0.5, 1.

A second table gives, per kind of sample, the share each ``drop_surprising`` margin keeps out over
the whole run: on useful samples that is what the rule costs. A third asks whether memory sharpens
the surprise (log PPL - Ent): per epoch, the AUROC of wrong (or swapped) against useful samples
for the sightings of that epoch alone and for each sample's mean over its sightings so far, read
from the runs of ``--memory-arm`` (the arm whose pools logged sample ids in every noisy regime; its
selection shaped its trajectory). A fourth, from the same runs, gives each kind's largest
per-token surprise (NLL - H of its most surprising answer token): how far a wrong number stands out
from the model's own confident mistakes on correct answers.

    python benchmarks/estimate_noise.py benchmarks/results/quality-3ep.runs.jsonl --precision fp32
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from separation import auroc

CORRUPTED = ("wrong", "swapped", "garbled")
WHOLLY = ("swapped", "garbled")  # answers that are not this prompt's at all
MARGINS = (0.5, 1.0)


def gmm_share(x: torch.Tensor, bic_margin: float, iters: int = 200) -> float:
    """Weight of the upper component of a 2-Gaussian fit of ``x`` when it beats one Gaussian by
    more than ``bic_margin`` in BIC, else 0."""
    n = x.numel()
    if n < 8:
        return 0.0
    mu1, var1 = x.mean(), x.var(unbiased=False).clamp(min=1e-6)
    ll1 = float(torch.distributions.Normal(mu1, var1.sqrt()).log_prob(x).sum())
    q = torch.quantile(x, torch.tensor([0.25, 0.9], dtype=x.dtype))
    mu, var, w = q.clone(), torch.stack([var1, var1]) / 4, torch.tensor([0.8, 0.2], dtype=x.dtype)
    previous = -math.inf
    for _ in range(iters):
        logp = torch.distributions.Normal(mu, var.sqrt()).log_prob(x[:, None]) + w.log()
        ll = float(torch.logsumexp(logp, 1).sum())
        if ll - previous < 1e-7:  # converged
            break
        previous = ll
        r = torch.softmax(logp, dim=1)
        nk = r.sum(0).clamp(min=1e-9)
        w, mu = nk / n, (r * x[:, None]).sum(0) / nk
        var = ((r * (x[:, None] - mu) ** 2).sum(0) / nk).clamp(min=1e-6)
    ll2 = float(torch.logsumexp(torch.distributions.Normal(mu, var.sqrt()).log_prob(x[:, None]) + w.log(), 1).sum())
    bic1, bic2 = -2 * ll1 + 2 * math.log(n), -2 * ll2 + 5 * math.log(n)
    if bic1 - bic2 <= bic_margin:
        return 0.0
    return float(w[int(mu.argmax())])


def mad_share(x: torch.Tensor, k: float) -> float:
    med = x.median()
    spread = 1.4826 * (x - med).abs().median()
    return float((x > med + k * spread).double().mean())


def runs_of(files, arm: str, precision: str | None):
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                run = json.loads(line)
                if run["arm"] == arm and (precision is None or run.get("precision", precision) == precision):
                    yield run


def replay(run, bic_margin: float) -> list[dict]:
    """Per step: the truth and every estimator's estimate over the window so far. The memory
    estimator follows a sample by its logged id (runs that logged none leave it at 0)."""
    xs, excess, kinds, first, out = [], [], [], {}, []
    diffs: dict = {}
    for pool in run.get("decisions") or []:
        ids = pool.get("ids") or [None] * len(pool["ppl"])
        for p, e, kind, key in zip(pool["ppl"], pool["entropy"], pool["kind"], ids):
            if p is None or e is None or not math.isfinite(p) or p <= 0:
                continue
            x = math.log(p)
            xs.append(x)
            excess.append(x - e)
            kinds.append(kind)
            if key is not None:
                if key in first:
                    diffs[key] = (x - first[key], kind)
                else:
                    first[key] = x
        window = torch.tensor(xs, dtype=torch.float64)
        seen_twice = [d for d, _ in diffs.values()]
        step = {"truth": sum(k in CORRUPTED for k in kinds) / max(1, len(kinds)),
                "wholly": sum(k in WHOLLY for k in kinds) / max(1, len(kinds)),
                "gmm-bic": gmm_share(window, bic_margin), "mad-2": mad_share(window, 2.0),
                "mad-3": mad_share(window, 3.0), "recent-gmm": gmm_share(window[-64:], bic_margin),
                "memory-gmm": gmm_share(torch.tensor(seen_twice, dtype=torch.float64), bic_margin)
                if seen_twice else 0.0, "n": len(kinds)}
        for m in MARGINS:
            step[f"surprise-{m:g}"] = sum(d > m for d in excess) / max(1, len(excess))
        out.append(step)
    return out


def kept_out_by_kind(run) -> dict[str, list[int]]:
    """Per kind: [samples scored over the run, kept out at each of MARGINS] (drop_surprising's verdict)."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0] * (1 + len(MARGINS)))
    for pool in run.get("decisions") or []:
        for p, e, kind in zip(pool["ppl"], pool["entropy"], pool["kind"]):
            if p is None or e is None or not math.isfinite(p) or p <= 0:
                continue
            counts[kind][0] += 1
            for i, m in enumerate(MARGINS):
                counts[kind][1 + i] += math.log(p) - e > m
    return counts


def memory_separation(run) -> dict[str, list[tuple[float, float]]]:
    """Per corrupted kind: per epoch, (AUROC against useful samples of the surprise log PPL - Ent of
    that epoch's sightings, of each sample's mean surprise over its sightings up to that epoch)."""
    pools = run.get("decisions") or []
    epochs = run.get("epochs", 1)
    sightings = []  # (epoch, id, kind, surprise)
    for i, pool in enumerate(pools):
        for p, e, kind, key in zip(pool["ppl"], pool["entropy"], pool["kind"], pool.get("ids") or []):
            if p is not None and e is not None and math.isfinite(p) and p > 0:
                sightings.append((1 + i * epochs // len(pools), key, kind, math.log(p) - e))
    out = {}
    for bad in ("wrong", "swapped"):
        if not any(k == bad for _, _, k, _ in sightings):
            continue
        rows = []
        for epoch in range(1, epochs + 1):
            now = [(k, x) for ep, _, k, x in sightings if ep == epoch]
            memory = defaultdict(list)
            for ep, key, kind, x in sightings:
                if ep <= epoch:
                    memory[key, kind].append(x)
            mean = [(k, statistics.mean(v)) for (_, k), v in memory.items()]
            rows.append(tuple(auroc([x for k, x in xs if k == bad], [x for k, x in xs if k == "useful"])
                              for xs in (now, mean)))
        out[bad] = rows
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--arm", default="random-25x50")
    p.add_argument("--precision", default=None)
    p.add_argument("--bic-margin", type=float, default=10.0)
    p.add_argument("--memory-arm", default="qtuning-auto-25x50", help="whose pools (with sample ids) the third table reads")
    args = p.parse_args(argv)
    by_regime, kinds_by_regime = defaultdict(list), defaultdict(lambda: defaultdict(lambda: [0] * (1 + len(MARGINS))))
    for run in runs_of(args.files, args.arm, args.precision):
        steps = replay(run, args.bic_margin)
        if steps:
            first_epoch = steps[max(0, len(steps) // run.get("epochs", 1) - 1)]
            by_regime[run["regime"]].append((first_epoch, steps[-1]))
            for kind, c in kept_out_by_kind(run).items():
                kinds_by_regime[run["regime"]][kind] = [a + b for a, b in zip(kinds_by_regime[run["regime"]][kind], c)]
    names = ("gmm-bic", "mad-2", "mad-3", "recent-gmm", "memory-gmm", *(f"surprise-{m:g}" for m in MARGINS))
    print(f"estimated corrupted share (percent), arm {args.arm}, mean (sd) over seeds; window = every sample "
          f"scored so far in the run; BIC margin {args.bic_margin:g}; truth: wrong + swapped + garbled, of which "
          "wholly wrong: swapped + garbled")
    print("| regime | seeds | when | samples | truth | wholly wrong | " + " | ".join(names) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(names))
    for regime in sorted(by_regime):
        runs = by_regime[regime]
        for label, i in (("end of epoch 1", 0), ("last step", 1)):
            cells = []
            for name in ("truth", "wholly", *names):
                v = [100 * r[i][name] for r in runs]
                sd = statistics.stdev(v) if len(v) > 1 else 0.0
                cells.append(f"{statistics.mean(v):.1f} ({sd:.1f})")
            print(f"| {regime} | {len(runs)} | {label} | {runs[0][i]['n']} | " + " | ".join(cells) + " |")
    print()
    print("share of each kind that drop_surprising keeps out (percent of the kind's scored samples, every step of "
          "every seed; in brackets, how many were scored)")
    kinds = ("useful", "redundant", "wrong", "swapped", "garbled")
    for m_i, m in enumerate(MARGINS):
        print()
        print(f"margin {m:g} nats per token")
        print("| regime | " + " | ".join(kinds) + " |")
        print("|---|" + "---|" * len(kinds))
        for regime in sorted(kinds_by_regime):
            c = kinds_by_regime[regime]
            cells = [f"{100 * c[k][1 + m_i] / c[k][0]:.1f} ({c[k][0]})" if c[k][0] else "-" for k in kinds]
            print(f"| {regime} | " + " | ".join(cells) + " |")
    memory = defaultdict(lambda: defaultdict(list))  # regime -> kind -> per run [(now, mean) per epoch]
    for run in runs_of(args.files, args.memory_arm, args.precision):
        for kind, rows in memory_separation(run).items():
            memory[run["regime"]][kind].append(rows)
    if memory:
        print()
        print(f"AUROC against useful samples of log PPL - Ent, arm {args.memory_arm}, mean over seeds: the sightings "
              "of each epoch alone / each sample's mean over its sightings so far (0.5: no separation, 1: perfect)")
        n_epochs = max(len(rows) for kinds in memory.values() for runs in kinds.values() for rows in runs)
        print("| regime | kind | seeds | " + " | ".join(f"epoch {e + 1}" for e in range(n_epochs)) + " |")
        print("|---|---|---|" + "---|" * n_epochs)
        for regime in sorted(memory):
            for kind, runs in memory[regime].items():
                cells = [f"{statistics.mean(r[e][0] for r in runs):.2f} / {statistics.mean(r[e][1] for r in runs):.2f}"
                         if all(len(r) > e for r in runs) else "-" for e in range(n_epochs)]
                print(f"| {regime} | {kind} | {len(runs)} | " + " | ".join(cells) + " |")
    peaks = defaultdict(lambda: defaultdict(list))  # regime -> kind -> surprise_max of every scored sample
    per_pool = defaultdict(list)  # regime -> per pool: useful samples with a token above 4 nats of surprise
    for run in runs_of(args.files, args.memory_arm, args.precision):
        for pool in run.get("decisions") or []:
            if "surprise_max" not in pool:
                continue
            for kind, v in zip(pool["kind"], pool["surprise_max"]):
                if v is not None and math.isfinite(v):
                    peaks[run["regime"]][kind].append(v)
            per_pool[run["regime"]].append(sum(k == "useful" and v > 4.0 for k, v in zip(pool["kind"], pool["surprise_max"])))
    if peaks:
        print()
        print(f"largest per-token surprise NLL - H of a sample (nats), arm {args.memory_arm}, every pool of every seed: "
              "10th / 50th / 90th percentile per kind; and per pool, how many useful samples hold a token above 4 nats "
              "(mean, min-max)")
        print("| regime | " + " | ".join(kinds) + " | useful above 4 nats per pool |")
        print("|---|" + "---|" * (len(kinds) + 1))
        for regime in sorted(peaks):
            cells = []
            for k in kinds:
                v = sorted(peaks[regime][k])
                cells.append(" / ".join(f"{v[min(len(v) - 1, int(q * len(v)))]:.1f}".replace("-0.0", "0.0")
                                        for q in (0.1, 0.5, 0.9)) if v else "-")
            n = per_pool[regime]
            print(f"| {regime} | " + " | ".join(cells) + f" | {statistics.mean(n):.1f} ({min(n)}-{max(n)}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
