"""LayerNorm over the last dimension, forward and backward, in Triton.

- Forward: one program normalises a [BLOCK_M, BLOCK_N] tile, BLOCK_N the whole row padded to a power
  of two, so x is read once and the fp32 statistics never leave the chip; several rows per program keep
  narrow rows from starving the memory system.
- Residual: ``h = x + residual`` is rounded to x's dtype (the h an unfused model stores and the next
  block reads) and that rounded h is normalised.
- Backward: about two programs per SM, each over a contiguous range of rows, with dW/dB partial sums in
  fp32 registers that the host adds up: no atomics, bitwise repeatable.  Rows wider than
  ``MAX_REGISTER_ROW_BWD`` take the wide kernel, which streams each row twice in ``WIDE_CHUNK`` pieces
  and keeps its partial sums in a scratch row per program (it stays in L2).
- Rows may have any stride, the last dimension's included (an expanded gradient has stride 0).

The reasoning and measurements behind each point: ``docs/kernels.md``, section LayerNorm.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
import triton
import triton.language as tl

from opt_core.kernels import dispatch
from opt_core.kernels import reference
from opt_core.kernels.op_registry import Direction, register_op
from opt_core.kernels.validation import check_float, check_same_device, check_shape, check_tensor

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Widest row the forward keeps in registers (fp32 math): OPT-175B is 12288.
MAX_N = 16384
# Rows up to this width keep the whole row, and dW/dB, in registers in the backward.
MAX_REGISTER_ROW_BWD = 8192
# Chunk of a row the wide backward streams at a time.
WIDE_CHUNK = 4096


# --------------------------------------------------------------------------- configs
def _grid_configs(block_ms, warps):
    return [triton.Config({"BLOCK_M": m}, num_warps=w) for m in block_ms for w in warps]


FWD_CONFIGS = _grid_configs((1, 2, 4, 8, 16), (1, 2, 4, 8, 16, 32))
BWD_CONFIGS = _grid_configs((1, 2, 4, 8, 16), (1, 2, 4, 8, 16, 32))
BWD_WIDE_CONFIGS = _grid_configs((1, 2, 4), (4, 8, 16))


def _fitting_configs(configs, block_n, max_tile, lo, hi):
    """Configs whose [BLOCK_M, block_n] tile fits ``max_tile`` elements with
    ``lo``..``hi`` elements per thread; for tiny rows, the biggest tile that fits."""
    def tile(c):
        return c.kwargs["BLOCK_M"] * block_n

    fits = [c for c in configs if tile(c) <= max_tile]
    kept = [c for c in fits if lo <= tile(c) / (32 * c.num_warps) <= hi]
    return kept or [max(fits, key=lambda c: (tile(c), -c.num_warps))]


def prune_fwd_configs(configs, nargs, **kwargs):
    return _fitting_configs(configs, kwargs["BLOCK_N"], max_tile=16384, lo=8, hi=32)


def prune_bwd_configs(configs, nargs, **kwargs):
    # Multi-row tiles stop at 2048 elements: beside the tile the backward keeps
    # two accumulator rows live, and [4, 1024] at 16 warps spills on sm_80.
    block_n = kwargs["BLOCK_N"]
    return _fitting_configs(configs, block_n, max_tile=max(2048, block_n), lo=4, hi=16)


def prune_bwd_wide_configs(configs, nargs, **kwargs):
    return _fitting_configs(configs, kwargs["CHUNK"], max_tile=8192, lo=4, hi=16)


def _for_launch(configs):
    # Under the interpreter the autotuner would time every config in numpy; one
    # multi-row config exercises the row masking and is all a CPU test needs.
    if dispatch.INTERPRET:
        return [triton.Config({"BLOCK_M": 2}, num_warps=4)]
    return configs


# --------------------------------------------------------------------------- kernels
@triton.jit
def fwd_kernel(
    X, RES, W, B, Y, H, MEAN, RSTD,
    stride_xm, stride_xn, stride_rm, stride_rn,
    M, N, eps,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    r = rows.to(tl.int64)[:, None]
    c = cols[None, :]

    x = tl.load(X + r * stride_xm + c * stride_xn, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x += tl.load(RES + r * stride_rm + c * stride_rn, mask=mask, other=0.0).to(tl.float32)
        h = x.to(H.dtype.element_ty)
        tl.store(H + r * N + c, h, mask=mask)
        x = h.to(tl.float32)

    mean = tl.sum(x, axis=1) / N
    centred = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)

    y = centred * rstd[:, None]
    if HAS_W:
        y *= tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + r * N + c, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def bwd_kernel(
    X, W, DY, DH, DX, DW_PART, DB_PART, MEAN, RSTD,
    stride_xm, stride_xn, stride_dym, stride_dyn, stride_dhm, stride_dhn,
    M, N, rows_per_program,
    HAS_DH: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    c = cols[None, :]
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)

    row_start = pid * rows_per_program
    row_end = row_start + rows_per_program
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = (rows < row_end) & (rows < M)
        mask = row_ok[:, None] & col_ok[None, :]
        r = rows.to(tl.int64)[:, None]

        x = tl.load(X + r * stride_xm + c * stride_xn, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(DY + r * stride_dym + c * stride_dyn, mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            dw += tl.sum(dy * xhat, axis=0)
        if HAS_B:
            db += tl.sum(dy, axis=0)
        if HAS_W:
            dy = dy * w[None, :]
        c1 = tl.sum(xhat * dy, axis=1) / N
        c2 = tl.sum(dy, axis=1) / N
        dx = (dy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DH:
            dx += tl.load(DH + r * stride_dhm + c * stride_dhn, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + r * N + c, dx.to(DX.dtype.element_ty), mask=mask)

    if HAS_W:
        tl.store(DW_PART + pid * N + cols, dw, mask=col_ok)
    if HAS_B:
        tl.store(DB_PART + pid * N + cols, db, mask=col_ok)


@triton.jit
def bwd_wide_kernel(
    X, W, DY, DH, DX, DW_PART, DB_PART, MEAN, RSTD,
    stride_xm, stride_xn, stride_dym, stride_dyn, stride_dhm, stride_dhn,
    M, N, rows_per_program,
    HAS_DH: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # Same mathematics as bwd_kernel, for rows too wide to hold in
    # registers: pass 1 streams the rows for the two row sums, pass 2 streams
    # them again (from L2) for dx.  The dW/dB partials of this program live in
    # its own rows of DW_PART/DB_PART, which only this program touches: the
    # first row tile stores its sums, later tiles add to them.  Load and store
    # come from the same instructions, so each element is read back by the
    # thread that wrote it (no barrier needed).  The host gives every program
    # at least one row, so every partial row is written.
    pid = tl.program_id(0)
    part = pid.to(tl.int64) * N
    row_start = pid * rows_per_program
    row_end = row_start + rows_per_program
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = (rows < row_end) & (rows < M)
        r = rows.to(tl.int64)[:, None]
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)

        c1 = tl.zeros([BLOCK_M], dtype=tl.float32)
        c2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        for n0 in range(0, N, CHUNK):
            cols = n0 + tl.arange(0, CHUNK)
            col_ok = cols < N
            mask = row_ok[:, None] & col_ok[None, :]
            c = cols[None, :]
            x = tl.load(X + r * stride_xm + c * stride_xn, mask=mask, other=0.0).to(tl.float32)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            wdy = tl.load(DY + r * stride_dym + c * stride_dyn, mask=mask, other=0.0).to(tl.float32)
            if HAS_W:
                wdy *= tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            c1 += tl.sum(xhat * wdy, axis=1)
            c2 += tl.sum(wdy, axis=1)
        c1 = c1 / N
        c2 = c2 / N

        for n0 in range(0, N, CHUNK):
            cols = n0 + tl.arange(0, CHUNK)
            col_ok = cols < N
            mask = row_ok[:, None] & col_ok[None, :]
            c = cols[None, :]
            x = tl.load(X + r * stride_xm + c * stride_xn, mask=mask, other=0.0).to(tl.float32)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            dy = tl.load(DY + r * stride_dym + c * stride_dyn, mask=mask, other=0.0).to(tl.float32)
            accumulate = col_ok & (start > row_start)
            if HAS_W:
                dw = tl.load(DW_PART + part + cols, mask=accumulate, other=0.0)
                tl.store(DW_PART + part + cols, dw + tl.sum(dy * xhat, axis=0), mask=col_ok)
            if HAS_B:
                db = tl.load(DB_PART + part + cols, mask=accumulate, other=0.0)
                tl.store(DB_PART + part + cols, db + tl.sum(dy, axis=0), mask=col_ok)
            if HAS_W:
                dy *= tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            dx = (dy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            if HAS_DH:
                dx += tl.load(DH + r * stride_dhm + c * stride_dhn, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + r * N + c, dx.to(DX.dtype.element_ty), mask=mask)


_fwd = triton.autotune(
    _for_launch(FWD_CONFIGS), key=["BLOCK_N", "HAS_RES"], prune_configs_by={"early_config_prune": prune_fwd_configs}
)(fwd_kernel)
_bwd = triton.autotune(
    _for_launch(BWD_CONFIGS), key=["BLOCK_N", "HAS_DH"], prune_configs_by={"early_config_prune": prune_bwd_configs}
)(bwd_kernel)
_bwd_wide = triton.autotune(
    _for_launch(BWD_WIDE_CONFIGS), key=["N", "HAS_DH"], prune_configs_by={"early_config_prune": prune_bwd_wide_configs}
)(bwd_wide_kernel)


# --------------------------------------------------------------------------- launchers
def _contiguous(t):
    # weight/bias are read as plain vectors; a strided one (a view) is copied.
    return t.contiguous() if t is not None else None


def _launch_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, h, mean, rstd) for 2-D x; h is empty without a residual."""
    M, N = x.shape
    weight, bias = _contiguous(weight), _contiguous(bias)
    y = dispatch.empty((M, N), dtype=x.dtype, device=x.device)
    h = dispatch.empty((M, N) if residual is not None else (0,), dtype=x.dtype, device=x.device)
    mean = dispatch.empty((M,), dtype=torch.float32, device=x.device)
    rstd = dispatch.empty((M,), dtype=torch.float32, device=x.device)
    if M == 0:
        return y, h, mean, rstd
    res = residual if residual is not None else x
    _fwd[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)](
        x, res, weight, bias, y, h, mean, rstd,
        x.stride(0), x.stride(1), res.stride(0), res.stride(1),
        M, N, eps,
        HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_N=triton.next_power_of_2(N),
    )
    return y, h, mean, rstd


