"""Multi-tensor AdamW step and gradient statistics in Triton.

The decisions behind this file:

- Multi-tensor: one launch covers every tensor of a dtype class in a parameter
  group.  The host builds a table of raw tensor addresses (param, grad,
  exp_avg, exp_avg_sq, max_exp_avg_sq, master) and a table of chunks (tensor
  index, first element); each program loads its row, turns the addresses into
  typed pointers and streams its chunk: one read and one write of each
  parameter, moment and master, one read of each gradient.  Tables are cached
  per address tuple, so a steady training loop (same tensors every step)
  uploads nothing.
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
# Columns of the address table.
_P, _G, _M, _V, _VMAX, _MASTER = range(6)
_COLUMNS = 6

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
def adamw_kernel(
    ADDRS, NUMELS, CHUNKS, STEP_SIZE, BC2_SQRT,
    INV_SCALE, CLIP_COEF, FOUND_INF,
    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
    HAS_MASTER: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_INV_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    CHUNK_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    if HAS_FOUND_INF:
        if tl.load(FOUND_INF) != 0:
            return
    pid = tl.program_id(0)
    t = tl.load(CHUNKS + 2 * pid)
    start = tl.load(CHUNKS + 2 * pid + 1)
    n = tl.load(NUMELS + t)
    row = ADDRS + t * 6
    p_ptr = tl.load(row + 0).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(G_DTYPE))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
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

    for i in range(0, CHUNK_SIZE, BLOCK_SIZE):
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
            w_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
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
            vmax_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
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
    ADDRS, NUMELS, CHUNKS, INV_SCALE, SUMSQ, NONFINITE,
    G_DTYPE: tl.constexpr, HAS_INV_SCALE: tl.constexpr, UNSCALE_IN_PLACE: tl.constexpr,
    CHUNK_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    # Per chunk: sum of squares of the (unscaled) gradient, and how many raw
    # values are inf/NaN (checked before unscaling, as GradScaler does).
    pid = tl.program_id(0)
    t = tl.load(CHUNKS + 2 * pid)
    start = tl.load(CHUNKS + 2 * pid + 1)
    n = tl.load(NUMELS + t)
    g_ptr = tl.load(ADDRS + t * 6 + 1).to(tl.pointer_type(G_DTYPE))
    if HAS_INV_SCALE:
        inv_scale = tl.load(INV_SCALE)
    acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    bad = tl.zeros([BLOCK_SIZE], dtype=tl.int32)
    for i in range(0, CHUNK_SIZE, BLOCK_SIZE):
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
class _Tables:
    """Address, size and chunk tables for one launch, on the tensors' device."""

    def __init__(self, rows: list[list[int]], numels: list[int], device: torch.device):
        chunks = [(t, s) for t, n in enumerate(numels) for s in range(0, n, CHUNK)]
        self.num_chunks = len(chunks)
        pin = device.type == "cuda"

        def upload(values, shape):
            host = torch.tensor(values, dtype=torch.int64).reshape(shape)
            if pin:  # pinned + non_blocking: no host sync, and the block is not reused before the copy ends
                host = host.pin_memory()
            return host.to(device, non_blocking=pin)

        self.addrs = upload([a for r in rows for a in r], (len(rows), _COLUMNS))
        self.numels = upload(numels, (len(numels),))
        self.chunks = upload([x for c in chunks for x in c] or [0, 0], (max(1, len(chunks)), 2))


_TABLE_CACHE: dict[tuple, _Tables] = {}
_TABLE_CACHE_SIZE = 64


