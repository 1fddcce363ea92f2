#!/usr/bin/env bash
# The main job: the end-to-end demo on the built-in synthetic world. Extra arguments go to `minivlm demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/minivlm demo "${@:---out runs/demo}"
