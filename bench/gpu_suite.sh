#!/usr/bin/env bash
# The one prepared run for a lent GPU (the device tool): about 6 minutes on one H200.
#   1. python -m bench: every op checked against float64 (bf16 included) and timed against its
#      peers, then the training-step MFU run; results written after each op to $OUT (default
#      runs/gpu) as <date>-<gpu>.{json,md}: copy them to bench/results/ and commit them.
#   2. the tests marked gpu, with the time that is left.
# The device machine has python3 with torch, triton, pytest and transformers, no network: nothing
# comes from a registry; this checkout is installed editable into that python (offline, no build
# isolation, no dependencies), so `opt_core.kernels` / `opt_core.dist` map onto kernels/ and dist/.
# Edit the timeouts to fit the lease.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . || { echo "install failed"; exit 1; }
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/nvidia-smi.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

timeout "${BENCH_TIMEOUT:-330}" "$PY" -m bench --out "$OUT" "$@" > "$OUT/bench.log" 2>&1
echo "bench exit: $?"
grep -E "comparisons pass|FAIL|^[a-z_]+: [0-9]+s$" "$OUT/bench.log"

timeout "${TEST_TIMEOUT:-150}" "$PY" -m pytest -q -m gpu -p no:cacheprovider -x tests > "$OUT/gpu-tests.log" 2>&1
echo "gpu tests exit: $?"
tail -15 "$OUT/gpu-tests.log"
# The tables last: the device tool returns the end of the output.
sed -n '/^| op /,$p' "$OUT"/*.md | cut -c1-180 | tail -60
