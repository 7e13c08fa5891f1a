#!/usr/bin/env bash
# The one prepared run for a lent GPU (the device tool): at most 8 minutes on one H200, cold caches
# included.
#
#   bash bench/gpu_suite.sh [--time-left S] [--dry-run] [python -m bench arguments, e.g. --stages table tests]
#
# Time: the script ends within --time-left seconds ($TIME_LEFT; default 480, which fits 8 minutes).
# The install and the packing take their share; `python -m bench` gets the rest as its --budget and
# splits it into stages (smoke, warm-up, goal shapes, profile, the rest of the table, plots, GPU
# tests), each with its own time limit and output files: a stage is stopped at its limit, and one
# that no longer fits is skipped.  A rerun in what is left of a lease names fewer stages, e.g.
# `bash bench/gpu_suite.sh --time-left 240 --stages table`.  `python -m bench --plan` says what a
# run compiles and launches and how long each stage should take.
#
# Output: the run's folder ($RESULTS, default runs/gpu); where the device tool's $OUT is set, at
# most seven files copied into it: <date>-<gpu>.{json,md} (copy to bench/results/), tuned-<gpu>.json
# (copy to kernels/tuned/<gpu>.json), profile-opt-1.3b-<gpu>.json, suite.log, bundle.tar.gz (logs,
# plots, per-stage records) and the profiler trace, gzipped, when it is small enough.
#
# The device machine has python3 with torch, triton, pytest and nvidia-ml-py, no network: nothing
# comes from a registry.  This checkout is installed editable into that python (offline, no build
# isolation, no dependencies), so `opt_core.kernels` / `opt_core.dist` map onto kernels/ and dist/;
# wheels under .whl/ (ignored by git: carry it), such as Liger-Kernel's, go into /tmp/site when present.
# --dry-run runs nothing that needs a GPU: it prints the install, each stage's limit and packs what
# exists (CI runs it so this script cannot rot).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
TIME_LEFT=${TIME_LEFT:-480}
DRY_RUN=0
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --time-left) TIME_LEFT=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
PY=${PYTHON:-python3}
RESULTS=${RESULTS:-runs/gpu}
PACK_S=15  # packing into $OUT, and slack

step() {  # run a command, or in a dry run say it
  if [ "$DRY_RUN" = 1 ]; then echo "dry run: $*"; else "$@"; fi
}

pack() {  # the results into the device tool's $OUT: at most 8 files come back
  if [ -z "${OUT:-}" ]; then echo "results in $RESULTS"; return; fi
  mkdir -p "$OUT"
  local f n=0
  for f in "$RESULTS"/????-??-??-*.json "$RESULTS"/????-??-??-*.md "$RESULTS"/tuned-*.json \
           "$RESULTS"/profile-*.json "$RESULTS"/suite.log; do
    [ -f "$f" ] && cp "$f" "$OUT/" && n=$((n + 1))
  done
  tar -czf "$OUT/bundle.tar.gz" -C "$RESULTS" --exclude='trace-*.json' . && n=$((n + 1))
  for f in "$RESULTS"/trace-*.json; do
    [ -f "$f" ] || continue
    gzip -c "$f" > "$OUT/$(basename "$f").gz"
    if [ "$(stat -c %s "$OUT/$(basename "$f").gz")" -gt 15000000 ]; then
      rm "$OUT/$(basename "$f").gz"; echo "trace $f left out (over 15 MB gzipped)"
    else
      n=$((n + 1))
    fi
  done
  echo "packed $n files into $OUT"
}

step "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . || { echo "install failed"; exit 1; }
if ls .whl/*.whl > /dev/null 2>&1; then
  step "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p "$RESULTS"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,power.draw,temperature.gpu \
    --format=csv | tee "$RESULTS/nvidia-smi.txt"
fi
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

BUDGET=$((TIME_LEFT - (SECONDS - START) - PACK_S))
if [ "$BUDGET" -lt 60 ]; then
  echo "only ${BUDGET} s left for the suite: nothing run"
  exit 1
fi
BENCH=("$PY" -m bench --budget "$BUDGET" --out "$RESULTS" ${ARGS[@]+"${ARGS[@]}"})
if [ "$DRY_RUN" = 1 ]; then
  "${BENCH[@]}" --dry-run
  status=$?
else
  # The suite stops itself within its budget; this is the backstop.
  timeout --kill-after=10 $((BUDGET + 20)) "${BENCH[@]}" 2>&1 | tee "$RESULTS/suite.log"
  status=${PIPESTATUS[0]}
fi
echo "bench exit: $status"
pack
exit "$status"
