"""Multi-tensor AdamW step and gradient statistics in Triton.

The decisions behind this file:

- Multi-tensor: one launch covers every tensor of a class (param dtype, grad
  dtype, master or not, aligned or not) in a parameter group.  The host builds
  a table of raw tensor addresses (param, exp_avg, exp_avg_sq, max_exp_avg_sq,
  master; the gradients' in a table of their own) and a table of chunks
  (tensor index, first element); each program loads its row, turns the
  addresses into typed pointers and streams its chunk: one read and one write
  of each parameter, moment and master, one read of each gradient.
- 16-byte vectors (2026-12): a table's addresses tell the compiler nothing, so
  the loads were scalar.  Tensors whose every address is a multiple of 16 bytes
  and whose size is a multiple of VECTOR_ELEMENTS form the aligned class, whose
  kernel states both facts (``tl.multiple_of``) and compiles to 128-bit loads
  and stores; the others (views at odd offsets, odd sizes) take the scalar
  class.  The AOT check asserts the 128-bit loads.
- The launch plan (classes and tables) is cached across steps, keyed on the
  identities of the params and their optimizer state (weakly referenced: the
  death of one drops the plan, so an id is never reused under it), checked per
  step against the params' addresses (``p.data = ...`` moves them) and the
  gradients' signature (dtype, layout, alignment).  Gradients are new tensors
  every step: their address table is re-uploaded only for a set of addresses
  not seen in the last few steps.  A steady loop rebuilds nothing.
- No host synchronisation in a step, so it can be captured in a CUDA graph.
  The bias corrections are computed the way torch.optim.AdamW computes them
  (float64 powers of the betas, rounded to fp32) on the device from the
  per-parameter ``step`` tensors, so parameters frozen for a while get their
  own.  A tensor lr or betas reaches the kernel as a pointer it loads (a float
  as a plain argument), after the same host-free arithmetic torch applies to
  it.  The update follows torch's single-tensor order of operations (decay,
  lerp, addcmul, sqrt/bc2 + eps, addcdiv) so fp32 results agree to rounding.
- ``found_inf`` (a device scalar) makes every program return before touching
  anything, and the steps do not advance: a skipped step leaves all state
  bitwise unchanged.
- No autotuning: the kernels update their operands in place, and the
  autotuner would apply the update once per timing run.  One block shape,
  streaming 8-16 bytes per element.
- The gradient-statistics pass (sum of squares and a non-finite count per
  chunk, optionally unscaling in place) gives the global norm for clipping and
  the inf/NaN flag for skipping before the update runs; the host adds the
  per-chunk partials on the device.
"""

from __future__ import annotations

import numbers
import operator
import weakref
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from opt_core.kernels import dispatch
from opt_core.kernels import reference

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Elements per program, and per inner iteration of a program.  Small under the
# interpreter so CPU tests cross chunk and block boundaries at small sizes.
CHUNK = 4096 if dispatch.INTERPRET else 65536
BLOCK = 512 if dispatch.INTERPRET else 2048
NUM_WARPS = 8
# Columns of the address table of the tensors a step keeps (the gradients, new every step, have their
# own table).
_P, _M, _V, _VMAX, _MASTER = (tl.constexpr(i) for i in range(5))
_COLUMNS = tl.constexpr(5)
# The aligned class: every address a multiple of 16 bytes and every size a multiple of this many elements
# (16 bytes of fp16/bf16), so every load and store is a 16-byte vector.
VECTOR_ELEMENTS = 8
# Whether aligned tensors take the 16-byte vector class ("auto") or every tensor the scalar one ("off":
# the A/B baseline, today's loads).
VECTOR_LOADS = "auto"
VECTOR_LOADS_MODES = ("auto", "off")

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


# --------------------------------------------------------------------------- kernels
@triton.jit
def _hyperparameter(x):
    # A float argument, or a pointer to a 0-d fp32 device tensor (from a tensor lr or betas): read on
    # the device, so the host never waits for the value.  Which one is known at compile time (under
    # the interpreter a float argument stays a Python float, without a dtype).
    if hasattr(x, "dtype") and x.dtype.is_ptr():
        value = tl.load(x)
    else:
        value = x
    return value


