"""Option (qtuning_plugin/core/options.py): each kind's accepted and refused values, the message that
names the field and what it accepts, and QTuningConfig / README's table derived from OPTIONS."""

import dataclasses
import math
import re
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qtuning_plugin.core.config import OPTIONS, QTuningConfig, options_table
from qtuning_plugin.core.options import Option

# one option of each kind (and each variant of a kind), built here so that the tests do not depend
# on which fields the config happens to declare
RATIO_OPEN = Option("r_open", 0.5, "a ratio, 0 refused", kind="ratio", group="paper", open_low=True)
RATIO_CLOSED = Option("r_closed", 0.5, "a ratio, 0 accepted", kind="ratio", group="paper")
NUMBER_BELOW = Option("below_one", 0.0, "[0, 1)", kind="number", group="rules", high=1.0)
NUMBER_POSITIVE = Option("positive", 1.0, "> 0", kind="number", group="rules", open_low=True)
NUMBER_OPTIONAL = Option("maybe", None, "null or > 0", kind="number", group="rules", open_low=True, optional=True)
CHOICE = Option("mode", "a", "a or b", kind="choice", group="paper", choices=("a", "b"))
CHOICE_OPTIONAL = Option("maybe_mode", None, "null, a or b", kind="choice", group="paper", choices=("a", "b"),
                         optional=True)
INTEGER = Option("count", 4, ">= 1", kind="integer", group="runtime", low=1)
PATH = Option("where", "x.jsonl", "a path", kind="path", group="runtime")
PATH_OPTIONAL = Option("where_maybe", None, "null or a path", kind="path", group="runtime", optional=True)


def refused(option, value):
    """The ValueError ``option.check(value)`` raises, checked to name the field, what it accepts and the value."""
    with pytest.raises(ValueError) as info:
        option.check(value)
    message = str(info.value)
    assert message.startswith(f"QTuningConfig.{option.name} must be {option.allowed()}"), message
    assert message.endswith(f"got {value!r}"), message
    return message


def test_allowed_values_in_words():
    """The accepted values, as errors, the CLI and README state them: bounds with their brackets,
    the choices listed, 'null' first where None is accepted."""
    assert "(0, 1]" in RATIO_OPEN.allowed() and "[0, 1]" in RATIO_CLOSED.allowed()
    assert "[0, 1)" in NUMBER_BELOW.allowed()
    assert re.search(r"> ?0\b|\(0, inf\)", NUMBER_POSITIVE.allowed()), NUMBER_POSITIVE.allowed()
    assert ">=" not in NUMBER_POSITIVE.allowed()
    assert "['a', 'b']" in CHOICE.allowed()
    assert ">= 1" in INTEGER.allowed() and "integer" in INTEGER.allowed()
    assert "path" in PATH.allowed()
    for optional, plain in ((NUMBER_OPTIONAL, NUMBER_POSITIVE), (CHOICE_OPTIONAL, CHOICE), (PATH_OPTIONAL, PATH)):
        assert optional.allowed().startswith("null") and optional.allowed().endswith(plain.allowed())
        assert not plain.allowed().startswith("null")


# ---------------------------------------------------------------- accepted (and normalised)

@pytest.mark.parametrize("option, value, want", [
    (RATIO_OPEN, 1, 1.0), (RATIO_OPEN, 1e-9, 1e-9), (RATIO_OPEN, 0.25, 0.25), (RATIO_OPEN, Fraction(1, 4), 0.25),
    (RATIO_OPEN, np.float32(0.5), 0.5), (RATIO_OPEN, np.int64(1), 1.0),
    (RATIO_CLOSED, 0, 0.0), (RATIO_CLOSED, 1, 1.0), (RATIO_CLOSED, 0.5, 0.5),
    (NUMBER_BELOW, 0, 0.0), (NUMBER_BELOW, 0.999, 0.999),
    (NUMBER_POSITIVE, 1e-12, 1e-12), (NUMBER_POSITIVE, 3, 3.0), (NUMBER_POSITIVE, 1e300, 1e300),
    (NUMBER_OPTIONAL, None, None), (NUMBER_OPTIONAL, 2, 2.0),
    (CHOICE, "a", "a"), (CHOICE, "b", "b"), (CHOICE_OPTIONAL, None, None), (CHOICE_OPTIONAL, "b", "b"),
    (INTEGER, 1, 1), (INTEGER, 4096, 4096), (INTEGER, np.int64(7), 7),
    (PATH, "d.jsonl", "d.jsonl"), (PATH, "/tmp/a b/d.jsonl", "/tmp/a b/d.jsonl"),
    (PATH_OPTIONAL, None, None), (PATH_OPTIONAL, "d.jsonl", "d.jsonl"),
])
def test_accepted_values_are_normalised(option, value, want):
    got = option.check(value)
    assert got == want
    assert type(got) is type(want)  # numbers become float, integers int (not numpy, not bool)


