#!/usr/bin/env bash
# The test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The browser test of `minivlm serve` (tests/test_serve_browser.py) drives Debian's headless Chromium and
# fails, rather than skips, without it: install it when missing and we may (root, apt-get present).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[test] installing chromium and chromium-driver (apt-get)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
  else
    echo "[test] chromium/chromedriver not found: tests/test_serve_browser.py will fail until" \
         "'apt-get install -y chromium chromium-driver' (as root)" >&2
  fi
fi
exec .venv/bin/python -m pytest "$@"