@triton.jit
def _pointer(addr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """A table address as a DTYPE pointer.  In the aligned class the host checked that every address is a
    multiple of 16 bytes; a raw address tells the compiler nothing, and without the hint it emits one
    scalar load per element instead of 16-byte vectors."""
    ptr = addr.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _chunk(NUMELS, CHUNKS, pid, ALIGNED: tl.constexpr, CHUNK_SIZE: tl.constexpr):
    """(tensor index, first element, tensor size) of this program's chunk.  In the aligned class sizes
    are multiples of VECTOR_ELEMENTS (host-checked), so the bounds mask is constant over each vector.
    The kernels loop over min(CHUNK_SIZE, what is left of the tensor): a small tensor's program does not
    walk a whole chunk of masked blocks."""
    t = tl.load(CHUNKS + 2 * pid)
    start = tl.multiple_of(tl.load(CHUNKS + 2 * pid + 1), CHUNK_SIZE)
    n = tl.load(NUMELS + t)
    if ALIGNED:
        n = tl.multiple_of(n, 8)  # VECTOR_ELEMENTS
    return t, start, n


@triton.jit
def adamw_kernel(
    ADDRS, GRAD_ADDRS, NUMELS, CHUNKS, STEP_SIZE, BC2_SQRT,
    INV_SCALE, CLIP_COEF, FOUND_INF,
    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
    HAS_MASTER: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_INV_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_FOUND_INF: tl.constexpr, ALIGNED: tl.constexpr,
    CHUNK_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    if HAS_FOUND_INF:
        if tl.load(FOUND_INF) != 0:
            return
    t, start, n = _chunk(NUMELS, CHUNKS, tl.program_id(0), ALIGNED, CHUNK_SIZE)
    row = ADDRS + t * _COLUMNS
    p_ptr = _pointer(tl.load(row + _P), P_DTYPE, ALIGNED)
    g_ptr = _pointer(tl.load(GRAD_ADDRS + t), G_DTYPE, ALIGNED)
    m_ptr = _pointer(tl.load(row + _M), tl.float32, ALIGNED)
    v_ptr = _pointer(tl.load(row + _V), tl.float32, ALIGNED)
    if HAS_MASTER:
        w_ptr = _pointer(tl.load(row + _MASTER), tl.float32, ALIGNED)
    if AMSGRAD:
        vmax_ptr = _pointer(tl.load(row + _VMAX), tl.float32, ALIGNED)
    step_size = tl.load(STEP_SIZE + t)
    bc2_sqrt = tl.load(BC2_SQRT + t)
    if HAS_INV_SCALE:
        inv_scale = tl.load(INV_SCALE)
    if HAS_CLIP:
        clip = tl.load(CLIP_COEF)
    weight_factor = _hyperparameter(decay)
    b1 = _hyperparameter(beta1)
    lerp_weight = _hyperparameter(one_minus_beta1)
    b2 = _hyperparameter(beta2)
    one_minus_b2 = _hyperparameter(one_minus_beta2)

    for i in range(0, tl.minimum(n - start, CHUNK_SIZE), BLOCK_SIZE):
        offs = start + i + tl.arange(0, BLOCK_SIZE)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_INV_SCALE:
            g = g * inv_scale
        if HAS_CLIP:
            g = g * clip
        if MAXIMIZE:
            g = -g
        if HAS_MASTER:
            p = tl.load(w_ptr + offs, mask=mask, other=0.0)
        else:
            p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)

        p = p * weight_factor
        # torch's lerp_: start + w * (end - start) for w < 0.5, else end - (end - start) * (1 - w)
        m = tl.where(lerp_weight < 0.5, m + lerp_weight * (g - m), g - (g - m) * b1)
        v = v * b2 + (one_minus_b2 * g) * g
        if AMSGRAD:
            vmax = tl.maximum(tl.load(vmax_ptr + offs, mask=mask, other=0.0), v,
                              propagate_nan=tl.PropagateNan.ALL)
            tl.store(vmax_ptr + offs, vmax, mask=mask)
            denom = tl.sqrt(vmax) / bc2_sqrt + eps
        else:
            denom = tl.sqrt(v) / bc2_sqrt + eps
        p = p + (-step_size) * (m / denom)

        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        if HAS_MASTER:
            tl.store(w_ptr + offs, p, mask=mask)
        tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)


