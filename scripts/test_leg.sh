#!/usr/bin/env bash
# One extra CI leg: runs the interpreter-dependent tests (marker `interpreter`, see tests/conftest.py)
# under Python X.Y, in its own venv .venv-pyX.Y that is kept and reused between runs.
#   bash scripts/test_leg.sh 3.12 [pytest args...]
# Exit status: 0 passed, 77 skipped (no such interpreter, or no torch wheel for it), else failed.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:?usage: scripts/test_leg.sh X.Y [pytest args...]}
shift
SKIP=77

# The newest working pythonX.Y: the one on PATH, else pyenv's (its shims on PATH fail for versions
# that are installed but not selected, so the interpreter is checked, not just found).
find_python() {
  local root candidate
  root=${PYENV_ROOT:-$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")}
  for candidate in "python$version" $(ls -d "$root"/versions/"$version".*/bin/"python$version" 2>/dev/null | sort -rV); do
    if "$candidate" -c "import sys; sys.exit(f'{sys.version_info[0]}.{sys.version_info[1]}' != '$version')" \
        >/dev/null 2>&1; then
      command -v "$candidate"
      return 0
    fi
  done
  return 1
}

if ! python=$(find_python); then
  echo "leg $version: SKIPPED: no python$version here (neither on PATH nor under pyenv)"
  exit $SKIP
fi

venv=.venv-py$version
log=$venv.install.log
# What the installed venv was made from: re-installing is skipped while this is unchanged.
stamp="$("$python" -VV) $PWD $(cat pyproject.toml "$0" | sha256sum)"
# A venv whose interpreter is gone or is another build (pyenv upgraded it) is made again.
if [ "$("$venv/bin/python" -VV 2>/dev/null)" != "$("$python" -VV)" ]; then
  rm -rf "$venv"
  "$python" -m venv "$venv"
fi
if [ "$(cat "$venv/.installed" 2>/dev/null)" != "$stamp" ]; then
  echo "leg $version: installing torch==2.13.0 and nbguard[dev] into $venv with $python (log: $log)"
  rm -f "$venv/.installed"
  # The same torch as scripts/setup.sh; with no CPU wheel for this Python here, pip takes the
  # index's (CUDA) build, about 2 GB.
  if ! "$venv/bin/python" -m pip install -q torch==2.13.0 >"$log" 2>&1; then
    grep -v '^WARNING: Location' "$log" | tail -n 5
    echo "leg $version: SKIPPED: no torch==2.13.0 wheel installs for Python $version (see $log)"
    exit $SKIP
  fi
  if ! "$venv/bin/python" -m pip install -q -e '.[dev]' >>"$log" 2>&1; then
    grep -v '^WARNING: Location' "$log" | tail -n 20
    echo "leg $version: FAILED: installing nbguard[dev] (see $log)"
    exit 1
  fi
  echo "$stamp" >"$venv/.installed"
fi

# Activated (replacing the main run's .venv): `python` in subprocesses and IPython's venv check see
# this leg's venv; PYTHONPATH makes the kernels the tests spawn import this checkout's nbguard too.
set +u
. "$venv/bin/activate"
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "leg $version: $(python -c 'import sys, importlib.metadata as m; print(sys.version.split()[0], "torch", m.version("torch"))')"
python -m pytest -q -ra -m interpreter "$@"
