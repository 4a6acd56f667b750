#!/usr/bin/env bash
# Sets everything up (venv, packages, Chromium) and runs the whole test suite, end-to-end tests included,
# then the interpreter-dependent tests again under each Python in NBGUARD_LEGS (scripts/test_leg.sh).
# Extra arguments go to the main run's pytest. Exits non-zero if any leg fails; a skipped leg does not.
set -euo pipefail
cd "$(dirname "$0")/.."
legs=${NBGUARD_LEGS-3.12 3.13}
bash scripts/setup.sh --dev
. .venv/bin/activate

summary=() failed=0
log=$(mktemp)
trap 'rm -f "$log"' EXIT
run_leg() {  # name, command...: runs it, timed; records passed / skipped / FAILED and pytest's last line
  local name=$1 start=$SECONDS rc=0 outcome last
  shift
  echo "=== leg $name ==="
  "$@" 2>&1 | tee "$log" || rc=$?
  case $rc in 0) outcome=passed ;; 77) outcome=skipped ;; *) outcome="FAILED (exit $rc)"; failed=1 ;; esac
  last=$(grep -E ' in [0-9.]+s|SKIPPED:|FAILED:' "$log" | tail -n 1 | sed -E 's/^[= ]+|[= ]+$//g') || true
  summary+=("leg $name: $outcome in $((SECONDS - start)) s${last:+ | $last}")
}

main=$(python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
run_leg "$main (all tests)" python -m pytest -q -ra "$@"
for version in $legs; do
  if [ "$version" = "$main" ]; then
    summary+=("leg $version: covered by the main run")
    continue
  fi
  run_leg "$version (-m interpreter)" bash scripts/test_leg.sh "$version"
done
echo "=== summary ==="
printf '%s\n' "${summary[@]}"
exit $failed