@triton.jit
def grad_stats_kernel(
    GRAD_ADDRS, NUMELS, CHUNKS, INV_SCALE, SUMSQ, NONFINITE,
    G_DTYPE: tl.constexpr, HAS_INV_SCALE: tl.constexpr, UNSCALE_IN_PLACE: tl.constexpr, ALIGNED: tl.constexpr,
    CHUNK_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    # Per chunk: sum of squares of the (unscaled) gradient, and how many raw
    # values are inf/NaN (checked before unscaling, as GradScaler does).
    pid = tl.program_id(0)
    t, start, n = _chunk(NUMELS, CHUNKS, pid, ALIGNED, CHUNK_SIZE)
    g_ptr = _pointer(tl.load(GRAD_ADDRS + t), G_DTYPE, ALIGNED)
    if HAS_INV_SCALE:
        inv_scale = tl.load(INV_SCALE)
    acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    bad = tl.zeros([BLOCK_SIZE], dtype=tl.int32)
    for i in range(0, tl.minimum(n - start, CHUNK_SIZE), BLOCK_SIZE):
        offs = start + i + tl.arange(0, BLOCK_SIZE)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        bad += ((g != g) | (tl.abs(g) == float("inf"))).to(tl.int32)
        if HAS_INV_SCALE:
            g = g * inv_scale
            if UNSCALE_IN_PLACE:
                tl.store(g_ptr + offs, g.to(G_DTYPE), mask=mask)
        acc += g * g
    tl.store(SUMSQ + pid, tl.sum(acc, axis=0))
    tl.store(NONFINITE + pid, tl.sum(bad, axis=0))


# --------------------------------------------------------------------------- tables
def _upload(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """``values`` as an int64 tensor on ``device``.  On a GPU from pinned memory without blocking: no host
    sync, and the caching host allocator does not reuse the block before the copy ends."""
    host = torch.tensor(list(values) or [0], dtype=torch.int64)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class _Chunks:
    """A launch's grid: per tensor its size, per CHUNK-element chunk its (tensor, first element)."""

    def __init__(self, numels: Sequence[int], device: torch.device):
        chunks = [(t, s) for t, n in enumerate(numels) for s in range(0, n, CHUNK)]
        self.count = len(chunks)
        self.numels = _upload(numels, device)
        self.chunks = _upload([x for c in chunks for x in c], device)


class _Addresses:
    """The address table of a list of tensors, uploaded only for a set of addresses not seen lately:
    gradients freed by ``zero_grad`` come back at the addresses of a step or two ago."""

    RECENT = 4

    def __init__(self, device: torch.device):
        self.device = device
        self.recent: dict[tuple, torch.Tensor] = {}

    def __call__(self, ptrs: tuple) -> torch.Tensor:
        table = self.recent.pop(ptrs, None)
        if table is None:
            table = _upload(ptrs, self.device)
            if len(self.recent) >= self.RECENT:
                self.recent.pop(next(iter(self.recent)))
        self.recent[ptrs] = table  # the most recent last
        return table


def _ptr(t: Optional[torch.Tensor]) -> int:
    return t.data_ptr() if t is not None else 0


def _grad_signature(grads: Sequence[torch.Tensor]) -> tuple[tuple, tuple]:
    """(addresses, (dtype, contiguous, 16-byte aligned) per gradient): what a plan depends on of the gradients,
    which are new tensors every step."""
    ptrs = tuple(map(torch.Tensor.data_ptr, grads))
    facts = tuple(zip(map(operator.attrgetter("dtype"), grads), map(torch.Tensor.is_contiguous, grads),
                      (p % 16 == 0 for p in ptrs)))
    return ptrs, facts


class _Launch:
    """One adamw_kernel launch of a plan: the positions of its tensors in the step's lists, the kernel's
    flags, and the tables of what persists across steps (sizes, chunks, addresses of params, moments and
    masters, in the order of the _P ... _MASTER columns)."""

    def __init__(self, idx: list[int], columns: Sequence[Sequence[Optional[torch.Tensor]]], flags: dict,
                 device: torch.device):
        self.idx = idx
        self.flags = flags
        self.chunks = _Chunks([columns[_P][i].numel() for i in idx], device)
        self.addrs = _upload([_ptr(column[i]) for i in idx for column in columns], device)
        self.grad_addrs = _Addresses(device)


class _Plan:
    """How adamw_step runs one set of tensors: one kernel launch per (param dtype, grad dtype, master,
    aligned) class, and the positions the reference takes (strided tensors, fp64, no interpreter on a CPU).

    Built from the params and their optimizer state, which persist across steps, and the gradients'
    signature; reused while the same objects come back (the cache key is their ids, and weak references
    drop the plan when one of them dies, so an id is never reused under it), the params' storage has not
    moved (``p.data = ...``) and the gradients have the same signature.  Per step it costs a few C-level
    passes over the lists, not a rebuild of the tables."""

    def __init__(self, key: tuple, columns: Sequence[Sequence[Optional[torch.Tensor]]], grads, device):
        self.key = key
        self.param_ptrs = tuple(map(torch.Tensor.data_ptr, columns[_P]))
        self.grad_facts = _grad_signature(grads)[1]
        self.refs = [weakref.ref(t, self._expire) for column in columns for t in column if t is not None]
        classes: dict[tuple, list[int]] = {}
        for i, (g, row) in enumerate(zip(grads, zip(*columns))):
            classes.setdefault(_class_of(row, g), []).append(i)
        self.reference = classes.pop(None, [])
        self.launches = [_Launch(idx, columns, dict(zip(_CLASS_FLAGS, cls)), device)
                         for cls, idx in classes.items()]

    def _expire(self, _ref) -> None:
        if _PLANS.get(self.key) is self:
            del _PLANS[self.key]

    def fits(self, params: Sequence[torch.Tensor], grad_facts: tuple) -> bool:
        return grad_facts == self.grad_facts and tuple(map(torch.Tensor.data_ptr, params)) == self.param_ptrs


_CLASS_FLAGS = ("P_DTYPE", "G_DTYPE", "HAS_MASTER", "ALIGNED")


def _class_of(row: tuple, g: torch.Tensor) -> Optional[tuple]:
    """The kernel class (values of _CLASS_FLAGS) of one parameter's tensors (row: param, moments, vmax,
    master), or None where the reference runs it: the kernel walks each tensor as one flat block."""
    p = row[_P]
    tensors = (*row, g)
    if not (all(t is None or t.is_contiguous() for t in tensors) and dispatch.use_triton(p, KERNEL_DTYPES)
            and g.dtype in KERNEL_DTYPES):
        return None
    aligned = (VECTOR_LOADS == "auto" and p.numel() % VECTOR_ELEMENTS == 0
               and all(t is None or t.data_ptr() % 16 == 0 for t in tensors))
    return TL_DTYPES[p.dtype], TL_DTYPES[g.dtype], row[_MASTER] is not None, aligned


def _check_vector_loads() -> None:
    if VECTOR_LOADS not in VECTOR_LOADS_MODES:
        raise ValueError(f"opt_core.kernels.adamw.VECTOR_LOADS must be one of {VECTOR_LOADS_MODES}, "
                         f"got {VECTOR_LOADS!r}")


_PLANS: dict[tuple, _Plan] = {}
_PLANS_SIZE = 16


def _plan(columns: Sequence[Sequence[Optional[torch.Tensor]]], grads: Sequence[torch.Tensor],
          device: torch.device) -> tuple[_Plan, tuple]:
    """(the plan for these tensors, the gradients' addresses), cached across steps.  The key holds the
    switches too: under ``dispatch.reference_backend()`` the same tensors take the reference."""
    _check_vector_loads()
    key = (device, dispatch.forced_path(), VECTOR_LOADS, *(tuple(map(id, column)) for column in columns))
    ptrs, facts = _grad_signature(grads)
    plan = _PLANS.get(key)
    if plan is None or not plan.fits(columns[_P], facts):
        if plan is None and len(_PLANS) >= _PLANS_SIZE:
            _PLANS.pop(next(iter(_PLANS)))
        plan = _PLANS[key] = _Plan(key, columns, grads, device)
    return plan, ptrs


# grad_stats: per (device, dtype, alignment, sizes) the grid and the recent address tables.
_GRAD_TABLES: dict[tuple, tuple[_Chunks, _Addresses]] = {}
_GRAD_TABLES_SIZE = 64


def _grad_tables(key: tuple, grads: Sequence[torch.Tensor], device: torch.device) -> tuple[_Chunks, torch.Tensor]:
    tables = _GRAD_TABLES.get(key)
    if tables is None:
        if len(_GRAD_TABLES) >= _GRAD_TABLES_SIZE:
            _GRAD_TABLES.pop(next(iter(_GRAD_TABLES)))
        tables = _GRAD_TABLES[key] = (_Chunks(key[-1], device), _Addresses(device))
    chunks, addresses = tables
    return chunks, addresses(tuple(map(torch.Tensor.data_ptr, grads)))


def _none(n):
    return [None] * n


# --------------------------------------------------------------------------- public functions
def check_lists(params, grads, **others):
    n = len(params)
    for name, lst in (("grads", grads), *others.items()):
        if lst is not None and len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} tensors but params has {n}")
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.shape != g.shape:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)} but params[{i}] has {tuple(p.shape)}")
        if p.device != params[0].device or g.device != params[0].device:
            raise ValueError(f"params[{i}]/grads[{i}] are on {p.device}/{g.device}, params[0] on {params[0].device}: "
                             "one call takes tensors of one device")
        if g.is_sparse:
            raise ValueError(f"grads[{i}] is sparse; AdamW here takes dense gradients only")


