#!/usr/bin/env python
"""Can memory across steps estimate the share of wrong labels? Replayed on logged pools, no training.

Issue 29's first step: before a rule trains on an estimate of the noise rate, check the estimate on
the pools the quality runs logged. The random-pruning arms (``random-25x50``) log each pool's
samples (kind, PPL, entropy) along a training trajectory no selection shaped. For every run, after
each step, each estimator below sees every sample scored so far in that run (a window over steps,
as loss truncation's ring buffer) and estimates the corrupted share (wrong + garbled); the truth is
the corrupted share of the same window. Reported per regime, over the runs' seeds: the estimate
against the truth at the end of the first epoch and at the last step, and on the clean regime, the
share of useful samples an exclusion at the estimate would keep out.

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

    python benchmarks/estimate_noise.py benchmarks/results/quality-3ep.runs.jsonl --precision fp32
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict

import torch

CORRUPTED = ("wrong", "garbled")


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
    """Per step: the truth and every estimator's estimate over the window so far. Samples are
    told apart by (kind, PPL at first sight) order of appearance: the logs hold no sample ids, so
    the memory estimator keys a sample by its position in the epoch's order (the runs' sampler
    reshuffles each epoch, so this key is approximate: see the report)."""
    xs, kinds, first, out = [], [], {}, []
    diffs: dict = {}
    for pool in run.get("decisions") or []:
        for j, (p, kind) in enumerate(zip(pool["ppl"], pool["kind"])):
            if p is None or not math.isfinite(p) or p <= 0:
                continue
            x = math.log(p)
            xs.append(x)
            kinds.append(kind)
            key = pool.get("ids", [None] * len(pool["ppl"]))[j]
            if key is not None:
                if key in first:
                    diffs[key] = (x - first[key], kind)
                else:
                    first[key] = x
        window = torch.tensor(xs, dtype=torch.float64)
        truth = sum(k in CORRUPTED for k in kinds) / max(1, len(kinds))
        seen_twice = [d for d, _ in diffs.values()]
        out.append({"truth": truth, "gmm-bic": gmm_share(window, bic_margin), "mad-2": mad_share(window, 2.0),
                    "mad-3": mad_share(window, 3.0), "recent-gmm": gmm_share(window[-64:], bic_margin),
                    "memory-gmm": gmm_share(torch.tensor(seen_twice, dtype=torch.float64), bic_margin)
                    if seen_twice else 0.0, "n": len(kinds)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--arm", default="random-25x50")
    p.add_argument("--precision", default=None)
    p.add_argument("--bic-margin", type=float, default=10.0)
    args = p.parse_args(argv)
    by_regime = defaultdict(list)
    for run in runs_of(args.files, args.arm, args.precision):
        steps = replay(run, args.bic_margin)
        if steps:
            first_epoch = steps[max(0, len(steps) // run.get("epochs", 1) - 1)]
            by_regime[run["regime"]].append((first_epoch, steps[-1]))
    names = ("gmm-bic", "mad-2", "mad-3", "recent-gmm", "memory-gmm")
    print(f"estimated corrupted share (percent), arm {args.arm}, mean (sd) over seeds; window = every sample "
          f"scored so far in the run; BIC margin {args.bic_margin:g}")
    print("| regime | seeds | when | samples | truth | " + " | ".join(names) + " |")
    print("|---|---|---|---|---|" + "---|" * len(names))
    for regime in sorted(by_regime):
        runs = by_regime[regime]
        for label, i in (("end of epoch 1", 0), ("last step", 1)):
            cells = []
            for name in ("truth", *names):
                v = [100 * r[i][name] for r in runs]
                sd = statistics.stdev(v) if len(v) > 1 else 0.0
                cells.append(f"{statistics.mean(v):.1f} ({sd:.1f})")
            print(f"| {regime} | {len(runs)} | {label} | {runs[0][i]['n']} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
