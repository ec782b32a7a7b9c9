"""The rules beyond the paper (qtuning_plugin/core/rules): how they are found and configured, and the
two small-loss rules worked by hand and against literal references. A rule's ``exclude`` marks the
samples kept out of the triage; ``triage(..., eligible=~mask)`` then decides on the others, K still
counting them. (The reference guard: tests/test_reference.py.)"""

import dataclasses
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qtuning_plugin.core import QTuningConfig, Scores, kept_count, triage
from qtuning_plugin.core.config import OPTIONS
from qtuning_plugin.core.rules import Pool, Rule, build_rules, rule_classes
from qtuning_plugin.core.rules.outliers import DropPPLOutliers
from qtuning_plugin.core.rules.reference import ReferenceGuard
from qtuning_plugin.core.rules.small_loss import DropHighestPPL
from qtuning_plugin.core.rules.surprise import DropSurprising
from qtuning_plugin.core.step import decide_step

INF, NAN = math.inf, math.nan


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def idx(mask):
    return mask.nonzero().squeeze(1).tolist()


def drop_highest(ppl, ent, f):
    return DropHighestPPL(QTuningConfig(drop_highest_ppl=f)).exclude(Pool(ppl, ent))


def drop_outliers(ppl, ent, k):
    return DropPPLOutliers(QTuningConfig(drop_ppl_outliers=k)).exclude(Pool(ppl, ent))


# ---------------------------------------------------------------- finding and configuring the rules

def test_rule_classes_finds_the_four_rules_in_their_order():
    assert rule_classes() == [DropHighestPPL, DropPPLOutliers, DropSurprising, ReferenceGuard]
    assert [c.position for c in rule_classes()] == sorted(c.position for c in rule_classes())


def test_each_rules_options_are_config_fields():
    fields = {f.name: f for f in dataclasses.fields(QTuningConfig)}
    seen = []
    for rule in rule_classes():
        assert issubclass(rule, Rule) and rule.options
        assert rule.name and rule.metric and rule.log_field
        for option in rule.options:
            assert option.group == "rules"
            assert option in OPTIONS
            assert fields[option.name].default == option.default
            assert fields[option.name].metadata["option"] is option
            seen.append(option.name)
        # a config with the rule's defaults leaves it off
        assert not rule.is_active(QTuningConfig())
    # the rules' options, in the rules' order, are exactly the config's rule fields
    assert seen == [o.name for o in OPTIONS if o.group == "rules"]


@pytest.mark.parametrize("fields, active", [
    ({}, []),
    ({"drop_highest_ppl": 0.25}, [DropHighestPPL]),
    ({"drop_ppl_outliers": 2.0}, [DropPPLOutliers]),
    ({"reference": "base"}, [ReferenceGuard]),
    ({"reference_margin": 3.0}, []),  # the guard's margin alone does not turn it on
    ({"drop_highest_ppl": 0.1, "reference": "base"}, [DropHighestPPL, ReferenceGuard]),
    ({"drop_ppl_outliers": 1.0, "reference": "base"}, [DropPPLOutliers, ReferenceGuard]),
    ({"drop_surprising": 0.5}, [DropSurprising]),
    ({"drop_surprising": 0.0, "drop_highest_ppl": 0.1}, [DropHighestPPL, DropSurprising]),
])
def test_build_rules_makes_the_active_ones_fresh(fields, active):
    config = QTuningConfig(**fields)
    rules = build_rules(config)
    assert [type(r) for r in rules] == active
    assert all(r.config is config for r in rules)
    again = build_rules(config)
    assert all(a is not b for a, b in zip(rules, again))  # a fresh instance each (a rule may keep state)


def test_pool_scored_and_subset():
    pool = Pool(t(1.0, NAN, 3.0, 4.0), t(0.1, 0.2, NAN, 0.4), {"f": t(1, 2, 3, 4)})
    assert pool.scored.tolist() == [True, False, False, True]
    sub = pool.subset(slice(1, 3))
    assert sub.ppl.numel() == 2 and sub.features["f"].tolist() == [2.0, 3.0]


