import copy
import dataclasses
import math
import pickle
import re
import subprocess
import sys

import pytest

from qtuning_plugin.core import QTuningConfig
from qtuning_plugin.core.config import OPTIONS, PRESETS, RETIRED, RETIRED_PRESETS


def test_defaults_are_the_papers():
    cfg = QTuningConfig()
    assert cfg.to_dict() == {
        # the paper
        "sample_ratio": 0.25,
        "token_ratio": 0.5,
        "neighbor_lambda": 0.5,
        "pool": "step",
        "token_budget": "sample",
        "keep_tokens": "lowest",
        # the rules, all off
        "drop_highest_ppl": 0.0,
        "drop_ppl_outliers": None,
        "drop_surprising": None,
        "reference": "none",
        "reference_margin": 0.5,
        # runtime
        "chunk_size": 256,
        "log_decisions": None,
        "plot_every": 50,
    }
    assert not cfg.prunes_nothing
    assert QTuningConfig(sample_ratio=1, token_ratio=1).prunes_nothing
    assert cfg.paper() == cfg


def test_round_trip_and_frozen():
    cfg = QTuningConfig(sample_ratio=0.125, token_ratio=1, neighbor_lambda=0, pool="micro_batch",
                        token_budget="batch", chunk_size=64, log_decisions="d.jsonl")
    assert QTuningConfig.from_dict(cfg.to_dict()) == cfg
    assert QTuningConfig.from_dict(None) == QTuningConfig()
    assert cfg.replace(sample_ratio=0.5).sample_ratio == 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sample_ratio = 0.3  # type: ignore[misc]
    assert hash(cfg) == hash(QTuningConfig.from_dict(cfg.to_dict()))
    assert pickle.loads(pickle.dumps(cfg)) == cfg and copy.deepcopy(cfg) == cfg


def test_fields_are_keyword_only():
    with pytest.raises(ValueError, match="by name"):
        QTuningConfig(0.25)  # type: ignore[misc]


@pytest.mark.parametrize("field", ["sample_ratio", "token_ratio"])
@pytest.mark.parametrize("value", [0, -0.1, 1.0000001, 2, math.nan, math.inf, "0.5", None, True, [0.5]])
def test_ratios_out_of_range_or_wrong_type(field, value):
    with pytest.raises(ValueError, match=rf"QTuningConfig\.{field} must be .*\(0, 1\], got"):
        QTuningConfig(**{field: value})


@pytest.mark.parametrize("value", [-1e-9, 1.5, math.nan, -math.inf, "half", False])
def test_lambda_out_of_range(value):
    with pytest.raises(ValueError, match=r"QTuningConfig\.neighbor_lambda must be .*\[0, 1\], got"):
        QTuningConfig(neighbor_lambda=value)


def test_boundaries_accepted():
    cfg = QTuningConfig(sample_ratio=1, token_ratio=1e-6, neighbor_lambda=0)
    assert (cfg.sample_ratio, cfg.token_ratio, cfg.neighbor_lambda) == (1.0, 1e-6, 0.0)
    assert isinstance(cfg.sample_ratio, float)
    assert QTuningConfig(neighbor_lambda=1).neighbor_lambda == 1.0


@pytest.mark.parametrize("field,allowed", [("pool", "'step', 'micro_batch', 'global'"),
                                           ("token_budget", "'sample', 'batch'"),
                                           ("keep_tokens", "'lowest', 'highest'"),
                                           ("reference", "'none', 'base'")])
@pytest.mark.parametrize("value", ["ranked", "", None, 1, "STEP"])
def test_choices(field, allowed, value):
    with pytest.raises(ValueError, match=rf"QTuningConfig\.{field} must be one of \[{allowed}\]"):
        QTuningConfig(**{field: value})


@pytest.mark.parametrize("value", [0, -1, 2.0, "256", True, None])
def test_chunk_size_must_be_a_positive_integer(value):
    with pytest.raises(ValueError, match=r"QTuningConfig\.chunk_size must be an? ?integer >= 1"):
        QTuningConfig(chunk_size=value)


@pytest.mark.parametrize("value", ["", 0, True])
def test_log_decisions_must_be_null_or_a_path(value):
    with pytest.raises(ValueError, match=r"QTuningConfig\.log_decisions must be null.* or a file path"):
        QTuningConfig(log_decisions=value)


