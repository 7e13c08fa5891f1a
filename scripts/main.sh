#!/usr/bin/env bash
# The main job: set up .venv if needed, then check every kernel against float64
# and benchmark it against its peers on whatever device is present.
source "$(dirname "$0")/setup_env.sh"
cd "$ROOT"
exec "$PY" -m bench "$@"