def _pool_for(rule_cls, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ppl = torch.rand(n, generator=g, dtype=torch.float64) * 5 + 1
    ppl[-1] = 50.0  # an outlier for each small-loss rule
    ent = torch.rand(n, generator=g, dtype=torch.float64)
    features = {}
    if rule_cls is ReferenceGuard:
        mean = torch.full((n,), -0.5, dtype=torch.float64)  # the pool fell below its base
        largest = torch.rand(n, generator=g, dtype=torch.float64)
        largest[-1] = 5.0
        features = {"rise_max": largest, "rise_mean": mean}
    return Pool(ppl, ent, features)


CONFIGS = {DropHighestPPL: {"drop_highest_ppl": 0.25}, DropPPLOutliers: {"drop_ppl_outliers": 2.0},
           DropSurprising: {"drop_surprising": 1.0}, ReferenceGuard: {"reference": "base"}}


@pytest.mark.parametrize("rule_cls", rule_classes(), ids=lambda c: c.__name__)
def test_each_rules_exclude_runs_on_the_host(rule_cls):
    """Host statistics in (float64 on the CPU), a bool mask over the pool out, on the CPU: no
    device copy, no sync."""
    rule = rule_cls(QTuningConfig(**CONFIGS[rule_cls]))
    pool = _pool_for(rule_cls)
    out = rule.exclude(pool)
    assert out.device.type == "cpu" and out.dtype == torch.bool and out.shape == pool.ppl.shape
    assert bool(out[-1]) and not out.all()  # the planted outlier goes, not everyone
    # a sample without a score is never flagged
    pool.ppl[0] = NAN
    if rule_cls is ReferenceGuard:
        pool.features["rise_max"][0] = NAN
        pool.features["rise_mean"][0] = NAN
    assert not rule.exclude(pool)[0]


class _Spy(Rule):
    """Wraps a rule and records the devices of what its exclude sees and returns."""

    def __init__(self, inner):
        super().__init__(inner.config)
        self.inner, self.seen = inner, []
        self.log_field, self.metric, self.local, self.name = inner.log_field, inner.metric, inner.local, inner.name

    def features(self, scores, inputs):
        return self.inner.features(scores, inputs)

    def exclude(self, pool):
        out = self.inner.exclude(pool)
        self.seen.append({pool.ppl.device.type, pool.entropy.device.type, out.device.type,
                          *(f.device.type for f in pool.features.values())})
        return out


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]  # (on a GPU machine, CUDA too)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule_cls", rule_classes(), ids=lambda c: c.__name__)
@pytest.mark.parametrize("pool", ["step", "micro_batch"])
def test_decide_step_runs_the_rules_on_the_host(device, rule_cls, pool):
    """Scores on the device: the rules see host tensors and their flags stay on the host; the
    decision's keep is on the host, its token masks on the scores' device."""
    g = torch.Generator().manual_seed(1)
    scores, refs = [], []
    for i in range(2):
        trainable = torch.zeros(6, 8, dtype=torch.bool)
        trainable[:, 2:] = True
        nll = torch.rand(6, 8, generator=g) * 3
        if i == 1:
            nll[5] += 10.0  # the last sample's PPL is an outlier
        nll = nll.masked_fill(~trainable, 0.0)
        mean = nll.double().sum(1) / trainable.sum(1)
        ent = torch.rand(6, generator=g, dtype=torch.float64)
        scores.append(Scores(ppl=mean.exp().to(device), entropy=ent.to(device), nll=nll.to(device),
                             token_entropy=torch.zeros(6, 8, device=device), trainable=trainable.to(device),
                             input_tokens=torch.full((6,), 8, device=device)))
        refs.append((nll + 1.0).to(device))
    refs[1][5, 4] -= 6.0  # one token rose: a suspect once the pool fell
    config = QTuningConfig(sample_ratio=0.5, pool=pool, **CONFIGS[rule_cls])
    spy = _Spy(rule_cls(config))
    d = decide_step(scores, config, refs if rule_cls is ReferenceGuard else None, rules=[spy])
    assert spy.seen and all(s == {"cpu"} for s in spy.seen)
    assert len(spy.seen) == (2 if pool == "micro_batch" else 1)  # once per pool
    flags = d.flags[rule_cls.log_field]
    assert flags.device.type == "cpu" and flags.dtype == torch.bool and flags.shape == (12,)
    assert flags.any()
    assert all(k.device.type == "cpu" for k in d.keep + d.prune)
    assert all(tk.device.type == device for tk in d.token_keep)
    assert d.host.ppl.device.type == "cpu"
    assert isinstance(d.kept_tokens, int) and d.kept_tokens == sum(int(tk.sum()) for tk in d.token_keep)
    assert not (torch.cat(d.keep) & flags).any()


