#!/usr/bin/env bash
# The main job: a Ray-backed Flower simulation of federated MoPs on the embedded SmolLM2 and
# ../shared/data (100 supernodes, 10 per round). Results in runs/federated/.
# Arguments go to `python -m simulation.launch`, e.g. --run-config "method='fedprompt'".
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_INSTALL:-0}" = 1 ] || bash scripts/install.sh
exec .venv/bin/python -m simulation.launch "$@"
