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