def test_decide_step_flags_are_each_pools_exclude():
    """Under ``pool: micro_batch`` a rule judges each micro-batch alone; under ``step`` the whole step."""
    ppl = [t(1.0, 2.0, 3.0, 9.0), t(20.0, 30.0, 40.0, 50.0)]
    ent = t(0.1, 0.2, 0.3, 0.4)
    scores = []
    for p in ppl:
        trainable = torch.ones(4, 3, dtype=torch.bool)
        trainable[:, 0] = False
        scores.append(Scores(ppl=p, entropy=ent, nll=torch.rand(4, 3), token_entropy=torch.zeros(4, 3),
                             trainable=trainable, input_tokens=torch.full((4,), 3)))
    for pool, want in (("step", [6, 7]), ("micro_batch", [3, 7])):
        d = decide_step(scores, QTuningConfig(drop_highest_ppl=0.25, pool=pool))
        assert idx(d.excluded) == want and d.suspects is None
        assert not (torch.cat(d.keep) & d.excluded).any()
    assert decide_step(scores, QTuningConfig()).excluded is None


# ---------------------------------------------------------------- drop_highest_ppl: the small-loss rule

def test_drop_highest_worked_by_hand():
    """Eight samples, r_s = 0.25 (K = 2). The paper keeps sample 1 (PPL 9, Ent 0.1: Q2 at m = 1;
    at m = 2 the core {1, 3, 2} exceeds K) and tops up with 2 (|p - e| = |0.125 - 1|). With
    drop_highest = 0.25 the two highest PPL (1: 9, 3: 8) are not candidates; among the other six,
    m = 1 gives Q2 = {5} ∩ {4} = {} and Q4 = {0} ∩ {2} = {}, m = 2 gives Q2 = {5, 7} ∩ {4, 6} = {}
    and Q4 = {0, 2} ∩ {2, 5} = {2}; m = 3 gives Q2 = {5, 7, 6} ∩ {4, 6, 0} = {6} and
    Q4 = {0, 2, 4} ∩ {2, 5, 7} = {2}: the core is {2, 6}, exactly K."""
    ppl = t(1, 9, 2, 8, 3, 7, 4, 6)
    ent = t(0.5, 0.1, 0.9, 0.2, 0.3, 0.8, 0.4, 0.6)
    assert idx(triage(ppl, ent, 0.25).keep) == [1, 2]
    mask = drop_highest(ppl, ent, 0.25)
    assert idx(mask) == [1, 3]
    result = triage(ppl, ent, 0.25, eligible=~mask)
    assert idx(result.keep) == [2, 6] and idx(result.core) == [2, 6] and idx(result.prune_tokens) == [6]
    # floor(0.2 x 8) = 1: only sample 1 goes, and 3 (PPL 8, Ent 0.2) becomes the Q2 core
    assert idx(triage(ppl, ent, 0.25, eligible=~drop_highest(ppl, ent, 0.2)).keep) == [2, 3]
    # of equal PPL the later sample goes first
    tied, tied_ent = t(5, 5, 1, 2), t(0.1, 0.1, 0.9, 0.5)
    assert idx(drop_highest(tied, tied_ent, 0.25)) == [1]
    assert idx(triage(tied, tied_ent, 0.25, eligible=~drop_highest(tied, tied_ent, 0.25)).keep) == [0]
    # f in [0, 1): 1 would drop every sample
    with pytest.raises(ValueError, match=r"drop_highest_ppl must be .*\[0, 1\)"):
        QTuningConfig(drop_highest_ppl=1.0)


