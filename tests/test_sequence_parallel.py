"""Sequence / context parallelism is refused in one place (support.refuse_sequence_parallelism):
by the Trainer hook from the TrainingArguments or the accelerator, and by the Axolotl plugin from
its config before the model loads, for the same settings with the same words."""

import importlib
import importlib.util
import re
import sys
import types

import pytest

import qtuning_plugin
from qtuning_plugin.support import (
    PARALLELISM_CONFIG_KEYS,
    SEQUENCE_PARALLEL_KEYS,
    refuse_sequence_parallelism,
)

MESSAGE = "sequence / context parallelism ({key}: {value}) is not supported: each rank would see only a shard"


@pytest.fixture
def axolotl_module(monkeypatch):
    """qtuning_plugin.axolotl; where Axolotl is not installed, imported against a stand-in for the
    one class it takes from Axolotl (the config checks need nothing else)."""
    if importlib.util.find_spec("axolotl") is None:
        base = types.ModuleType("axolotl.integrations.base")
        base.BasePlugin = type("BasePlugin", (), {})
        for name, module in (("axolotl", types.ModuleType("axolotl")),
                             ("axolotl.integrations", types.ModuleType("axolotl.integrations")),
                             ("axolotl.integrations.base", base)):
            monkeypatch.setitem(sys.modules, name, module)
        # imported afresh against the stand-in, and forgotten afterwards (as it was before)
        monkeypatch.setitem(sys.modules, "qtuning_plugin.axolotl", None)
        del sys.modules["qtuning_plugin.axolotl"]
        monkeypatch.setattr(qtuning_plugin, "axolotl", None, raising=False)
        return importlib.import_module("qtuning_plugin.axolotl")
    return importlib.import_module("qtuning_plugin.axolotl")


@pytest.mark.parametrize("key", SEQUENCE_PARALLEL_KEYS)
def test_every_key_is_refused_by_the_trainer_hook_and_the_axolotl_config(key, axolotl_module):
    want = re.escape(MESSAGE.format(key=key, value=2))
    with pytest.raises(ValueError, match="^QTuning: " + want):
        refuse_sequence_parallelism(types.SimpleNamespace(**{key: 2}))
    with pytest.raises(ValueError, match="^qtuning: " + want):
        axolotl_module.check_axolotl_config({"qtuning": {"sample_ratio": 0.25}, key: 2})
    axolotl_module.check_axolotl_config({key: 2})  # without the block: not our business
    axolotl_module.check_axolotl_config({"qtuning": {}, key: 1})


@pytest.mark.parametrize("key", PARALLELISM_CONFIG_KEYS)
def test_accelerates_parallelism_config_is_refused_on_the_arguments_or_the_accelerator(key):
    config = types.SimpleNamespace(**{**{k: 1 for k in PARALLELISM_CONFIG_KEYS}, key: 4})
    for owners in ((types.SimpleNamespace(parallelism_config=config), None),
                   (types.SimpleNamespace(), types.SimpleNamespace(parallelism_config=config))):
        with pytest.raises(ValueError, match=re.escape(MESSAGE.format(key=f"parallelism_config.{key}", value=4))):
            refuse_sequence_parallelism(*owners)
    quiet = types.SimpleNamespace(parallelism_config=types.SimpleNamespace(cp_size=1, sp_size=None))
    refuse_sequence_parallelism(quiet, {"context_parallel_size": 1, "sequence_parallel_degree": None}, None)
