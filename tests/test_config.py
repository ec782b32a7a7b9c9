import dataclasses
import math

import pytest

from qtuning_plugin.core import QTuningConfig


def test_defaults_are_the_papers():
    cfg = QTuningConfig()
    assert cfg.to_dict() == {
        "sample_ratio": 0.25,
        "token_ratio": 0.5,
        "neighbor_lambda": 0.5,
        "pool": "step",
        "token_budget": "sample",
        "top_up": "minmax",
        "keep_tokens": "lowest",
        "warmup_steps": 0,
        "drop_highest_ppl": 0.0,
        "drop_ppl_outliers": None,
        "reference": "none",
        "reference_margin": 0.5,
        "reference_spread": 0.0,
        "reference_sticky": False,
        "reference_tokens": False,
    }
    assert not cfg.prunes_nothing
    assert QTuningConfig(sample_ratio=1, token_ratio=1).prunes_nothing


def test_round_trip_and_frozen():
    cfg = QTuningConfig(sample_ratio=0.125, token_ratio=1, neighbor_lambda=0, pool="micro_batch",
                        token_budget="batch")
    assert QTuningConfig.from_dict(cfg.to_dict()) == cfg
    assert QTuningConfig.from_dict(None) == QTuningConfig()
    assert cfg.replace(sample_ratio=0.5).sample_ratio == 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sample_ratio = 0.3  # type: ignore[misc]


@pytest.mark.parametrize("field", ["sample_ratio", "token_ratio"])
@pytest.mark.parametrize("value", [0, -0.1, 1.0000001, 2, math.nan, math.inf, "0.5", None, True, [0.5]])
def test_ratios_out_of_range_or_wrong_type(field, value):
    with pytest.raises(ValueError, match=rf"QTuningConfig\.{field} must be a number in \(0, 1\]"):
        QTuningConfig(**{field: value})


@pytest.mark.parametrize("value", [-1e-9, 1.5, math.nan, -math.inf, "half", False])
def test_lambda_out_of_range(value):
    with pytest.raises(ValueError, match=r"QTuningConfig\.neighbor_lambda must be a number in \[0, 1\]"):
        QTuningConfig(neighbor_lambda=value)


def test_boundaries_accepted():
    cfg = QTuningConfig(sample_ratio=1, token_ratio=1e-6, neighbor_lambda=0)
    assert (cfg.sample_ratio, cfg.token_ratio, cfg.neighbor_lambda) == (1.0, 1e-6, 0.0)
    assert isinstance(cfg.sample_ratio, float)
    assert QTuningConfig(neighbor_lambda=1).neighbor_lambda == 1.0


@pytest.mark.parametrize("field,allowed", [("pool", "'step', 'micro_batch', 'global'"),
                                           ("token_budget", "'sample', 'batch'"),
                                           ("top_up", "'minmax', 'rank'"),
                                           ("keep_tokens", "'lowest', 'highest'")])
@pytest.mark.parametrize("value", ["ranked", "", None, 1, "STEP"])
def test_choices(field, allowed, value):
    with pytest.raises(ValueError, match=rf"QTuningConfig\.{field} must be one of \[{allowed}\]"):
        QTuningConfig(**{field: value})


def test_unknown_field_names_the_field_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['sampel_ratio'\].*allowed fields: \['sample_ratio'"):
        QTuningConfig(sampel_ratio=0.3)
    with pytest.raises(ValueError, match="unknown field"):
        QTuningConfig.from_dict({"sample_ratio": 0.5, "tokens": 1})
    with pytest.raises(ValueError, match="expected a mapping"):
        QTuningConfig.from_dict([("sample_ratio", 0.5)])


@pytest.mark.parametrize("value", [-1, 1.5, "3", True, None])
def test_warmup_steps_must_be_a_non_negative_integer(value):
    with pytest.raises(ValueError, match=r"QTuningConfig\.warmup_steps must be an integer >= 0"):
        QTuningConfig(warmup_steps=value)


@pytest.mark.parametrize("value", [-0.1, 1, 1.0, float("nan"), "0.2", True, None])
def test_drop_highest_ppl_must_be_in_zero_one(value):
    with pytest.raises(ValueError, match=r"QTuningConfig\.drop_highest_ppl must be a number in \[0, 1\)"):
        QTuningConfig(drop_highest_ppl=value)


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), "2", True])
def test_drop_ppl_outliers_must_be_null_or_positive(value):
    with pytest.raises(ValueError, match=r"QTuningConfig\.drop_ppl_outliers must be null \(off\) or a finite "
                                         r"number > 0"):
        QTuningConfig(drop_ppl_outliers=value)


def test_drop_ppl_outliers_excludes_drop_highest_ppl():
    assert QTuningConfig(drop_ppl_outliers=2).drop_ppl_outliers == 2.0
    assert QTuningConfig(drop_ppl_outliers=None, drop_highest_ppl=0.25).drop_ppl_outliers is None
    with pytest.raises(ValueError, match=r"drop_highest_ppl \(0\.25\) and drop_ppl_outliers \(2\) are two rules"):
        QTuningConfig(drop_ppl_outliers=2, drop_highest_ppl=0.25)
    # a preset's drop_highest_ppl must be switched off beside it, loudly, never half-applied
    with pytest.raises(ValueError, match="set one of them"):
        QTuningConfig.from_dict({"preset": "small-loss", "drop_ppl_outliers": 2})
    cfg = QTuningConfig.from_dict({"preset": "small-loss", "drop_highest_ppl": 0, "drop_ppl_outliers": 2})
    assert cfg == QTuningConfig(keep_tokens="highest", drop_ppl_outliers=2.0)


def test_options_beyond_the_paper_round_trip():
    cfg = QTuningConfig(top_up="rank", keep_tokens="highest", warmup_steps=3, drop_highest_ppl=0.2)
    assert QTuningConfig.from_dict(cfg.to_dict()) == cfg and cfg.warmup_steps == 3
    outliers = QTuningConfig(drop_ppl_outliers=1.5)
    assert QTuningConfig.from_dict(outliers.to_dict()) == outliers
    assert cfg.drop_highest_ppl == 0.2 and QTuningConfig(drop_highest_ppl=0).drop_highest_ppl == 0.0


def test_presets_by_name_and_fields_beside_them_override():
    from qtuning_plugin.core.config import PRESETS

    assert QTuningConfig.from_dict({"preset": "paper"}) == QTuningConfig()
    for name, fields in PRESETS.items():
        cfg = QTuningConfig.from_dict({"preset": name})
        assert {k: cfg.to_dict()[k] for k in fields} == fields
        assert QTuningConfig.from_dict({"preset": name, "sample_ratio": 0.125}).sample_ratio == 0.125
    robust = QTuningConfig.from_dict({"preset": "robust"})
    assert robust == QTuningConfig(reference="base")  # the paper plus the reference guard, nothing else
    assert QTuningConfig.from_dict({"preset": "robust", "reference": "none"}) == QTuningConfig()
    assert QTuningConfig.from_dict({"preset": "small-loss"}) == QTuningConfig(drop_highest_ppl=0.25,
                                                                              keep_tokens="highest")
    with pytest.raises(ValueError, match=r"preset must be one of \['paper', 'robust', 'small-loss'\]"):
        QTuningConfig.from_dict({"preset": "fast"})
    with pytest.raises(ValueError, match="a preset is not a field"):
        QTuningConfig(preset="paper")