def test_unknown_field_names_the_field_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['sampel_ratio'\].*allowed fields: \['sample_ratio'"):
        QTuningConfig(sampel_ratio=0.3)
    with pytest.raises(ValueError, match="unknown field"):
        QTuningConfig.from_dict({"sample_ratio": 0.5, "tokens": 1})
    with pytest.raises(ValueError, match="expected a mapping"):
        QTuningConfig.from_dict([("sample_ratio", 0.5)])
    with pytest.raises(ValueError, match="field names must be strings"):
        QTuningConfig.from_dict({1: 0.5})


@pytest.mark.parametrize("value", [-0.1, 1, 1.0, float("nan"), "0.2", True, None])
def test_drop_highest_ppl_must_be_in_zero_one(value):
    with pytest.raises(ValueError, match=r"QTuningConfig\.drop_highest_ppl must be .*\[0, 1\), got"):
        QTuningConfig(drop_highest_ppl=value)


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), "2", True])
def test_drop_ppl_outliers_must_be_null_or_positive(value):
    allowed = re.escape(next(o for o in OPTIONS if o.name == "drop_ppl_outliers").allowed())
    assert allowed.startswith("null")
    with pytest.raises(ValueError, match=rf"QTuningConfig\.drop_ppl_outliers must be {allowed}, got"):
        QTuningConfig(drop_ppl_outliers=value)


def test_drop_ppl_outliers_excludes_drop_highest_ppl():
    assert QTuningConfig(drop_ppl_outliers=2).drop_ppl_outliers == 2.0
    assert QTuningConfig(drop_ppl_outliers=None, drop_highest_ppl=0.25).drop_ppl_outliers is None
    with pytest.raises(ValueError, match=r"drop_highest_ppl \(0\.25\) and drop_ppl_outliers \(2\.0\) are two rules"):
        QTuningConfig(drop_ppl_outliers=2, drop_highest_ppl=0.25)
    # a preset's drop_highest_ppl must be switched off beside it, loudly, never half-applied
    with pytest.raises(ValueError, match="set one of them"):
        QTuningConfig.from_dict({"preset": "small-loss", "drop_ppl_outliers": 2})
    cfg = QTuningConfig.from_dict({"preset": "small-loss", "drop_highest_ppl": 0, "drop_ppl_outliers": 2})
    assert cfg == QTuningConfig(keep_tokens="highest", drop_ppl_outliers=2.0)
    # replace() is checked as the constructor is
    with pytest.raises(ValueError, match="two rules"):
        QTuningConfig(drop_highest_ppl=0.25).replace(drop_ppl_outliers=1.5)


def test_options_beyond_the_paper_round_trip():
    cfg = QTuningConfig(keep_tokens="highest", drop_highest_ppl=0.2, reference="base", reference_margin=2)
    assert QTuningConfig.from_dict(cfg.to_dict()) == cfg and cfg.reference_margin == 2.0
    outliers = QTuningConfig(drop_ppl_outliers=1.5)
    assert QTuningConfig.from_dict(outliers.to_dict()) == outliers
    assert cfg.drop_highest_ppl == 0.2 and QTuningConfig(drop_highest_ppl=0).drop_highest_ppl == 0.0


def test_decisions_and_paper():
    """decisions(): every field that changes what is decided (not the runtime ones); paper(): the
    same config with every rule at its default."""
    cfg = QTuningConfig(sample_ratio=0.5, keep_tokens="highest", drop_highest_ppl=0.2, reference="base",
                        reference_margin=1.0, chunk_size=32, log_decisions="d.jsonl")
    decisions = cfg.decisions()
    assert list(decisions) == [o.name for o in OPTIONS if o.group != "runtime"]
    assert "chunk_size" not in decisions and "log_decisions" not in decisions
    assert cfg.replace(chunk_size=8, log_decisions=None).decisions() == decisions
    assert cfg.paper() == QTuningConfig(sample_ratio=0.5, keep_tokens="highest", chunk_size=32,
                                        log_decisions="d.jsonl")
    assert QTuningConfig(drop_ppl_outliers=2.0).paper() == QTuningConfig()