def _tables(columns: Sequence[Sequence[Optional[torch.Tensor]]], device: torch.device) -> _Tables:
    rows = [[t.data_ptr() if t is not None else 0 for t in row] for row in zip(*columns)]
    numels = [row[_P].numel() for row in zip(*columns)]
    key = (device, tuple(a for r in rows for a in r), tuple(numels))
    tables = _TABLE_CACHE.get(key)
    if tables is None:
        if len(_TABLE_CACHE) >= _TABLE_CACHE_SIZE:
            _TABLE_CACHE.pop(next(iter(_TABLE_CACHE)))
        tables = _TABLE_CACHE[key] = _Tables(rows, numels, device)
    return tables


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

    classes: dict[tuple, list[int]] = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        # The kernel walks each tensor as one flat block; other layouts take the reference.
        dense = all(t is None or t.is_contiguous()
                    for t in (p, g, exp_avgs[i], exp_avg_sqs[i], vmaxes[i], masters[i]))
        use_kernel = dense and dispatch.use_triton(p, KERNEL_DTYPES) and g.dtype in KERNEL_DTYPES
        classes.setdefault((use_kernel, p.dtype, g.dtype, masters[i] is not None), []).append(i)
    for (use_kernel, p_dtype, g_dtype, has_master), idx in classes.items():
        pick = lambda lst: [lst[i] for i in idx]  # noqa: E731
        if not use_kernel:
            reference.adamw_step(pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), pick(list(steps)),
                                 lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                                 max_exp_avg_sqs=pick(vmaxes) if amsgrad else None, masters=pick(masters),
                                 maximize=maximize, inv_scale=inv_scale, clip_coef=clip_coef, found_inf=found_inf,
                                 advance_steps=False)
            continue
        tables = _tables([pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), pick(vmaxes), pick(masters)],
                         device)
        step_size, bc2_sqrt = _bias_corrections(pick(list(steps)), lr, beta1, beta2, device)
        decay, b1, one_minus_b1, b2, one_minus_b2 = kernel_hyperparameters(lr, beta1, beta2, weight_decay, device)
        with dispatch.device_guard(params[0]):
            adamw_kernel[(tables.num_chunks,)](
                tables.addrs, tables.numels, tables.chunks, step_size, bc2_sqrt,
                inv_scale, clip_coef, found_inf,
                decay, b1, one_minus_b1, b2, one_minus_b2, eps,
                P_DTYPE=TL_DTYPES[p_dtype], G_DTYPE=TL_DTYPES[g_dtype],
                HAS_MASTER=has_master, AMSGRAD=amsgrad, MAXIMIZE=maximize,
                HAS_INV_SCALE=inv_scale is not None, HAS_CLIP=clip_coef is not None,
                HAS_FOUND_INF=found_inf is not None,
                CHUNK_SIZE=CHUNK, BLOCK_SIZE=BLOCK, num_warps=NUM_WARPS,
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
    sumsq, bad = [], []
    classes: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        classes.setdefault((g.is_contiguous() and dispatch.use_triton(g, KERNEL_DTYPES), g.dtype), []).append(g)
    for (use_kernel, g_dtype), gs in classes.items():
        if not use_kernel:
            s, b = reference.grad_stats(gs, inv_scale=inv_scale, unscale_in_place=unscale_in_place)
            sumsq.append(s.reshape(1))
            bad.append(b.reshape(1))
            continue
        n = len(gs)
        tables = _tables([gs, gs, _none(n), _none(n), _none(n), _none(n)], device)  # sizes come from column 0
        part_sumsq = dispatch.empty((tables.num_chunks,), dtype=torch.float32, device=device)
        part_bad = dispatch.empty((tables.num_chunks,), dtype=torch.int32, device=device)
        with dispatch.device_guard(gs[0]):
            grad_stats_kernel[(tables.num_chunks,)](
                tables.addrs, tables.numels, tables.chunks, inv_scale, part_sumsq, part_bad,
                G_DTYPE=TL_DTYPES[g_dtype], HAS_INV_SCALE=inv_scale is not None,
                UNSCALE_IN_PLACE=unscale_in_place, CHUNK_SIZE=CHUNK, BLOCK_SIZE=BLOCK, num_warps=NUM_WARPS,
            )
        sumsq.append(part_sumsq[: tables.num_chunks].sum().reshape(1))
        bad.append(part_bad[: tables.num_chunks].sum().to(torch.float32).reshape(1))
    return torch.cat(sumsq).sum(), torch.cat(bad).sum()

