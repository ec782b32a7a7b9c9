#!/usr/bin/env bash
# The project's test command (README): for each environment of the matrix, build or reuse a
# virtual environment and run pytest in it.
#   bash tests/run.sh [pytest args...]
# Environments (tests/envs/NAME.txt holds each one's pins, installed as pip constraints):
#   latest             newest trl / transformers          -> .venv
#   axolotl-0.21-pins  trl 1.14.1 / transformers 5.20.1   -> .venv-axolotl-0.21-pins
#   axolotl-0.19-pins  trl 1.9.0 / transformers 5.16.1    -> .venv-axolotl-0.19-pins (oldest claimed)
# QTUNING_ENVS="latest" runs a subset.
set -uo pipefail
cd "$(dirname "$0")/.."

envs="${QTUNING_ENVS:-latest axolotl-0.21-pins axolotl-0.19-pins}"
python="${QTUNING_PYTHON:-python3.11}"
status=0
for env in $envs; do
  pins="tests/envs/$env.txt"
  [ -f "$pins" ] || { echo "tests/run.sh: unknown environment '$env' (no $pins)"; exit 2; }
  venv=".venv"; [ "$env" = latest ] || venv=".venv-$env"
  echo "================ environment: $env ($venv)"
  if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv" || exit 1
  fi
  pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
  # torch first and pinned to the CPU build kept on these machines: an unpinned torch would pull
  # a multi-GB CUDA build. On your own machine any torch >= 2.4 works.
  { "${pip[@]}" "torch==2.13.0" && "${pip[@]}" -e ".[dev]" -c "$pins"; } 2>&1 | grep -v "is ignored"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "tests/run.sh: installing $env failed"; exit 1; }
  "$venv/bin/python" -c "import torch, transformers, trl, qtuning_plugin; print('== torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__, '| qtuning-plugin', qtuning_plugin.__version__)"
  "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@" || status=1
done
exit $status