ratios = st.floats(min_value=1e-3, max_value=1.0, allow_nan=False)


@st.composite
def pools(draw, max_n=300):
    n = draw(st.integers(1, max_n))
    hi = draw(st.integers(0, 40))  # small integer range: many ties
    ppl = draw(st.lists(st.integers(0, hi), min_size=n, max_size=n))
    ent = draw(st.lists(st.integers(0, hi), min_size=n, max_size=n))
    return torch.tensor(ppl, dtype=torch.float64), torch.tensor(ent, dtype=torch.float64)


@settings(max_examples=300, deadline=None)
@given(pools(), ratios, st.sampled_from([0.1, 0.25, 0.5, 0.75]))
def test_drop_highest_is_the_triage_of_the_rest_with_k_unchanged(pool, r, f):
    """The floor(f n) highest-PPL samples are never kept; K still counts them (up to the rest);
    the decision over the rest is the eligible-masked triage."""
    ppl, ent = pool
    n = ppl.numel()
    n_drop = math.floor(Fraction(repr(f)) * n)
    dropped = torch.zeros(n, dtype=torch.bool)
    dropped[torch.sort(ppl, stable=True).indices[n - n_drop:]] = True
    mask = drop_highest(ppl, ent, f)
    assert torch.equal(mask, dropped)
    result = triage(ppl, ent, r, eligible=~mask)
    assert not (result.keep & dropped).any()
    assert result.k == min(kept_count(n, r), n - n_drop)


def test_drop_highest_counts_scored_samples_only_and_spans_the_groups():
    ppl, ent = t(NAN, 9, 1, 2, 3, 4, 8, 7, 6), t(0.5, 0.1, 0.9, 0.3, 0.8, 0.2, 0.1, 0.7, 0.6)
    # 8 scored samples: floor(0.25 x 8) = 2 dropped (PPL 9 and 8); the NaN row is not one of them
    mask = drop_highest(ppl, ent, 0.25)
    assert idx(mask) == [1, 6]
    result = triage(ppl, ent, 0.25, eligible=~mask)
    assert not result.keep[[0, 1, 6]].any() and result.k == 2
    # pool: global: the highest PPL of the whole pool go, whichever group holds them
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1])
    by_group = triage(ppl, ent, 0.5, groups=groups, eligible=~mask)
    assert not by_group.keep[[0, 1, 6]].any()
    assert [int(by_group.keep[groups == g].sum()) for g in (0, 1)] == [1, 2]  # K_0 = floor(0.5 x 3)
    # no scored sample: nothing to drop
    assert not drop_highest(t(NAN, NAN), t(1.0, NAN), 0.5).any()


class _TwoRanks:
    """Collectives of rank 0 of two; rank 1's pool statistics are given (ppl, entropy)."""

    world_size, rank = 2, 0

    def __init__(self, other_ppl, other_ent):
        self.other = (other_ppl, other_ent)

    def all_reduce_max(self, values):
        return list(values)

    def all_gather(self, value):
        n = len(self.other[0])
        # rows: ppl, entropy, input tokens, label tokens, (features,) eligible
        other = [list(self.other[0]), list(self.other[1]), [4.0] * n, [3.0] * n]
        other += [[0.0] * n for _ in value[4:-1]] + [[1.0] * n]
        return [value, other]


