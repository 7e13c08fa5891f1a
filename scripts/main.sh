#!/usr/bin/env bash
# The main job: set up .venv if needed, then train a small OPT model on the
# Python standard library's own source (no download): data preparation, training
# with the paper's recipe, validation loss, a sample, the loss curve and
# checkpoints in a fresh runs/demo-N (each run its own folder; --resume continues
# the newest).  Arguments pass through to python -m opt_core.train (--help lists them).
source "$(dirname "$0")/setup_env.sh"
cd "$ROOT"
exec "$PY" -m opt_core.train "$@"
