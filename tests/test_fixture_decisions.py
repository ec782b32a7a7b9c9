"""Every retained option decides bit-identically on a recorded set of pools (tests/fixtures/decisions.json,
recorded before the rules refactor; tests/fixtures/record_decisions.py says how)."""

import json
import pathlib
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(HERE))

from record_decisions import bits, load_pool  # noqa: E402

from qtuning_plugin.core import QTuningConfig  # noqa: E402
from qtuning_plugin.core.step import decide_step  # noqa: E402

FIXTURE = json.loads((HERE / "decisions.json").read_text())


@pytest.mark.parametrize("name", sorted(FIXTURE["configs"]))
def test_recorded_pools_decide_as_recorded(name):
    cfg = QTuningConfig.from_dict(FIXTURE["configs"][name])
    for i, (entry, want) in enumerate(zip(FIXTURE["pools"], FIXTURE["decisions"][name])):
        scores, refs = load_pool(entry)
        d = decide_step(scores, cfg, refs if cfg.reference == "base" else None)
        got = {"keep": [k.int().tolist() for k in d.keep], "prune": [p.int().tolist() for p in d.prune],
               "token_keep": [bits(t) for t in d.token_keep],
               "excluded": None if d.excluded is None else d.excluded.int().tolist(),
               "suspects": None if d.suspects is None else d.suspects.int().tolist()}
        assert got == want, f"pool {i} ({name})"