def _launch_bwd(dy: Tensor, dh: Optional[Tensor], x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                mean: Tensor, rstd: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); dweight/dbias are empty where weight/bias are None.  eps goes unread: the
    saved mean and rstd hold it."""
    M, N = x.shape
    weight = _contiguous(weight)
    dx = dispatch.empty((M, N), dtype=x.dtype, device=x.device)
    # About two programs per SM, each with a contiguous range of at least one row.
    rows_per_program = max(1, triton.cdiv(M, 2 * dispatch.num_sms(x.device)))
    programs = max(1, triton.cdiv(M, rows_per_program))
    dw_part = dispatch.empty((programs, N) if weight is not None else (0,), dtype=torch.float32, device=x.device)
    db_part = dispatch.empty((programs, N) if bias is not None else (0,), dtype=torch.float32, device=x.device)
    if M > 0:
        dh_ = dh if dh is not None else dy
        args = (
            x, weight, dy, dh_, dx, dw_part, db_part, mean, rstd,
            x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), dh_.stride(0), dh_.stride(1),
            M, N, rows_per_program,
        )
        flags = dict(HAS_DH=dh is not None, HAS_W=weight is not None, HAS_B=bias is not None)
        block_n = triton.next_power_of_2(N)
        if block_n <= MAX_REGISTER_ROW_BWD:
            _bwd[(programs,)](*args, **flags, BLOCK_N=block_n)
        else:
            _bwd_wide[(programs,)](*args, **flags, CHUNK=WIDE_CHUNK)
    else:
        dw_part.zero_()
        db_part.zero_()
    dw = dw_part.sum(0).to(weight.dtype) if weight is not None else x.new_empty(0)
    db = db_part.sum(0).to(bias.dtype) if bias is not None else x.new_empty(0)
    return dx, dw, db


# --------------------------------------------------------------------------- reference path
def _reference_fwd(x, weight, bias, residual, eps):
    out = reference.layer_norm(x, weight, bias, eps, residual)
    y, h = out if residual is not None else (out, x.new_empty(0))
    hf = (h if residual is not None else x).float()
    mean = hf.mean(-1)
    rstd = torch.rsqrt(hf.var(-1, unbiased=False) + eps)
    return y, h, mean, rstd


def _reference_bwd(dy, dh, x, weight, bias, mean, rstd, eps):
    # Differentiates the reference forward (reference_vjp), so the saved mean and rstd go unread.
    dx, dw, db = dispatch.reference_vjp(lambda x_, w_, b_: reference.layer_norm(x_, w_, b_, eps), (x, weight, bias), dy)
    if dh is not None:
        dx = dx + dh
    return dx, dw if dw is not None else x.new_empty(0), db if db is not None else x.new_empty(0)


# --------------------------------------------------------------------------- torch.library ops
def _fwd_fake(x, weight, bias, residual, eps):
    M, N = x.shape
    return (
        x.new_empty((M, N)),
        x.new_empty((M, N) if residual is not None else (0,)),
        x.new_empty((M,), dtype=torch.float32),
        x.new_empty((M,), dtype=torch.float32),
    )


def _bwd_fake(dy, dh, x, weight, bias, mean, rstd, eps):
    return (
        x.new_empty(x.shape),
        weight.new_empty(weight.shape) if weight is not None else x.new_empty(0),
        bias.new_empty(bias.shape) if bias is not None else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps = inputs
    _, h, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.eps = eps
    ctx.save_for_backward(h if ctx.has_residual else x, weight, bias, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, dh, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = torch.ops.opt_core.layer_norm_bwd(
        dy, dh if ctx.has_residual else None, x, weight, bias, mean, rstd, ctx.eps
    )
    return (
        dx,
        dw if weight is not None else None,
        db if bias is not None else None,
        dx if ctx.has_residual else None,
        None,
    )


register_op("layer_norm", dtypes=KERNEL_DTYPES, setup_context=_setup_context, gradients=_backward,
            forward=Direction(_launch_fwd, _reference_fwd, _fwd_fake, chosen_by="x"),
            backward=Direction(_launch_bwd, _reference_bwd, _bwd_fake, chosen_by="x"))


# --------------------------------------------------------------------------- public API
def layer_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    residual: Optional[torch.Tensor] = None,
):
    """LayerNorm over the last dimension of ``x``.

    ``weight``/``bias`` of shape ``(N,)`` or None.  With ``residual`` (same shape
    and dtype as ``x``) it computes ``h = x + residual`` and returns
    ``(layer_norm(h), h)`` from one pass, as a pre-LN block needs both.
    fp16/bf16/fp32 run the Triton kernels (statistics in fp32); fp64 runs the
    reference.  The kernels take widths up to ``MAX_N``.
    """
    check_tensor("x", x, min_ndim=1)
    N = x.shape[-1]
    if N < 1:
        raise ValueError(f"x must have a last dimension of at least 1, got shape {tuple(x.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_tensor(name, p)
            check_shape(name, p, (N,))
    if residual is not None:
        check_tensor("residual", residual)
        check_shape("residual", residual, tuple(x.shape))
        if residual.dtype != x.dtype:
            raise TypeError(f"residual must have the dtype of x ({x.dtype}), got {residual.dtype}")
    check_same_device("x", x, weight=weight, bias=bias, residual=residual)
    eps = check_float("eps", eps, min_value=0.0)
    if N > MAX_N and dispatch.use_triton(x, KERNEL_DTYPES):
        raise ValueError(f"x's last dimension must be at most {MAX_N} for the Triton kernels, got {N}")

    x2 = x.reshape(-1, N)
    r2 = residual.reshape(-1, N) if residual is not None else None
    y, h, _, _ = torch.ops.opt_core.layer_norm_fwd(x2, weight, bias, r2, eps)
    y = y.view(x.shape)
    return y if residual is None else (y, h.view(x.shape))
