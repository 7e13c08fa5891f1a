# Sourced by scripts/main.sh and scripts/test.sh: makes .venv ready, then sets $PY.
#
# - A machine that already has torch (a GPU box with its CUDA build) keeps it:
#   the venv sees the system site-packages and nothing torch-related is installed.
# - A machine without torch gets the CPU build, pinned (torch==2.13.0 lies on this
#   kind of machine's disk); an unpinned torch would pull a multi-GB CUDA build.
# - Without CUDA the kernels run under Triton's interpreter: Triton 3.6 (what CI
#   pins, matching the GPU machine) is installed if no Triton is there, and
#   numpy<2.4, which Triton 3.6's interpreter needs (kernels/interpreter_fixes.py).
# The work is skipped when setup.py and this file are unchanged since the last run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${OPT_CORE_VENV:-$ROOT/.venv}"
BASE_PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  if "$BASE_PY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: keeping this machine's torch ($("$BASE_PY" -c 'import torch; print(torch.__version__)'))"
    "$BASE_PY" -m venv --system-site-packages "$VENV"
  else
    "$BASE_PY" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"

stamp="$VENV/.opt-core-setup"
want="$(cat "$ROOT/setup.py" "$ROOT/scripts/setup_env.sh" | cksum)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
  if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: installing torch==2.13.0 (CPU build)"
    pip_install "torch==2.13.0"
  fi
  if ! "$PY" -c "import triton" >/dev/null 2>&1; then
    echo "setup: installing triton==3.6.0"
    pip_install "triton==3.6.0"
  fi
  if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" >/dev/null 2>&1; then
    pip_install "numpy<2.4"
  fi
  # The editable install builds without isolation, from the venv's own setuptools: a Python 3.12+ venv
  # starts without one.
  if ! "$PY" -c "import setuptools" >/dev/null 2>&1; then
    pip_install "setuptools>=70.1"  # 70.1: bdist_wheel built in, no wheel package
  fi
  echo "setup: installing opt-core (editable) with its train, hf and test extras"
  pip_install --no-build-isolation -e "$ROOT[train,hf,test]"
  echo "$want" > "$stamp"
fi
