#!/usr/bin/env bash
# The project's test command (README): builds or reuses a virtual environment and runs pytest.
#   bash tests/run.sh [pytest args...]
# QTUNING_VENV picks the environment folder (default .venv at the repository root).
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${QTUNING_VENV:-.venv}"
python="${QTUNING_PYTHON:-python3.11}"
if [ ! -x "$venv/bin/python" ]; then
  echo "== creating $venv with $python"
  "$python" -m venv "$venv"
fi
# torch first and pinned to the CPU build kept on these machines: an unpinned torch would pull a
# multi-GB CUDA build. On your own machine any torch >= 2.4 works.
"$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v "is ignored" || true
"$venv/bin/python" -c "import torch, transformers, qtuning_plugin; print('== torch', torch.__version__, '| transformers', transformers.__version__, '| qtuning-plugin', qtuning_plugin.__version__)"
exec "$venv/bin/python" -m pytest -q "$@"
