"""AdamW and gradient statistics as hand-written CUDA C++ (``kernels/cuda/``), no Triton JIT.

``adamw_step`` and ``grad_stats`` here take the arguments of ``opt_core.kernels.adamw``'s functions
and keep their semantics (torch.optim.AdamW's maths, both weight recipes, fused unscale and clipping,
``found_inf`` skipping without a host sync); lr and the betas may also be 0-d device tensors, read on
the device.  Tensors the kernels do not take (CPU, fp64, non-contiguous) run ``kernels/reference.py``.

Two loaders launch the same ``.cu`` sources:

- ``library``: ``libopt_core_cuda.so`` built by the top-level ``CMakeLists.txt``, through ctypes; found
  at ``$OPT_CORE_CUDA_LIB``, else at ``build/cuda/libopt_core_cuda.so`` in this checkout.
- ``cupy``: CuPy's ``RawModule`` compiles the sources with NVRTC at run time.

``$OPT_CORE_CUDA_LOADER`` (``library`` or ``cupy``) picks one; by default the library when it is
there, else CuPy.  Both launch on PyTorch's current stream of the tensors' device.

Design record (newest last):
2026-12-01  The host side is shared by both loaders: a launch is (kernel name, grid, arguments), the
            arguments raw addresses and numbers in the order of the kernel's signature (``KERNELS``);
            the library's ``<kernel>_launch`` C functions take the same list after (device, stream,
            grid).
2026-12-01  One launch table per tensor list (``kernels/cuda/table.cuh``): a row of addresses, size,
            dtype codes and a 16-byte-alignment flag per tensor, then (tensor, first element) per
            chunk of ``CHUNK`` elements.  Dtypes and recipes are per row, so one AdamW launch covers a
            whole call whatever mix of fp32/fp16/bf16 params, grads and masters it holds.  Tables are
            cached by their content, so a steady training loop (the same tensors every step) builds
            and uploads nothing.
2026-12-01  The CuPy loader hands NVRTC each ``.cu`` file with its headers inlined, so CuPy's
            compile cache (keyed by the source text) sees a header change.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from opt_core.kernels import adamw, dispatch, reference

SOURCE_DIR = Path(__file__).resolve().parent / "cuda"
DEFAULT_LIBRARY = Path(__file__).resolve().parents[1] / "build" / "cuda" / "libopt_core_cuda.so"
BUILD_COMMAND = "cmake -S . -B build/cuda && cmake --build build/cuda -j2"
CUPY_INSTALL = "pip install cupy-cuda13x"

# The launch table's layout; the same names in the same order as the structs of kernels/cuda/table.cuh.
ROW_FIELDS = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master", "step", "numel",
              "param_dtype", "grad_dtype", "vectorized")
ADDRESS_FIELDS = ROW_FIELDS[:7]
CHUNK_FIELDS = ("tensor", "start")
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
NO_PARAM = -1
THREADS = 512          # kThreads of table.cuh
VECTOR_ELEMS = 8       # kVec of numeric.cuh: elements a thread moves per vector step
VECTOR_BYTES = 16      # a row is vectorized when all its tensors start on this boundary
CHUNK = 65536          # elements per block, a multiple of VECTOR_ELEMS so chunks keep the alignment

# kernel -> (source file, kinds of its arguments): ptr (device address, 0 for null), i64, i32, f64.
KERNELS = {
    "opt_core_adamw_step": ("adamw.cu", (
        "ptr", "ptr", "i64",                   # rows, chunks, chunk_elems
        "ptr", "ptr", "ptr",                   # found_inf, inv_scale, clip_coef
        "ptr", "ptr", "ptr",                   # lr_tensor, beta1_tensor, beta2_tensor (fp64)
        "ptr", "ptr", "ptr",                   # decay_tensor, one_minus_beta1_tensor, one_minus_beta2_tensor (fp32)
        "f64", "f64", "f64", "f64", "f64",     # lr, beta1, beta2, eps, weight_decay
        "i32")),                               # maximize
    "opt_core_grad_stats_partials": ("grad_stats.cu", (
        "ptr", "ptr", "i64", "ptr", "i32",     # rows, chunks, chunk_elems, inv_scale, unscale_in_place
        "ptr", "ptr")),                        # partial_sumsq, partial_nonfinite
    "opt_core_grad_stats_finish": ("grad_stats.cu", (
        "ptr", "ptr", "i64",                   # partial_sumsq, partial_nonfinite, num_partials
        "ptr", "ptr")),                        # sumsq, nonfinite
}
MAX_GRID = 2 ** 31 - 1

Number = Union[float, torch.Tensor]


class BackendUnavailable(RuntimeError):
    """Neither loader can run: the library is not built and CuPy is not installed."""


# --------------------------------------------------------------------------- launch tables
def tensor_row(*, grad: torch.Tensor, param: Optional[torch.Tensor] = None,
               exp_avg: Optional[torch.Tensor] = None, exp_avg_sq: Optional[torch.Tensor] = None,
               max_exp_avg_sq: Optional[torch.Tensor] = None, master: Optional[torch.Tensor] = None,
               step: Optional[torch.Tensor] = None) -> tuple[int, ...]:
    """One TensorRow: addresses in ADDRESS_FIELDS order (0 where absent), then numel, dtype codes and
    whether every streamed address is 16-byte aligned (so whole chunks move in 16-byte vectors)."""
    streamed = (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master)
    addresses = tuple(t.data_ptr() if t is not None else 0 for t in (*streamed, step))
    vectorized = all(a % VECTOR_BYTES == 0 for a in addresses[:len(streamed)])  # the step is one scalar read
    param_dtype = DTYPE_CODES[param.dtype] if param is not None else NO_PARAM
    return (*addresses, grad.numel(), param_dtype, DTYPE_CODES[grad.dtype], int(vectorized))


def chunk_rows(numels: Sequence[int], chunk: int) -> list[tuple[int, int]]:
    """(tensor index, first element) of every chunk; an empty tensor has none."""
    return [(t, start) for t, n in enumerate(numels) for start in range(0, n, chunk)]


class Table:
    """The launch table of one list of rows, uploaded once to their device: rows, then chunks."""

    def __init__(self, rows: Sequence[tuple[int, ...]], device: torch.device, chunk: int):
        if chunk <= 0 or chunk % VECTOR_ELEMS:
            raise ValueError(f"chunk must be a positive multiple of {VECTOR_ELEMS} elements, got {chunk}")
        self.rows = list(rows)
        self.chunk_elems = chunk
        self.chunks = chunk_rows([r[ROW_FIELDS.index("numel")] for r in self.rows], chunk)
        words = [w for r in self.rows for w in r] + [w for c in self.chunks for w in c]
        self.buffer = _upload(words, device)
        self.rows_address = self.buffer.data_ptr()
        self.chunks_address = self.rows_address + self.buffer.element_size() * len(ROW_FIELDS) * len(self.rows)

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)


def _upload(words: list[int], device: torch.device) -> torch.Tensor:
    host = torch.tensor(words, dtype=torch.int64)
    if device.type != "cuda":
        return host.to(device)
    # Pinned + non_blocking: no host sync; the caching host allocator keeps the block until the copy ends.
    return host.pin_memory().to(device, non_blocking=True)


_TABLES: dict[tuple, Table] = {}
_TABLE_CACHE_SIZE = 64


def table_for(rows: Sequence[tuple[int, ...]], device: torch.device) -> Table:
    """The cached Table of these rows (their content is the key: same tensors, same table)."""
    key = (device, CHUNK, tuple(rows))
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) >= _TABLE_CACHE_SIZE:
            _TABLES.pop(next(iter(_TABLES)))
        table = _TABLES[key] = Table(rows, device, CHUNK)
    return table


# --------------------------------------------------------------------------- loaders
@dataclass(frozen=True)
class Launch:
    kernel: str
    grid: int
    args: tuple


_CTYPES = {"ptr": ctypes.c_void_p, "i64": ctypes.c_longlong, "i32": ctypes.c_int, "f64": ctypes.c_double}


class _LibraryLoader:
    """libopt_core_cuda.so through ctypes: ``<kernel>_launch(device, stream, grid, *args)``."""

    name = "library"

    def __init__(self, path: Path):
        self.path = path
        self._lib = ctypes.CDLL(str(path))
        words = (self._lib.opt_core_cuda_row_words(), self._lib.opt_core_cuda_chunk_words())
        if words != (len(ROW_FIELDS), len(CHUNK_FIELDS)):
            raise BackendUnavailable(f"{path} has a table of {words} words per (row, chunk), this module builds "
                                     f"{(len(ROW_FIELDS), len(CHUNK_FIELDS))}: a stale build; run {BUILD_COMMAND}")
        self._lib.opt_core_cuda_error_string.restype = ctypes.c_char_p
        self._functions = {}
        for kernel, (_, kinds) in KERNELS.items():
            fn = getattr(self._lib, f"{kernel}_launch")
            fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, *(_CTYPES[k] for k in kinds)]
            fn.restype = ctypes.c_int
            self._functions[kernel] = fn

    def launch(self, launch: Launch, device_index: int, stream: int) -> None:
        error = self._functions[launch.kernel](device_index, stream, launch.grid, *launch.args)
        if error:
            message = self._lib.opt_core_cuda_error_string(error).decode()
            raise RuntimeError(f"{launch.kernel} failed to launch: CUDA error {error} ({message})")


class _CupyLoader:
    """CuPy's RawModule: NVRTC compiles each source once per device (CuPy caches the binaries)."""

    name = "cupy"

    def __init__(self):
        import cupy
        import numpy

        missing = sorted(s for s, _ in KERNELS.values() if not (SOURCE_DIR / s).is_file())
        if missing:
            raise BackendUnavailable(f"the CUDA sources {missing} are not in {SOURCE_DIR}: run from an opt-core "
                                     "checkout (or an install that ships kernels/cuda)")
        self._cupy = cupy
        self._numpy_types = {"ptr": numpy.uint64, "i64": numpy.int64, "i32": numpy.int32, "f64": numpy.float64}
        self._modules = {source: cupy.RawModule(code=source_with_headers(source), options=("--std=c++17",))
                         for source in {s for s, _ in KERNELS.values()}}

    def launch(self, launch: Launch, device_index: int, stream: int) -> None:
        source, kinds = KERNELS[launch.kernel]
        args = tuple(self._numpy_types[k](v) for k, v in zip(kinds, launch.args))
        with self._cupy.cuda.Device(device_index), self._cupy.cuda.ExternalStream(stream, device_index):
            self._modules[source].get_function(launch.kernel)((launch.grid,), (THREADS,), args)