def test_drop_highest_under_pool_global_judges_every_ranks_pool():
    """``pool: global``: the small-loss rule ranks the whole gathered pool, so a rank whose samples
    are all easy loses none of them, and each rank still keeps its own K."""
    ppl, ent = t(1.0, 2.0, 3.0, 4.0), t(0.4, 0.3, 0.2, 0.1)
    trainable = torch.zeros(4, 4, dtype=torch.bool)
    trainable[:, 1:] = True
    scores = [Scores(ppl=ppl, entropy=ent, nll=torch.rand(4, 4), token_entropy=torch.zeros(4, 4),
                     trainable=trainable, input_tokens=torch.full((4,), 4))]
    config = QTuningConfig(sample_ratio=0.5, drop_highest_ppl=0.25, pool="global")
    # alone (one process, "global" is the step): sample 3 (PPL 4) is this pool's highest
    assert idx(decide_step(scores, config).excluded) == [3]
    # with a rank whose PPL are all higher, rank 1 loses its two highest, rank 0 none
    d = decide_step(scores, config, collectives=_TwoRanks([10.0, 20.0, 30.0, 40.0], [0.1, 0.2, 0.3, 0.4]))
    assert not d.excluded.any()
    assert idx(d.global_pool.eligible) == [0, 1, 2, 3, 4, 5]
    assert int(d.keep[0].sum()) == 2


# ---------------------------------------------------------------- drop_surprising

def drop_surprising(ppl, ent, m):
    return DropSurprising(QTuningConfig(drop_surprising=m)).exclude(Pool(ppl, ent))


def test_drop_surprising_worked_by_hand():
    """log PPL - Ent per sample: 0.2 - 0.5 = -0.3, 1.0 - 0.1 = 0.9, 2.0 - 0.2 = 1.8, 0.7 - 0.1 =
    0.6, 3.0 - 2.9 = 0.1 (high error, but as uncertain: on the diagonal), 0.5 - 0.0 = 0.5 (exactly
    the margin: kept). Margin 0.5: samples 1, 2, 3 go; margin 1: only 2; margin 0: every one above
    the diagonal (1, 2, 3, 4, 5)."""
    ppl = t(0.2, 1.0, 2.0, 0.7, 3.0, 0.5).exp()
    ent = t(0.5, 0.1, 0.2, 0.1, 2.9, 0.0)
    for m, dropped in ((0.5, [1, 2, 3]), (1.0, [2]), (0.0, [1, 2, 3, 4, 5])):
        mask = drop_surprising(ppl, ent, m)
        assert idx(mask) == dropped, m
        result = triage(ppl, ent, 0.5, eligible=~mask)
        assert result.k == min(3, 6 - len(dropped)) and not result.keep[dropped].any()  # K = 3 of six
    # the paper keeps the sample furthest above the diagonal (its highest PPL at low entropy)
    assert 2 in idx(triage(ppl, ent, 0.5).keep)


def test_drop_surprising_is_per_sample_not_per_pool():
    """A sample's verdict is its own: the same sample in any pool, of any size or mix."""
    g = torch.Generator().manual_seed(3)
    ppl = (torch.rand(40, generator=g, dtype=torch.float64) * 3).exp()
    ent = torch.rand(40, generator=g, dtype=torch.float64) * 2
    whole = drop_surprising(ppl, ent, 0.5)
    assert whole.any() and not whole.all()
    for part in (slice(0, 7), slice(7, 40), torch.tensor([39, 0, 12])):
        assert torch.equal(drop_surprising(ppl[part], ent[part], 0.5), whole[part])


