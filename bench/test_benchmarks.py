"""The bench cases under pytest-benchmark, for those who use it.

``pytest bench --benchmark-only`` times every provider of every case with
pytest-benchmark's wall-clock timer (each call synchronised on a GPU, so it
includes launch overhead); ``python -m bench`` is the device-timed suite with
bandwidth fractions and peer ratios.  On the CPU the kernels are interpreted
and the timings are not kernel timings.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from bench.harness import OPS
from bench.harness import Lazy

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = [c for op in OPS for c in importlib.import_module(f"bench.{op}").cases(DEVICE, quick=True)]


@pytest.mark.parametrize(
    "case, provider",
    [(c, p) for c in CASES for p in c.providers],
    ids=[f"{c.op}-{c.shape}-{c.mode}-{p}" for c in CASES for p in c.providers],
)
def test_bench(benchmark, case, provider):
    pytest.importorskip("pytest_benchmark")
    fn = case.providers[provider]
    if isinstance(fn, Lazy):
        fn = fn.build()

    def call():
        for t in case.grad_to_none:
            t.grad = None
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{case.op} {case.shape} {case.dtype} {case.mode}"
    benchmark.extra_info.update(bytes=case.bytes, baseline=case.baseline)
    benchmark.pedantic(call, warmup_rounds=1, rounds=3 if DEVICE.type == "cpu" else 50)
