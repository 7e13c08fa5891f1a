"""pytest-benchmark entry (``pytest bench --benchmark-only``): same switch as the tests."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
