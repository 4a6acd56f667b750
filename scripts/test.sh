#!/usr/bin/env bash
# Sets everything up (venv, packages, Chromium) and runs the whole test suite, end-to-end tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
. .venv/bin/activate
python -m pytest -q -ra "$@"