# ---------------------------------------------------------------- refused, with the field and what it accepts

@pytest.mark.parametrize("option, value", [
    (RATIO_OPEN, 0), (RATIO_OPEN, 0.0), (RATIO_OPEN, -0.0), (RATIO_OPEN, -0.1), (RATIO_OPEN, 1.0000001),
    (RATIO_OPEN, 2), (RATIO_OPEN, "0.5"), (RATIO_OPEN, None), (RATIO_OPEN, [0.5]), (RATIO_OPEN, 0.5j),
    (RATIO_CLOSED, -1e-9), (RATIO_CLOSED, 1.5), (RATIO_CLOSED, "half"),
    (NUMBER_BELOW, -0.1), (NUMBER_BELOW, 1), (NUMBER_BELOW, 1.0), (NUMBER_BELOW, "0.2"), (NUMBER_BELOW, None),
    (NUMBER_POSITIVE, 0), (NUMBER_POSITIVE, -1.0), (NUMBER_POSITIVE, "2"), (NUMBER_POSITIVE, None),
    (NUMBER_OPTIONAL, 0), (NUMBER_OPTIONAL, -2.0), (NUMBER_OPTIONAL, "null"),
    (CHOICE, "c"), (CHOICE, "A"), (CHOICE, ""), (CHOICE, None), (CHOICE, 1), (CHOICE, ["a"]),
    (CHOICE_OPTIONAL, "c"), (CHOICE_OPTIONAL, "none"),
    (INTEGER, 0), (INTEGER, -3), (INTEGER, 2.0), (INTEGER, 2.5), (INTEGER, "256"), (INTEGER, None),
    (PATH, ""), (PATH, None), (PATH, 0), (PATH_OPTIONAL, ""), (PATH_OPTIONAL, 1),
])
def test_refused_values_name_the_field_and_what_it_accepts(option, value):
    refused(option, value)


NUMERIC = [RATIO_OPEN, RATIO_CLOSED, NUMBER_BELOW, NUMBER_POSITIVE, NUMBER_OPTIONAL, INTEGER]


@pytest.mark.parametrize("option", NUMERIC, ids=lambda o: o.name)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, np.float64("nan"), np.inf], ids=repr)
def test_nan_and_infinity_are_refused(option, value):
    refused(option, value)


@pytest.mark.parametrize("option", NUMERIC, ids=lambda o: o.name)
@pytest.mark.parametrize("value", [True, False])
def test_a_bool_is_not_a_number(option, value):
    """True == 1 and False == 0 in Python; a YAML ``true`` must not pass for a ratio of 1."""
    refused(option, value)


def test_the_field_carries_its_option():
    field = INTEGER.field()
    assert field.default == 4 and field.metadata["option"] is INTEGER and field.metadata["help"] == INTEGER.help


# ---------------------------------------------------------------- QTuningConfig is OPTIONS

def test_config_fields_are_the_options():
    fields = dataclasses.fields(QTuningConfig)
    assert [f.name for f in fields] == [o.name for o in OPTIONS]
    for f, o in zip(fields, OPTIONS):
        assert f.default == o.default and f.metadata["option"] is o, o.name
        assert f.kw_only
    assert QTuningConfig().to_dict() == {o.name: o.default for o in OPTIONS}
    assert len({o.name for o in OPTIONS}) == len(OPTIONS)


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_each_option_is_well_formed(option):
    assert option.group in ("paper", "rules", "runtime")
    assert option.kind in ("ratio", "number", "choice", "integer", "path")
    assert option.help.strip()
    assert option.check(option.default) == option.default  # the default is accepted as it is
    if option.kind == "choice":
        assert option.choices and (option.default in option.choices or option.optional)


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_the_config_refuses_through_the_option(option):
    """Every field is checked by its Option, with the same message, by the constructor and
    from_dict."""
    for bad in ([], "not-a-choice" if option.kind != "path" else "", math.nan if option.kind != "choice" else 0):
        with pytest.raises(ValueError) as info:
            option.check(bad)
        want = re.escape(str(info.value))
        with pytest.raises(ValueError, match=want):
            QTuningConfig(**{option.name: bad})
        with pytest.raises(ValueError, match=want):
            QTuningConfig.from_dict({option.name: bad})


