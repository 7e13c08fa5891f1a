#!/usr/bin/env bash
# The test suite on the CPU under the GPU machine's package versions (the device library's KINDS.md:
# Python 3.12, torch 2.11.0, transformers 5.17.0, Triton 3.6), in its own venv ($OPT_CORE_VENV, default
# .venv-device), so that a torch or Python difference shows up here and not in a short GPU lease.
# numpy stays below 2.4 for the interpreter (the GPU machine has 2.5, which only compiled kernels meet).
# Needs the network or a local index for the torch 2.11.0 wheel (about 530 MB) and its CUDA libraries.
# Arguments pass through to scripts/test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export OPT_CORE_VENV="${OPT_CORE_VENV:-$ROOT/.venv-device}"
BASE_PY="${PYTHON:-}"
if [ -z "$BASE_PY" ]; then  # a pyenv shim of python3.12 may exist and not run: try it
  for candidate in python3.12 python3; do
    if "$candidate" -c "" 2>/dev/null; then BASE_PY=$candidate; break; fi
  done
fi
[ -x "$OPT_CORE_VENV/bin/python" ] || "$BASE_PY" -m venv "$OPT_CORE_VENV"
if ! "$OPT_CORE_VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__[:6] != '2.11.0')" 2>/dev/null; then
  "$OPT_CORE_VENV/bin/python" -m pip install --disable-pip-version-check -q \
    "torch==2.11.0" "triton==3.6.0" "numpy<2.4" "transformers==5.17.0" "accelerate==1.15.0" \
    "safetensors==0.8.0" "tokenizers==0.23.2"
fi
"$OPT_CORE_VENV/bin/python" -c "import sys, torch, transformers
print('device versions: python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__)"
exec "$ROOT/scripts/test.sh" "$@"
