#!/usr/bin/env bash
# The whole test suite: set up .venv if needed, then pytest (CPU: the kernels run
# under Triton's interpreter; GPU: compiled, plus the tests marked gpu).
source "$(dirname "$0")/setup_env.sh"
cd "$ROOT"
exec "$PY" -m pytest "$@"
