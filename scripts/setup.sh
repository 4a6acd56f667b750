#!/usr/bin/env bash
# Creates .venv (if missing) and installs nbguard with everything the tests need.
# torch==2.13.0 first: it is the CPU build; a bare 'torch' can pull a CUDA build of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
if [ "${1:-}" = "--dev" ]; then
  python -m pip install -q -e '.[dev]'
  # Chromium for the browser test comes from Debian's packages (no browser downloads at run time).
  if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "setup: could not install chromium; browser tests will be skipped"
  fi
else
  python -m pip install -q -e '.[notebook]'
fi