def test_drop_surprising_edge_samples():
    """No score (NaN): never flagged; +inf PPL (a label the model gave probability 0): flagged;
    the margin must be a finite number >= 0 or null."""
    ppl, ent = t(NAN, INF, 2.0, 5.0), t(0.1, 0.3, NAN, 0.2)
    assert idx(drop_surprising(ppl, ent, 0.5)) == [1, 3]
    for bad in (-0.1, INF, "0.5", True):
        with pytest.raises(ValueError, match=r"QTuningConfig\.drop_surprising must be null \(off\) or a finite number "
                                             r">= 0, got"):
            QTuningConfig(drop_surprising=bad)
    # beside the small-loss rule: each flags its own, the triage excludes both
    scores = [Scores(ppl=t(1.0, 9.0, 2.0, 3.0, 4.0, 50.0), entropy=t(0.5, 0.1, 0.2, 2.0, 0.3, 3.9),
                     nll=torch.rand(6, 3), token_entropy=torch.zeros(6, 3), trainable=torch.ones(6, 3, dtype=torch.bool),
                     input_tokens=torch.full((6,), 3))]
    d = decide_step(scores, QTuningConfig(sample_ratio=0.5, drop_surprising=0.5, drop_highest_ppl=0.2))
    # log 9 - 0.1 = 2.1 and log 4 - 0.3 = 1.09 go for surprise; PPL 50 is the pool's highest
    assert idx(d.flags["surprising"]) == [1, 4] and idx(d.excluded) == [5]
    assert not (d.keep[0] & (d.flags["surprising"] | d.excluded)).any() and int(d.keep[0].sum()) == 3


def _scores_of(ppl, ent):
    n = ppl.numel()
    return [Scores(ppl=ppl, entropy=ent, nll=torch.rand(n, 3), token_entropy=torch.zeros(n, 3),
                   trainable=torch.ones(n, 3, dtype=torch.bool), input_tokens=torch.full((n,), 3))]


def test_a_pool_the_rules_empty_is_decided_by_the_paper(caplog):
    """Every scored sample kept out (here all far above the diagonal): training the whole pool as
    fetched would undo the pruning and training nothing is no step, so the pool is the paper's
    triage alone, the rules' flags cleared, with a warning. One sample left eligible: the rules
    stand."""
    ppl, ent = t(5.0, 9.0, 7.0, NAN, 20.0, 6.0).exp(), t(0.1, 0.2, 0.3, 0.1, 0.5, 0.4)
    config = QTuningConfig(sample_ratio=0.5, drop_surprising=0.5)
    paper = decide_step(_scores_of(ppl, ent), config.paper())
    with caplog.at_level("WARNING", logger="qtuning_plugin.core.step"):
        d = decide_step(_scores_of(ppl, ent), config)
    assert "kept out all 5 scored samples" in caplog.text
    assert torch.equal(d.keep[0], paper.keep[0]) and int(d.keep[0].sum()) == 2
    assert not d.flags["surprising"].any()
    caplog.clear()
    ent[2] = 6.9  # log PPL 7 - 6.9 = 0.1: one sample below the margin
    d = decide_step(_scores_of(ppl, ent), config)
    assert idx(d.flags["surprising"]) == [0, 1, 4, 5] and idx(d.keep[0]) == [2] and not caplog.text
    # pool: global over two ranks, every sample of both kept out: the paper's triage of the whole pool
    ent[2] = 0.3
    d = decide_step(_scores_of(ppl, ent), config.replace(pool="global"),
                    collectives=_TwoRanks([math.exp(8.0), math.exp(9.0)], [0.1, 0.1]))
    assert bool(d.global_pool.eligible.all()) and not d.flags["surprising"].any()
    assert int(d.keep[0].sum()) == 2


# ---------------------------------------------------------------- drop_ppl_outliers