def test_presets_by_name_and_fields_beside_them_override():
    assert QTuningConfig.from_dict({"preset": "paper"}) == QTuningConfig()
    for name, fields in PRESETS.items():
        cfg = QTuningConfig.from_dict({"preset": name})
        assert {k: cfg.to_dict()[k] for k in fields} == fields
        assert QTuningConfig.from_dict({"preset": name, "sample_ratio": 0.125}).sample_ratio == 0.125
    assert QTuningConfig.from_dict({"preset": "small-loss"}) == QTuningConfig(drop_highest_ppl=0.25,
                                                                              keep_tokens="highest")
    assert QTuningConfig.from_dict({"preset": "small-loss", "keep_tokens": "lowest"}) == \
        QTuningConfig(drop_highest_ppl=0.25)
    assert QTuningConfig.from_dict({"preset": "auto"}) == QTuningConfig(drop_surprising=0.5, keep_tokens="highest")
    with pytest.raises(ValueError, match=r"preset must be one of \['paper', 'small-loss', 'auto'\]"):
        QTuningConfig.from_dict({"preset": "fast"})
    with pytest.raises(ValueError, match="a preset is not a field"):
        QTuningConfig(preset="paper")


# ---------------------------------------------------------------- retired options (issue 28)

# a value each retired field took (not its old default: the name alone is refused)
RETIRED_VALUES = {"top_up": "rank", "warmup_steps": 3, "reference_spread": 2.0, "reference_sticky": True,
                  "reference_tokens": True}
# what each message says replaced the field (or that nothing did)
REPLACED_BY = {"top_up": "min-max", "warmup_steps": "did not help", "reference_spread": "reference_margin",
               "reference_sticky": "afresh", "reference_tokens": "samples, not tokens"}


def test_the_retired_names_are_the_issues():
    assert sorted(RETIRED) == sorted(RETIRED_VALUES) == sorted(REPLACED_BY)
    assert list(RETIRED_PRESETS) == ["robust"]
    assert not set(RETIRED) & {o.name for o in OPTIONS}
    assert "robust" not in PRESETS


@pytest.mark.parametrize("name", sorted(RETIRED_VALUES))
def test_a_retired_field_says_what_replaced_it(name):
    """The constructor, from_dict (with and without a preset) and replace() refuse a retired field
    by name, saying it was removed and what replaced it, not as an unknown field."""
    value = RETIRED_VALUES[name]
    want = rf"QTuningConfig\.{name} was {re.escape(RETIRED[name])}"
    assert "removed" in RETIRED[name] and REPLACED_BY[name] in RETIRED[name]
    builds = [lambda: QTuningConfig(**{name: value}),
              lambda: QTuningConfig.from_dict({name: value}),
              lambda: QTuningConfig.from_dict({"preset": "small-loss", name: value}),
              lambda: QTuningConfig().replace(**{name: value})]
    for build in builds:
        with pytest.raises(ValueError, match=want) as info:
            build()
        assert "unknown field" not in str(info.value)


def test_every_retired_field_given_is_named():
    with pytest.raises(ValueError) as info:
        QTuningConfig.from_dict({"sample_ratio": 0.5, "top_up": "rank", "reference_sticky": True})
    message = str(info.value)
    assert "QTuningConfig.top_up was removed" in message and "QTuningConfig.reference_sticky was removed" in message


def test_the_robust_preset_is_retired_and_says_what_replaced_it():
    for fields in ({"preset": "robust"}, {"preset": "robust", "reference": "none"}):
        with pytest.raises(ValueError, match=r"QTuningConfig\.preset 'robust' is retired") as info:
            QTuningConfig.from_dict(fields)
        assert "small-loss" in str(info.value) and "reference: base" in str(info.value)


def test_the_config_imports_no_torch():
    """core/config.py is pure Python: `qtuning --help`, the Axolotl schema and the docs read the
    options without importing torch (seconds on a small machine)."""
    code = ("import sys\nimport qtuning_plugin.core.config\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_readme_options_table_is_the_generated_one():
    """README's options table is `options_table()`, verbatim (regenerate it with
    `python -m qtuning_plugin.core.config` after changing an option)."""
    import pathlib

    from qtuning_plugin.core.config import options_table

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- options-table:start -->")[1].split("<!-- options-table:end -->")[0]
    assert block.strip() == options_table()
