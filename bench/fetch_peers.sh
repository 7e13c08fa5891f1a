#!/usr/bin/env bash
# Downloads the pure-Python benchmark peers the GPU machine lacks (it has no network) into .whl/,
# which git ignores and the device tool carries: run this here, then
#   run(command="bash bench/gpu_suite.sh", timeout_s=540, carry=[".whl"])
# The suite installs .whl/*.whl into /tmp/site there and uses a peer only when it imports.
# Pinned, pure-Python wheels only (the GPU machine runs Python 3.12; these run on any).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "liger-kernel==0.8.5"
ls -l .whl