def test_drop_outliers_worked_by_hand():
    """Eight samples, log PPL = 0, 0.1, ..., 0.6 and 3. Lower median 0.3 (sorted: 0 .1 .2 .3 .4
    .5 .6 3, the 4th), |x - 0.3| sorted: 0 .1 .1 .2 .2 .3 .3 2.7, lower median 0.2, scaled MAD
    0.29652. k = 2: threshold 0.3 + 0.59304 = 0.89304, only log PPL 3 goes; k = 1: 0.59652, so 0.6
    goes too; k = 10: none."""
    x = t(0.0, 3.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
    ppl, ent = x.exp(), t(0.5, 0.1, 0.9, 0.2, 0.3, 0.8, 0.4, 0.6)
    assert 1 in idx(triage(ppl, ent, 0.25).keep)  # the paper keeps the outlier (highest PPL, low Ent)
    for k, dropped in ((2.0, [1]), (1.0, [1, 7]), (10.0, [])):
        mask = drop_outliers(ppl, ent, k)
        assert idx(mask) == dropped, k
        want = torch.ones(8, dtype=torch.bool)
        want[dropped] = False
        result = triage(ppl, ent, 0.25, eligible=~mask)
        assert torch.equal(result.keep, triage(ppl, ent, 0.25, eligible=want).keep), k
        assert result.k == 2 and not result.keep[dropped].any()
    with pytest.raises(ValueError, match=r"QTuningConfig\.drop_ppl_outliers must be null"):
        QTuningConfig(drop_ppl_outliers=0.0)
    with pytest.raises(ValueError, match=r"drop_highest_ppl \(0\.25\) and drop_ppl_outliers \(2\.0\) are two rules"):
        QTuningConfig(drop_highest_ppl=0.25, drop_ppl_outliers=2.0)


def test_drop_outliers_edge_pools():
    ent = t(0.5, 0.1, 0.9, 0.2, 0.3, 0.8)
    # MAD 0 (four of six equal): every sample above the median goes
    flat = t(2, 2, 2, 2, 3, 2.5)
    mask = drop_outliers(flat, ent, 2.0)
    assert idx(mask) == [4, 5]
    result = triage(flat, ent, 0.5, eligible=~mask)
    assert not result.keep[[4, 5]].any() and result.k == 3
    # median +inf: none goes (the triage's own order then applies)
    inf_pool = t(INF, INF, INF, INF, 3, 2)
    assert not drop_outliers(inf_pool, ent, 2.0).any()
    # an infinite PPL in a finite pool is an outlier; a NaN row is no sample and not in the statistics
    with_nan = t(NAN, INF, 1, 1.1, 1.2, 1.3)
    mask = drop_outliers(with_nan, ent, 2.0)
    assert idx(mask) == [1]
    result = triage(with_nan, ent, 0.5, eligible=~mask)
    assert not result.keep[[0, 1]].any() and result.k == 2  # K = floor(0.5 x 5)
    # pool: global: the whole pool's statistics, whichever group holds the outlier
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    spread = t(1, 1.1, 1.2, 1.3, 1.05, 50)
    mask = drop_outliers(spread, ent, 2.0)
    by_group = triage(spread, ent, 0.5, groups=groups, eligible=~mask)
    assert not by_group.keep[5] and [int(by_group.keep[groups == g].sum()) for g in (0, 1)] == [1, 1]
    # no scored sample: nothing to drop
    assert not drop_outliers(t(NAN, NAN), t(1.0, 1.0), 2.0).any()


@settings(max_examples=300, deadline=None)
@given(pools(), ratios, st.sampled_from([0.5, 1.0, 2.0, 3.0]))
def test_drop_outliers_is_the_triage_of_the_rest_with_k_unchanged(pool, r, k):
    """The samples above median + k x 1.4826 MAD of log PPL (lower medians, numpy) are never kept,
    K still counts them, and the decision over the rest is the eligible-masked triage."""
    ppl, ent = pool
    ppl = ppl.abs() + 1e-3  # PPL > 0
    x = ppl.log().numpy()
    lower_median = lambda v: np.sort(v)[(len(v) - 1) // 2]  # noqa: E731
    med = lower_median(x)
    dropped = torch.from_numpy(x > med + k * (1.4826 * lower_median(np.abs(x - med))))
    mask = drop_outliers(ppl, ent, k)
    assert torch.equal(mask, dropped)
    result = triage(ppl, ent, r, eligible=~mask)
    assert not (result.keep & dropped).any()
    assert result.k == min(kept_count(ppl.numel(), r), int((~dropped).sum()))
