#!/usr/bin/env bash
# The main job: the end-to-end demo on the built-in synthetic world. Extra arguments go to `minivlm demo`
# (default: --out runs/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ]; then set -- --out runs/demo; fi
exec .venv/bin/minivlm demo "$@"
