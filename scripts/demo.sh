#!/usr/bin/env bash
# Sets nbguard up in .venv and runs the demo: train, crash (SIGKILL), resume, compare.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
nbguard demo "$@"