_INCLUDE = re.compile(r'^#include "(\w+\.cuh)"\s*$', re.MULTILINE)
_PRAGMA_ONCE = re.compile(r"^#pragma once\s*$", re.MULTILINE)


def source_with_headers(source: str) -> str:
    """A ``kernels/cuda`` source with its local headers inlined (each once), as one text for NVRTC."""
    seen: set[str] = set()

    def inline(match: re.Match) -> str:
        header = match.group(1)
        if header in seen:
            return ""
        seen.add(header)
        return _INCLUDE.sub(inline, _PRAGMA_ONCE.sub("", (SOURCE_DIR / header).read_text()))

    return _INCLUDE.sub(inline, (SOURCE_DIR / source).read_text())


def library_path() -> Path:
    return Path(os.environ.get("OPT_CORE_CUDA_LIB") or DEFAULT_LIBRARY)


@functools.lru_cache(maxsize=None)
def _library(path: Path) -> _LibraryLoader:
    return _LibraryLoader(path)


@functools.lru_cache(maxsize=None)
def _cupy_loader() -> _CupyLoader:
    return _CupyLoader()


def loader(name: Optional[str] = None) -> Union[_LibraryLoader, _CupyLoader]:
    """The loader ``name`` (``library`` or ``cupy``; default ``$OPT_CORE_CUDA_LOADER``, else the library
    when built, else CuPy).  Raises BackendUnavailable saying what is missing and how to get it."""
    name = name or os.environ.get("OPT_CORE_CUDA_LOADER") or None
    if name not in (None, "library", "cupy"):
        raise ValueError(f"loader must be 'library' or 'cupy', got {name!r}")
    path = library_path()
    if name != "cupy":
        if path.is_file():
            return _library(path)
        if name == "library" or os.environ.get("OPT_CORE_CUDA_LIB"):
            raise BackendUnavailable(f"no CUDA library at {path}: build it with `{BUILD_COMMAND}` in the opt-core "
                                     "checkout, or point OPT_CORE_CUDA_LIB at a built libopt_core_cuda.so")
    try:
        return _cupy_loader()
    except ImportError as e:
        built = "" if name == "cupy" else f"the library is not built ({path} is missing) and "
        raise BackendUnavailable(
            f"the CUDA C++ backend needs its kernels: {built}CuPy is not installed ({e}). Build the library with "
            f"`{BUILD_COMMAND}` in the opt-core checkout, or install CuPy: `{CUPY_INSTALL}`") from e


