#!/usr/bin/env bash
# The whole test suite: set up .venv if needed, then pytest (CPU: the kernels run
# under Triton's interpreter; GPU: compiled, plus the tests marked gpu).
# Without a GPU the interpreted kernels keep a core busy each: pytest-xdist runs one
# worker per core, a file's tests on one worker (its module fixtures are built once).
# numpy's OpenBLAS (the interpreter's dots) would start a thread per core in every
# worker; one thread each keeps the workers from fighting over the cores.
# Arguments come after, so `-n 0` runs everything in this process.
source "$(dirname "$0")/setup_env.sh"
cd "$ROOT"
workers=()
if "$PY" -c "import xdist, torch, sys; sys.exit(torch.cuda.is_available())" 2>/dev/null; then
  workers=(-n auto --dist loadfile)
  export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
fi
exec "$PY" -m pytest "${workers[@]}" "$@"