def core_call(function, argument, value):
    """Call a core function with one argument set to ``value`` (the rest valid)."""
    import torch

    from qtuning_plugin.core import pooled_token_keep_mask, token_keep_mask, triage

    nll, trainable = torch.ones(1, 4), torch.ones(1, 4, dtype=torch.bool)
    if function == "triage":
        return triage(torch.ones(2), torch.ones(2), value)
    args = {"token_ratio": 0.5, "neighbor_lambda": 0.5, "keep": "lowest", argument: value}
    if function == "token_keep_mask":
        return token_keep_mask(nll, trainable, **args)
    del args["token_ratio"]
    return pooled_token_keep_mask([nll], [trainable], 1, **args)


@pytest.mark.parametrize("function, argument, field", [
    ("triage", "sample_ratio", "sample_ratio"),
    ("token_keep_mask", "token_ratio", "token_ratio"),
    ("token_keep_mask", "neighbor_lambda", "neighbor_lambda"),
    ("token_keep_mask", "keep", "keep_tokens"),
    ("pooled_token_keep_mask", "neighbor_lambda", "neighbor_lambda"),
    ("pooled_token_keep_mask", "keep", "keep_tokens"),
])
@pytest.mark.parametrize("bad", [0.0, 1.5, -1, math.nan, "top"])
def test_core_functions_refuse_their_arguments_as_the_config_does(function, argument, field, bad):
    """A core function's argument of the same meaning as a config field is checked by that field's
    Option: the same range, the same words, the function and the argument named."""
    option = next(o for o in OPTIONS if o.name == field)
    try:
        option.check(bad)
    except ValueError as err:
        want = str(err).replace(f"QTuningConfig.{field}", f"{function}: {argument}")
    else:
        core_call(function, argument, bad)  # accepted by the option: accepted by the function
        return
    with pytest.raises(ValueError) as info:
        core_call(function, argument, bad)
    assert str(info.value) == want


def test_the_options_table_has_one_row_per_option():
    table = options_table().splitlines()
    rows = [line for line in table if line.startswith("| `")]
    assert [re.match(r"\| `([^`]+)`", row).group(1) for row in rows] == [o.name for o in OPTIONS]
    for row, o in zip(rows, OPTIONS):
        assert o.allowed() in row and o.help in row
        assert f"`{'null' if o.default is None else o.default}`" in row
    assert table[0].startswith("| option |")
    # every other line is the header, its rule, or a group's title row
    others = [line for line in table if not line.startswith("| `")]
    assert len(others) == 2 + len({o.group for o in OPTIONS})


# ---------------------------------------------------------------- against a literal reading

@settings(max_examples=300, deadline=None)
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5),
                 st.sampled_from([0.0, -0.0, 1.0, 1e-300, 1 - 1e-16, 1 + 1e-15])))
def test_numbers_are_accepted_exactly_in_their_range(value):
    finite = math.isfinite(value)
    cases = ((RATIO_OPEN, finite and 0 < value <= 1), (RATIO_CLOSED, finite and 0 <= value <= 1),
             (NUMBER_BELOW, finite and 0 <= value < 1), (NUMBER_POSITIVE, finite and value > 0),
             (INTEGER, isinstance(value, int) and value >= 1))
    for option, ok in cases:
        if ok:
            assert option.check(value) == value
        else:
            refused(option, value)


@pytest.mark.parametrize("option", [RATIO_OPEN, NUMBER_POSITIVE, NUMBER_OPTIONAL], ids=lambda o: o.name)
def test_an_int_beyond_floats_range_is_refused_by_name(option):
    refused(option, 10 ** 400)