def _runs_kernels(grad: torch.Tensor) -> bool:
    """CUDA tensors of the kernels' dtypes, unless ``dispatch.reference_backend()`` is on."""
    return grad.is_cuda and dispatch.use_triton(grad, adamw.KERNEL_DTYPES)


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _run(launch: Launch, device: torch.device) -> None:
    """Launch on PyTorch's current stream of ``device``, where the launch's tensors are."""
    if launch.grid == 0:
        return
    if launch.grid > MAX_GRID:
        raise ValueError(f"{launch.kernel} needs {launch.grid} blocks, more than CUDA's {MAX_GRID}")
    loader().launch(launch, device.index or 0, _stream(device))


# --------------------------------------------------------------------------- public functions
def _address(t: Optional[torch.Tensor]) -> int:
    return t.data_ptr() if t is not None else 0


def _check_scalar(name: str, t: Optional[torch.Tensor]) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a 0-d tensor or None, got {type(t).__name__}")
    if t.numel() != 1:
        raise ValueError(f"{name} must hold one value, got shape {tuple(t.shape)}")


def _on_device(t: Optional[torch.Tensor], device: torch.device, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A one-value tensor as a 0-d ``dtype`` tensor on ``device`` (itself when it already is one)."""
    return None if t is None else t.to(device=device, dtype=dtype).reshape(())


def _hyper(x: Number, device: torch.device) -> tuple[Optional[torch.Tensor], float]:
    """(0-d fp64 device tensor or None, number): what the kernel reads for lr, beta1 or beta2."""
    if isinstance(x, torch.Tensor):
        return _on_device(x, device, torch.float64), 0.0
    return None, float(x)


def _tensor_or_none(x) -> Optional[torch.Tensor]:
    return x if isinstance(x, torch.Tensor) else None


def _kernel_takes(tensors: dict[str, Optional[torch.Tensor]]) -> bool:
    """True when one tensor's AdamW (or grad_stats) operands suit the kernels: on the grad's CUDA
    device, contiguous, params and grads fp32/fp16/bf16, state and masters fp32, the step a one-value
    fp32 tensor."""
    grad = tensors["grad"]
    device = grad.device
    if not _runs_kernels(grad):
        return False
    for field, t in tensors.items():
        if t is None:
            continue
        wanted = adamw.KERNEL_DTYPES if field in ("param", "grad") else (torch.float32,)
        if t.device != device or t.dtype not in wanted or not t.is_contiguous():
            return False
        if field == "step" and t.numel() != 1:
            return False
    return True


def _columns(params, grads, exp_avgs, exp_avg_sqs, steps, max_exp_avg_sqs, masters) -> dict[str, list]:
    n = len(params)
    return dict(param=list(params), grad=list(grads), exp_avg=list(exp_avgs), exp_avg_sq=list(exp_avg_sqs),
                max_exp_avg_sq=list(max_exp_avg_sqs) if max_exp_avg_sqs is not None else [None] * n,
                master=list(masters) if masters is not None else [None] * n, step=list(steps))


@torch.no_grad()
def adamw_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    *,
    lr: Number,
    beta1: Number,
    beta2: Number,
    eps: float,
    weight_decay: float,
    max_exp_avg_sqs: Optional[Sequence[torch.Tensor]] = None,
    masters: Optional[Sequence[Optional[torch.Tensor]]] = None,
    maximize: bool = False,
    inv_scale: Optional[torch.Tensor] = None,
    clip_coef: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    """``opt_core.kernels.adamw.adamw_step`` in CUDA C++: one launch for every kernel-eligible tensor.

    lr, beta1 and beta2 are numbers or one-value tensors, read on the device (no host sync).
    """
    if not params:
        return
    adamw.check_lists(params, grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, steps=steps,
                       max_exp_avg_sqs=max_exp_avg_sqs, masters=masters)
    adamw.check_hyperparameters(lr, beta1, beta2, eps, weight_decay)
    for name, t in (("inv_scale", inv_scale), ("clip_coef", clip_coef), ("found_inf", found_inf)):
        _check_scalar(name, t)
    columns = _columns(params, grads, exp_avgs, exp_avg_sqs, steps, max_exp_avg_sqs, masters)
    taken = [i for i in range(len(params)) if _kernel_takes({f: c[i] for f, c in columns.items()})]
    rest = sorted(set(range(len(params))) - set(taken))
    if taken:  # first: a missing loader raises before any tensor has changed
        device = params[taken[0]].device
        rows = [tensor_row(**{f: c[i] for f, c in columns.items()}) for i in taken]
        _launch_adamw(table_for(rows, device), device, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                      weight_decay=weight_decay, maximize=maximize, inv_scale=inv_scale, clip_coef=clip_coef,
                      found_inf=found_inf)
    if rest:
        pick = {f: [c[i] for i in rest] for f, c in columns.items()}
        reference.adamw_step(pick["param"], pick["grad"], pick["exp_avg"], pick["exp_avg_sq"], pick["step"],
                             lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                             max_exp_avg_sqs=pick["max_exp_avg_sq"] if max_exp_avg_sqs is not None else None,
                             masters=pick["master"], maximize=maximize, inv_scale=inv_scale, clip_coef=clip_coef,
                             found_inf=found_inf, advance_steps=False)
    if found_inf is None:
        torch._foreach_add_(list(steps), 1.0)
    else:
        torch._foreach_add_(list(steps), (found_inf == 0).to(torch.float32))


def _launch_adamw(table: Table, device: torch.device, *, lr, beta1, beta2, eps, weight_decay, maximize,
                  inv_scale, clip_coef, found_inf) -> None:
    # The device tensors made here stay referenced until the launch is queued: freed earlier, their
    # memory could be handed to the next allocation and rewritten before the kernel reads it.
    flags = [_on_device(t, device, torch.float32) for t in (found_inf, inv_scale, clip_coef)]
    hyper = [_hyper(x, device) for x in (lr, beta1, beta2)]
    # The update's fp32 coefficients from a tensor lr or beta, at the precision torch (and the Triton
    # path) computes them; None where the kernel computes them from the numbers.
    decay, _, one_minus_beta1, _, one_minus_beta2 = adamw.kernel_hyperparameters(lr, beta1, beta2, weight_decay,
                                                                                  device)
    derived = [_tensor_or_none(x) for x in (decay, one_minus_beta1, one_minus_beta2)]
    args = (table.rows_address, table.chunks_address, table.chunk_elems,
            *(_address(t) for t in flags), *(_address(t) for t, _ in hyper), *(_address(t) for t in derived),
            *(v for _, v in hyper), float(eps), float(weight_decay), int(maximize))
    _run(Launch("opt_core_adamw_step", table.num_chunks, args), device)


@torch.no_grad()
def grad_stats(
    grads: Sequence[torch.Tensor],
    *,
    inv_scale: Optional[torch.Tensor] = None,
    unscale_in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``opt_core.kernels.adamw.grad_stats`` in CUDA C++: (sum of squares of the unscaled grads, count of
    non-finite raw values) as 0-d fp32 device tensors, in two launches for every kernel-eligible grad."""
    if not grads:
        raise ValueError("grad_stats needs at least one gradient")
    device = grads[0].device
    for i, g in enumerate(grads):
        if g.device != device:
            raise ValueError(f"grads[{i}] is on {g.device} but grads[0] is on {device}")
    _check_scalar("inv_scale", inv_scale)
    if unscale_in_place and inv_scale is None:
        raise ValueError("unscale_in_place needs inv_scale")
    takes = [_kernel_takes({"grad": g}) for g in grads]
    taken = [g for g, k in zip(grads, takes) if k]
    rest = [g for g, k in zip(grads, takes) if not k]
    parts = []
    if taken:  # first: a missing loader raises before any gradient is unscaled
        table = table_for([tensor_row(grad=g) for g in taken], device)
        parts.append(_launch_grad_stats(table, device, _on_device(inv_scale, device, torch.float32),
                                        unscale_in_place))
    if rest:
        parts.append(reference.grad_stats(rest, inv_scale=inv_scale, unscale_in_place=unscale_in_place))
    if len(parts) == 1:
        return parts[0]
    return torch.stack([s for s, _ in parts]).sum(), torch.stack([b for _, b in parts]).sum()


def _launch_grad_stats(table: Table, device: torch.device, inv_scale: Optional[torch.Tensor],
                       unscale_in_place: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n = table.num_chunks
    partial_sumsq = dispatch.empty((max(n, 1),), dtype=torch.float32, device=device)
    partial_nonfinite = dispatch.empty((max(n, 1),), dtype=torch.int32, device=device)  # unsigned in the kernel
    sumsq = dispatch.empty((), dtype=torch.float32, device=device)
    nonfinite = dispatch.empty((), dtype=torch.float32, device=device)
    _run(Launch("opt_core_grad_stats_partials", n,
                (table.rows_address, table.chunks_address, table.chunk_elems, _address(inv_scale),
                 int(unscale_in_place), partial_sumsq.data_ptr(), partial_nonfinite.data_ptr())), device)
    _run(Launch("opt_core_grad_stats_finish", 1,
                (partial_sumsq.data_ptr(), partial_nonfinite.data_ptr(), n, sumsq.data_ptr(), nonfinite.data_ptr())),
         device)
    return sumsq, nonfinite
