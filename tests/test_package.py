"""Packaging: the core stays pure torch, the console script answers."""

import ast
import pathlib
import subprocess
import sys

import qtuning_plugin

CORE = pathlib.Path(qtuning_plugin.__file__).parent / "core"


def test_core_imports_only_torch_and_the_standard_library():
    allowed_third_party = {"torch"}
    for path in CORE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            else:
                continue
            for root in roots:
                assert root in allowed_third_party or root in sys.stdlib_module_names, (path.name, root)


def test_importing_the_package_imports_no_trl_axolotl_or_transformers_trainer():
    code = ("import sys, qtuning_plugin, qtuning_plugin.core; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('trl', 'axolotl', 'peft')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_console_script():
    exe = pathlib.Path(sys.executable).parent / "qtuning"
    assert exe.exists(), "the qtuning console script is not installed"
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"qtuning-plugin {qtuning_plugin.__version__}"
    assert qtuning_plugin.__version__ != "0+unknown"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    assert "usage: qtuning" in out.stdout and "Q-Tuning" in out.stdout


def test_core_exports_are_what_they_promise_and_submodules_are_modules():
    """``core.triage`` is the function and ``core.sample_stage`` its module, however they are
    imported and in whichever order; no submodule shares a name with an exported function (the
    import system would bind the module over it on the package)."""
    import importlib
    import inspect
    import pkgutil
    import types

    code = ("import qtuning_plugin.core.sample_stage as m, qtuning_plugin.core as core, types; "
            "from qtuning_plugin.core import triage; "
            "assert isinstance(m, types.ModuleType) and m.triage is triage is core.triage, (m, triage)")
    subprocess.run([sys.executable, "-c", code], check=True)
    from qtuning_plugin import core

    submodules = [info.name for info in pkgutil.walk_packages(core.__path__, "qtuning_plugin.core.")]
    for name in submodules:
        assert isinstance(importlib.import_module(name), types.ModuleType), name
    assert {name.split(".")[2] for name in submodules} & set(core.__all__) == set()
    assert isinstance(importlib.import_module("qtuning_plugin.core.sample_stage"), types.ModuleType)
    for name in core.__all__:
        value = getattr(core, name)
        assert not isinstance(value, types.ModuleType), name
        assert getattr(value, "__module__", "qtuning_plugin.core").startswith("qtuning_plugin.core"), name
    assert inspect.isfunction(core.triage) and core.triage.__module__ == "qtuning_plugin.core.sample_stage"
    import qtuning_plugin

    assert qtuning_plugin.triage is core.triage


def test_no_package_file_is_over_300_lines():
    """A reader finds each piece in a short file: no module of the package is over 300 lines."""
    root = pathlib.Path(qtuning_plugin.__file__).parent
    long = {str(p.relative_to(root)): n for p in root.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 300}
    assert long == {}
