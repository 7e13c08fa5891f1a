"""Where an op runs, decided in one place for every op.

Three paths:

- the Triton kernels: CUDA tensors, and CPU tensors under Triton's interpreter when
  ``TRITON_INTERPRET=1`` was set before Triton was imported (that is how CI tests the kernels);
- the native path (``kernels/native.py``): plain PyTorch with plain autograd (SDPA,
  ``F.layer_norm``, ``F.linear``/ReLU and dropout from torch's generator), for the kernels' dtypes
  where no kernel runs, i.e. a CPU without the interpreter.  The public op calls it directly, no
  custom op in between;
- the reference path: the custom ops' plain-PyTorch direction (``kernels/reference.py``, the float64
  oracle), for the dtypes the kernels do not take (float64 keeps it everywhere: it is the oracle's
  dtype), and for every op inside ``reference_backend()``.

``use_triton`` chooses inside a custom op (kernel or reference), ``use_native`` in the public
function (native, or the custom op).  Two switches force a path for tests: ``reference_backend()``
(the custom ops' reference paths, kernels' dtypes included) and ``native_backend()`` (the native
path for every dtype, under the interpreter too); inside either, the ops that have no native version
(``adamw_step``, ``grad_stats``) take their reference paths.

The interpreter switch is read once, at import: ``triton.jit`` turns every kernel
into an interpreted function or a compiled one at decoration time, so changing
the variable later would not change what the kernels are.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Callable, Iterator, Sequence

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

if INTERPRET:
    from opt_core.kernels import interpreter_fixes

    interpreter_fixes.apply()

_FORCED_PATH: str | None = None  # None, "reference" or "native": the switches below
_POISON_OUTPUTS = os.environ.get("OPT_CORE_POISON_OUTPUTS", "0") not in ("", "0")


def use_triton(x: torch.Tensor, dtypes: Sequence[torch.dtype]) -> bool:
    """True when an op on ``x`` should launch its Triton kernel."""
    if _FORCED_PATH is not None or x.dtype not in dtypes:
        return False
    if x.device.type == "cuda":
        return True
    return x.device.type == "cpu" and INTERPRET


def use_native(x: torch.Tensor, dtypes: Sequence[torch.dtype]) -> bool:
    """True when the public op on ``x`` should run ``kernels/native.py`` (plain PyTorch and autograd)
    instead of its custom op."""
    if _FORCED_PATH is not None:
        return _FORCED_PATH == "native"
    if x.dtype not in dtypes:
        return False
    return x.device.type == "cpu" and not INTERPRET


def forced_path() -> str | None:
    """The path a switch below forces now ("reference", "native"), or None (the automatic choice): part
    of the key of anything cached per path (FusedAdamW's launch plans)."""
    return _FORCED_PATH


@contextlib.contextmanager
def _forced_path(path: str | None) -> Iterator[None]:
    global _FORCED_PATH
    previous, _FORCED_PATH = _FORCED_PATH, path
    try:
        yield
    finally:
        _FORCED_PATH = previous


def reference_backend(enabled: bool = True) -> contextlib.AbstractContextManager:
    """Run every op on its custom op's ``kernels/reference.py`` path inside the block (``enabled=False``:
    the automatic choice again, inside an outer switch)."""
    return _forced_path("reference" if enabled else None)


def native_backend(enabled: bool = True) -> contextlib.AbstractContextManager:
    """Run every op on its native path (``kernels/native.py``) inside the block, every dtype and the
    interpreter included (``enabled=False``: the automatic choice again, inside an outer switch)."""
    return _forced_path("native" if enabled else None)


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Fill every buffer an op allocates with NaN (or -1 for integers) first.

    Tests run with this on, so an element a kernel forgets to write shows up as
    NaN instead of as whatever the allocator happened to hand back.
    """
    global _POISON_OUTPUTS
    previous, _POISON_OUTPUTS = _POISON_OUTPUTS, enabled
    try:
        yield
    finally:
        _POISON_OUTPUTS = previous


def empty(shape: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for op outputs; poisoned when ``poison_outputs`` is on."""
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    if _POISON_OUTPUTS:
        out.fill_(math.nan if dtype.is_floating_point else -1)
    return out


def reference_vjp(
    fn: Callable[..., torch.Tensor],
    primals: Sequence[torch.Tensor | None],
    cotangent: torch.Tensor,
) -> list[torch.Tensor | None]:
    """Gradients of ``fn(*primals)`` for ``cotangent``; None where a primal is None.

    The fallback path differentiates the plain-PyTorch forward instead of
    carrying a second, hand-written backward that could drift from it.  It
    uses ``torch.func.vjp`` because it runs inside a custom op, below the
    autograd dispatch key, where ``torch.autograd.grad`` sees no graph.
    """
    present = [i for i, p in enumerate(primals) if p is not None]

    def of_present(*tensors):
        args = list(primals)
        for i, t in zip(present, tensors):
            args[i] = t
        return fn(*args)

    _, vjp = torch.func.vjp(of_present, *(primals[i] for i in present))
    grads = vjp(cotangent)
    result: list[torch.Tensor | None] = [None] * len(primals)
    for i, g in zip(present, grads):
        result[i] = g
    return result


def device_guard(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on ``x``'s GPU even when another one is current (Triton launches
    on the current device and cannot read memory of another)."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on ``device``; a small fixed count elsewhere
    (the interpreter runs programs one after another)."""
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4


# TMA (sm_90's tensor memory accelerator): kernels with a descriptor path read a module switch,
# "auto": on GPUs that have TMA, "on": there and under the interpreter (how the CPU tests run the
# descriptor path), "off": nowhere (A/B measurements).
TMA_MODES = ("auto", "on", "off")
TMA_DTYPES = (torch.float16, torch.bfloat16)


def tma_enabled(mode: str, x: torch.Tensor, switch: str) -> bool:
    """Whether a kernel whose switch ``switch`` is set to ``mode`` takes its TMA path for operands like ``x``:
    fp16/bf16 only (fp32 multiplies on the FMA units with its operands in registers)."""
    if mode not in TMA_MODES:
        raise ValueError(f"{switch} must be one of {TMA_MODES}, got {mode!r}")
    if mode == "off" or x.dtype not in TMA_DTYPES:
        return False
    if x.device.type == "cuda":
        return torch.cuda.get_device_capability(x.device)[0] >= 9
    return mode == "on" and INTERPRET


def tma_aligned(t: torch.Tensor, contiguous_dim: int = -1) -> bool:
    """TMA's layout rules for a descriptor over ``t`` with unit stride along ``contiguous_dim``: no empty
    axis, a 16-byte aligned base, and every other stride a multiple of 16 bytes."""
    if t.numel() == 0 or t.stride(contiguous_dim) != 1 or t.data_ptr() % 16:
        return False
    other = [s for i, s in enumerate(t.stride()) if i != contiguous_dim % t.dim()]
    return all(s * t.element_size() % 16 == 0 for s in other)