def check_hyperparameters(lr, beta1, beta2, eps, weight_decay) -> None:
    """lr and betas: real numbers, or 1-element floating-point tensors as torch.optim.AdamW takes them;
    eps and weight_decay: real numbers."""
    for name, value in (("lr", lr), ("beta1", beta1), ("beta2", beta2)):
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or not value.is_floating_point():
                raise ValueError(f"{name} as a tensor must have 1 floating-point element, got shape "
                                 f"{tuple(value.shape)} and dtype {value.dtype}")
        elif isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a float or a 1-element tensor, got {type(value).__name__}")
    for name, value in (("eps", eps), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")


def _on_device(value, device: torch.device, dtype: torch.dtype):
    """A tensor hyper-parameter as a 0-d ``dtype`` tensor on ``device`` (no host read); a number as it is."""
    if isinstance(value, torch.Tensor):
        return value.reshape(()).to(device=device, dtype=dtype, non_blocking=True)
    return value


def kernel_hyperparameters(lr, beta1, beta2, weight_decay: float, device: torch.device) -> tuple:
    """(decay, beta1, 1 - beta1, beta2, 1 - beta2) as the kernel takes them: floats, or fp32 device scalars
    where lr or a beta is a tensor, computed as torch's single-tensor step computes them (a tensor ``1 - beta1``
    after the cast to the moments' fp32, ``1 - beta2`` before it)."""
    decay = _on_device(1.0 - lr * weight_decay, device, torch.float32)
    b1 = _on_device(beta1, device, torch.float32)
    return (decay, b1, 1.0 - b1, _on_device(beta2, device, torch.float32),
            _on_device(1.0 - beta2, device, torch.float32))


def _bias_corrections(steps: list[torch.Tensor], lr, beta1, beta2, device: torch.device
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tensor, on the device: lr / (1 - beta1^t) and sqrt(1 - beta2^t) for its next step t.

    As torch computes them from float hyper-parameters: float64 powers, fp32 results (a tensor beta
    enters at the value it holds)."""
    t = torch.stack(steps).to(torch.float64) + 1
    b1, b2, lr = (_on_device(x, device, torch.float64) for x in (beta1, beta2, lr))
    return (lr / (1 - b1 ** t)).to(torch.float32), (1 - b2 ** t).sqrt().to(torch.float32)


@torch.no_grad()
def adamw_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    beta1: float | torch.Tensor,
    beta2: float | torch.Tensor,
    eps: float,
    weight_decay: float,
    max_exp_avg_sqs: Optional[Sequence[torch.Tensor]] = None,
    masters: Optional[Sequence[Optional[torch.Tensor]]] = None,
    maximize: bool = False,
    inv_scale: Optional[torch.Tensor] = None,
    clip_coef: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    """One AdamW step (torch.optim.AdamW's maths) over lists of tensors, in place, with no host sync.

    Moments (and masters) are fp32; params and grads fp32/fp16/bf16.  ``steps``
    are 0-d fp32 tensors on the params' device, advanced by one unless
    ``found_inf`` (a 0-d tensor) is non-zero, in which case nothing changes.
    ``lr``, ``beta1`` and ``beta2`` are floats or 1-element tensors (read on
    the device; best kept on the params' device, else copied there each call).
    ``inv_scale`` and ``clip_coef`` (0-d fp32) multiply the gradient first.
    With ``masters`` the update runs on the fp32 master and the param gets its
    rounded copy; without, low-precision params are upcast, stepped in fp32 and
    rounded back (the memory-efficient recipe).
    """
    if not params:
        return
    check_lists(params, grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, steps=steps,
                 max_exp_avg_sqs=max_exp_avg_sqs, masters=masters)
    check_hyperparameters(lr, beta1, beta2, eps, weight_decay)
    device = params[0].device
    amsgrad = max_exp_avg_sqs is not None
    masters = list(masters) if masters is not None else _none(len(params))
    vmaxes = list(max_exp_avg_sqs) if amsgrad else _none(len(params))
    plan, grad_ptrs = _plan((params, exp_avgs, exp_avg_sqs, vmaxes, masters), grads, device)
    steps = list(steps)
    if plan.reference:
        pick = lambda lst: [lst[i] for i in plan.reference]  # noqa: E731
        reference.adamw_step(pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), pick(steps),
                             lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                             max_exp_avg_sqs=pick(vmaxes) if amsgrad else None, masters=pick(masters),
                             maximize=maximize, inv_scale=inv_scale, clip_coef=clip_coef, found_inf=found_inf,
                             advance_steps=False)
    if plan.launches:
        decay, b1, one_minus_b1, b2, one_minus_b2 = kernel_hyperparameters(lr, beta1, beta2, weight_decay, device)
    for launch in plan.launches:
        step_size, bc2_sqrt = _bias_corrections([steps[i] for i in launch.idx], lr, beta1, beta2, device)
        with dispatch.device_guard(params[0]):
            adamw_kernel[(launch.chunks.count,)](
                launch.addrs, launch.grad_addrs(tuple(grad_ptrs[i] for i in launch.idx)),
                launch.chunks.numels, launch.chunks.chunks, step_size, bc2_sqrt,
                inv_scale, clip_coef, found_inf,
                decay, b1, one_minus_b1, b2, one_minus_b2, eps,
                AMSGRAD=amsgrad, MAXIMIZE=maximize, HAS_INV_SCALE=inv_scale is not None,
                HAS_CLIP=clip_coef is not None, HAS_FOUND_INF=found_inf is not None,
                CHUNK_SIZE=CHUNK, BLOCK_SIZE=BLOCK, num_warps=NUM_WARPS, **launch.flags,
            )
    if found_inf is None:
        torch._foreach_add_(list(steps), 1.0)
    else:
        torch._foreach_add_(list(steps), (found_inf == 0).to(torch.float32))


@torch.no_grad()
def grad_stats(
    grads: Sequence[torch.Tensor],
    *,
    inv_scale: Optional[torch.Tensor] = None,
    unscale_in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of squares of the unscaled grads, count of non-finite raw values), fp32 0-d device tensors.

    With ``unscale_in_place`` the grads are also multiplied by ``inv_scale`` in
    the same pass (what ``GradScaler.unscale_`` does).  Non-finite values are
    counted before unscaling.
    """
    if not grads:
        raise ValueError("grad_stats needs at least one gradient")
    device = grads[0].device
    for i, g in enumerate(grads):
        if g.device != device:
            raise ValueError(f"grads[{i}] is on {g.device} but grads[0] is on {device}")
    if unscale_in_place and inv_scale is None:
        raise ValueError("unscale_in_place needs inv_scale")
    _check_vector_loads()
    sumsq, bad = [], []
    classes: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        kernel = g.is_contiguous() and dispatch.use_triton(g, KERNEL_DTYPES)
        aligned = kernel and VECTOR_LOADS == "auto" and g.numel() % VECTOR_ELEMENTS == 0 and g.data_ptr() % 16 == 0
        classes.setdefault((kernel, g.dtype, aligned), []).append(g)
    for (use_kernel, g_dtype, aligned), gs in classes.items():
        if not use_kernel:
            s, b = reference.grad_stats(gs, inv_scale=inv_scale, unscale_in_place=unscale_in_place)
            sumsq.append(s.reshape(1))
            bad.append(b.reshape(1))
            continue
        chunks, grad_addrs = _grad_tables((device, g_dtype, aligned, tuple(g.numel() for g in gs)), gs, device)
        part_sumsq = dispatch.empty((chunks.count,), dtype=torch.float32, device=device)
        part_bad = dispatch.empty((chunks.count,), dtype=torch.int32, device=device)
        with dispatch.device_guard(gs[0]):
            grad_stats_kernel[(chunks.count,)](
                grad_addrs, chunks.numels, chunks.chunks, inv_scale, part_sumsq, part_bad,
                G_DTYPE=TL_DTYPES[g_dtype], HAS_INV_SCALE=inv_scale is not None,
                UNSCALE_IN_PLACE=unscale_in_place, ALIGNED=aligned, CHUNK_SIZE=CHUNK, BLOCK_SIZE=BLOCK,
                num_warps=NUM_WARPS,
            )
        sumsq.append(part_sumsq.sum().reshape(1))
        bad.append(part_bad.sum().to(torch.float32).reshape(1))
    return torch.cat(sumsq).sum(), torch.cat(bad).sum()

