"""LayerNorm over the last dimension, forward and backward, in Triton.

- Forward: one program normalises a [BLOCK_M, BLOCK_N] tile, BLOCK_N the whole row padded to a power
  of two, so x is read once and the fp32 statistics never leave the chip; several rows per program keep
  narrow rows from starving the memory system.
- Residual: ``h = x + residual`` is rounded to x's dtype (the h an unfused model stores and the next
  block reads) and that rounded h is normalised.
- Backward: programs over contiguous ranges of rows, with dW/dB partial sums in fp32 registers that the
  host adds up: no atomics, bitwise repeatable.  Beside today's configs (two programs per SM, a plain
  row loop) the autotuner has pipelined ones (the next row tile's loads in flight while this one is
  reduced, up to four programs per SM for about 16 resident warps); switch ``BWD_PIPELINE``.
  Rows wider than ``MAX_REGISTER_ROW_BWD`` in fp16/bf16, up to ``WIDE_CHUNKS * WIDE_CHUNK`` (OPT-175B's
  12288), take the wide kernel on sm_90: one row at a time in three chunks, each element read once,
  dW/dB still in registers.  Wider rows, fp32 ones and sm_80 take the two-pass kernel, which streams
  each row twice and keeps its partial sums in a scratch row per program (it stays in L2); switch
  ``WIDE_BWD``.
- Rows may have any stride, the last dimension's included (an expanded gradient has stride 0).

The reasoning and measurements behind each point: ``docs/kernels.md``, section LayerNorm.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
import triton
import triton.language as tl

from opt_core.kernels import dispatch
from opt_core.kernels import native
from opt_core.kernels import reference
from opt_core.kernels import tuning
from opt_core.kernels.op_registry import Direction, register_op
from opt_core.kernels.validation import check_float, check_same_device, check_shape, check_tensor

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Widest row the forward keeps in registers (fp32 math): OPT-175B is 12288.
MAX_N = 16384
# Rows up to this width keep the whole row, and dW/dB, in registers in the backward.
MAX_REGISTER_ROW_BWD = 8192
# The wide backward holds a row as WIDE_CHUNKS chunks of WIDE_CHUNK elements: three, not a power of two,
# because a [16384] tile for a 12288-wide row spills (328 bytes per thread at 16 warps) and three
# [4096] chunks fit 128 registers; the two-pass kernel streams WIDE_CHUNK elements at a time.
WIDE_CHUNK = 4096
WIDE_CHUNKS = 3


# Whether the register backward's pipelined configs are autotune candidates beside today's ("auto") or
# not ("off": the A/B baseline; it reaches the kernel as PIPELINE, a key argument, so both tune apart).
BWD_PIPELINE = "auto"
BWD_PIPELINE_MODES = ("auto", "off")


# --------------------------------------------------------------------------- configs
def _grid_configs(block_ms, warps):
    return [triton.Config({"BLOCK_M": m}, num_warps=w) for m in block_ms for w in warps]


def _programs_per_sm(warps):
    """Pipelined backward programs launched per SM: about 16 warps resident on each, at least 2 and at
    most 4, since every program adds a row of dW/dB partial sums for the host to add."""
    return max(2, min(4, 16 // warps))


def _bwd_configs(block_ms, warps):
    """Per tile and warp count, today's kernel (an unpipelined row loop, two programs per SM) and the
    pipelined one (STAGES=2: the next row tile's loads in flight while this one is reduced)."""
    configs = []
    for m in block_ms:
        for w in warps:
            configs.append(triton.Config({"BLOCK_M": m, "STAGES": 1, "PROGRAMS_PER_SM": 2}, num_warps=w))
            configs.append(triton.Config({"BLOCK_M": m, "STAGES": 2, "PROGRAMS_PER_SM": _programs_per_sm(w)},
                                         num_warps=w, num_stages=2))
    return configs


FWD_CONFIGS = _grid_configs((1, 2, 4, 8, 16), (1, 2, 4, 8, 16, 32))
BWD_CONFIGS = _bwd_configs((1, 2, 4, 8, 16), (1, 2, 4, 8, 16, 32))
# One program per SM: at 16 warps and 128 registers a thread the wide kernel fills an SM's register file.
BWD_WIDE_CONFIGS = [triton.Config({"PROGRAMS_PER_SM": 1}, num_warps=16)]
BWD_TWO_PASS_CONFIGS = _grid_configs((1, 2, 4), (4, 8, 16))


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
    # PIPELINE=False (the launch's BWD_PIPELINE "off") keeps today's configs only.
    block_n = kwargs["BLOCK_N"]
    pool = [c for c in configs if kwargs.get("PIPELINE", True) or c.kwargs["STAGES"] == 1]
    return _fitting_configs(pool, block_n, max_tile=max(2048, block_n), lo=4, hi=16)


def prune_bwd_wide_configs(configs, nargs, **kwargs):
    # Eight elements of each chunk per thread: three chunks of x and dy as loaded, and dW/dB in fp32,
    # fill the 128 registers a thread has at 16 warps.
    return [c for c in configs if 8 * 32 * c.num_warps == kwargs["CHUNK"]] or configs[:1]


def prune_bwd_two_pass_configs(configs, nargs, **kwargs):
    return _fitting_configs(configs, kwargs["CHUNK"], max_tile=8192, lo=4, hi=16)


def _for_launch(configs, interpreter_config):
    # Under the interpreter the autotuner would time every config in numpy; one
    # config is all a CPU test needs.
    return [interpreter_config] if dispatch.INTERPRET else configs


# Multi-row tiles exercise the row masking; two programs per "SM" (the interpreter counts 4) give
# programs several row tiles, and some none at all.
_INTERP_FWD = triton.Config({"BLOCK_M": 2}, num_warps=4)
_INTERP_BWD = triton.Config({"BLOCK_M": 2, "STAGES": 2, "PROGRAMS_PER_SM": 2}, num_warps=4)
_INTERP_BWD_WIDE = triton.Config({"PROGRAMS_PER_SM": 2}, num_warps=16)


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
    M, N,
    HAS_DH: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, PIPELINE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, STAGES: tl.constexpr, PROGRAMS_PER_SM: tl.constexpr,
):
    # Program pid owns rows [pid * rows_per_program, ...) (the launcher's grid: PROGRAMS_PER_SM per SM) and
    # writes its row of dW/dB partials, zeros if it has no rows.  tl.range pipelines the row loop: with
    # STAGES > 1 the next tiles' loads go to shared memory while this tile is reduced.  PIPELINE only
    # selects the candidate configs (prune_bwd_configs).
    pid = tl.program_id(0)
    rows_per_program = tl.cdiv(M, tl.num_programs(0))
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    c = cols[None, :]
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)

    row_start = pid * rows_per_program
    row_end = row_start + rows_per_program
    for start in tl.range(row_start, row_end, BLOCK_M, num_stages=STAGES):
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
def _wide_chunk(X, DY, W, r, n0, mean, rstd, N, stride_xm, stride_xn, stride_dym, stride_dyn,
                HAS_W: tl.constexpr, CHUNK: tl.constexpr):
    """One chunk of row r as loaded (x and dy in their dtype) and its parts of the row sums of xhat * w dy
    and w dy."""
    cols = n0 + tl.arange(0, CHUNK)
    mask = cols < N
    x = tl.load(X + r * stride_xm + cols * stride_xn, mask=mask, other=0.0)
    dy = tl.load(DY + r * stride_dym + cols * stride_dyn, mask=mask, other=0.0)
    # Past N, dy is 0, so xhat needs no mask: every product with it is 0 (bwd_kernel masks it; here
    # the mask is the register too many).
    xhat = (x.to(tl.float32) - mean) * rstd
    wdy = dy.to(tl.float32)
    if HAS_W:
        wdy *= tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    return x, dy, tl.sum(xhat * wdy, axis=0), tl.sum(wdy, axis=0)


@triton.jit
def _wide_chunk_dx(x, dy, W, DH, DX, dw, db, r, n0, mean, rstd, c1, c2, N, stride_dhm, stride_dhn,
                   HAS_DH: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, CHUNK: tl.constexpr):
    """dx of one chunk from its x and dy as loaded, and its dW/dB.  w is read again (from L1): kept from
    the row sums, it made the kernel spill."""
    cols = n0 + tl.arange(0, CHUNK)
    mask = cols < N
    # Not written as in _wide_chunk on purpose: the same expression is merged with that one, which
    # keeps fp32 copies of x alive across the row sums, and ptxas spills 8-16 bytes.
    xhat = x.to(tl.float32) * rstd - mean * rstd
    wdy = dy.to(tl.float32)
    if HAS_W:
        dw += wdy * xhat
        wdy *= tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        db += dy.to(tl.float32)
    dx = (wdy - (xhat * c1 + c2)) * rstd
    if HAS_DH:
        dx += tl.load(DH + r * stride_dhm + cols * stride_dhn, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + r * N + cols, dx.to(DX.dtype.element_ty), mask=mask)
    return dw, db


@triton.jit
def _store_partials(DW_PART, DB_PART, pid, n0, dw, db, N, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                    CHUNK: tl.constexpr):
    cols = n0 + tl.arange(0, CHUNK)
    part = pid.to(tl.int64) * N
    if HAS_W:
        tl.store(DW_PART + part + cols, dw, mask=cols < N)
    if HAS_B:
        tl.store(DB_PART + part + cols, db, mask=cols < N)


@triton.jit
def bwd_wide_kernel(
    X, W, DY, DH, DX, DW_PART, DB_PART, MEAN, RSTD,
    stride_xm, stride_xn, stride_dym, stride_dyn, stride_dhm, stride_dhn,
    M, N,
    HAS_DH: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    CHUNK: tl.constexpr, PROGRAMS_PER_SM: tl.constexpr,
):
    # bwd_kernel's mathematics for rows of up to three CHUNKs (the host sends fp16/bf16 rows wider than
    # MAX_REGISTER_ROW_BWD here), one row at a time: each chunk of x and dy is loaded once and kept, as
    # loaded, through the row sums and dx; dW/dB stay in registers.  Program ranges as in bwd_kernel.
    # Not pipelined: with tl.range(num_stages=2) ptxas spills 8 bytes a thread (Triton 3.6, sm_90).
    pid = tl.program_id(0)
    rows_per_program = tl.cdiv(M, tl.num_programs(0))
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    dw0 = tl.zeros([CHUNK], dtype=tl.float32)
    dw1 = tl.zeros([CHUNK], dtype=tl.float32)
    dw2 = tl.zeros([CHUNK], dtype=tl.float32)
    db0 = tl.zeros([CHUNK], dtype=tl.float32)
    db1 = tl.zeros([CHUNK], dtype=tl.float32)
    db2 = tl.zeros([CHUNK], dtype=tl.float32)
    for row in range(row_start, row_end):
        r = tl.cast(row, tl.int64)  # (under the interpreter the loop variable is a Python int)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        x0, dy0, s0, t0 = _wide_chunk(X, DY, W, r, 0, mean, rstd, N, stride_xm, stride_xn, stride_dym,
                                      stride_dyn, HAS_W, CHUNK)
        x1, dy1, s1, t1 = _wide_chunk(X, DY, W, r, CHUNK, mean, rstd, N, stride_xm, stride_xn, stride_dym,
                                      stride_dyn, HAS_W, CHUNK)
        x2, dy2, s2, t2 = _wide_chunk(X, DY, W, r, 2 * CHUNK, mean, rstd, N, stride_xm, stride_xn, stride_dym,
                                      stride_dyn, HAS_W, CHUNK)
        c1 = (s0 + s1 + s2) / N
        c2 = (t0 + t1 + t2) / N
        dw0, db0 = _wide_chunk_dx(x0, dy0, W, DH, DX, dw0, db0, r, 0, mean, rstd, c1, c2, N, stride_dhm,
                                  stride_dhn, HAS_DH, HAS_W, HAS_B, CHUNK)
        dw1, db1 = _wide_chunk_dx(x1, dy1, W, DH, DX, dw1, db1, r, CHUNK, mean, rstd, c1, c2, N, stride_dhm,
                                  stride_dhn, HAS_DH, HAS_W, HAS_B, CHUNK)
        dw2, db2 = _wide_chunk_dx(x2, dy2, W, DH, DX, dw2, db2, r, 2 * CHUNK, mean, rstd, c1, c2, N, stride_dhm,
                                  stride_dhn, HAS_DH, HAS_W, HAS_B, CHUNK)
    _store_partials(DW_PART, DB_PART, pid, 0, dw0, db0, N, HAS_W, HAS_B, CHUNK)
    _store_partials(DW_PART, DB_PART, pid, CHUNK, dw1, db1, N, HAS_W, HAS_B, CHUNK)
    _store_partials(DW_PART, DB_PART, pid, 2 * CHUNK, dw2, db2, N, HAS_W, HAS_B, CHUNK)


@triton.jit
def bwd_two_pass_kernel(
    X, W, DY, DH, DX, DW_PART, DB_PART, MEAN, RSTD,
    stride_xm, stride_xn, stride_dym, stride_dyn, stride_dhm, stride_dhn,
    M, N, rows_per_program,
    HAS_DH: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # Same mathematics as bwd_kernel, for rows too wide to hold in
    # registers (fp32 rows above MAX_REGISTER_ROW_BWD, any row above the wide
    # kernel's three chunks): pass 1 streams the rows for the two row sums, pass 2 streams
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


# The row width keys by its power-of-two tile (BLOCK_N, or N's bucket); the row count not at all.
_fwd = tuning.autotune(
    _for_launch(FWD_CONFIGS, _INTERP_FWD), key=["BLOCK_N", "HAS_RES"],
    prune_configs_by={"early_config_prune": prune_fwd_configs}
)(fwd_kernel)
_bwd = tuning.autotune(
    _for_launch(BWD_CONFIGS, _INTERP_BWD), key=["BLOCK_N", "HAS_DH", "PIPELINE"],
    prune_configs_by={"early_config_prune": prune_bwd_configs}
)(bwd_kernel)
_bwd_wide = tuning.autotune(
    _for_launch(BWD_WIDE_CONFIGS, _INTERP_BWD_WIDE), key=["N", "HAS_DH"],
    prune_configs_by={"early_config_prune": prune_bwd_wide_configs}, buckets=["N"],
)(bwd_wide_kernel)
_bwd_two_pass = tuning.autotune(
    _for_launch(BWD_TWO_PASS_CONFIGS, _INTERP_FWD), key=["N", "HAS_DH"],
    prune_configs_by={"early_config_prune": prune_bwd_two_pass_configs}, buckets=["N"],
)(bwd_two_pass_kernel)


# --------------------------------------------------------------------------- launchers
def _contiguous(t):
    # weight/bias are read as plain vectors; a strided one (a view) is copied.
    return t.contiguous() if t is not None else None


def _launch_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, h, mean, rstd) over the rows of x (its last dimension): y and h in x's shape (h empty without a
    residual), mean and rstd one per row."""
    shape, N = x.shape, x.shape[-1]
    x = x.reshape(-1, N)
    M = x.shape[0]
    weight, bias = _contiguous(weight), _contiguous(bias)
    y = dispatch.empty(shape, dtype=x.dtype, device=x.device)
    h = dispatch.empty(shape if residual is not None else (0,), dtype=x.dtype, device=x.device)
    mean = dispatch.empty((M,), dtype=torch.float32, device=x.device)
    rstd = dispatch.empty((M,), dtype=torch.float32, device=x.device)
    if M == 0:
        return y, h, mean, rstd
    res = residual.reshape(-1, N) if residual is not None else x
    _fwd[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)](
        x, res, weight, bias, y, h, mean, rstd,
        x.stride(0), x.stride(1), res.stride(0), res.stride(1),
        M, N, eps,
        HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_N=triton.next_power_of_2(N),
    )
    return y, h, mean, rstd


# Whether 16-bit rows above MAX_REGISTER_ROW_BWD take the one-read wide kernel ("auto", on sm_90 and
# under the interpreter: on sm_80 ptxas spills 8 bytes of its fp16 variant) or the two-pass kernel
# ("off": the A/B baseline).
WIDE_BWD = "auto"
WIDE_BWD_MODES = ("auto", "off")


def bwd_variant(N: int, dtype: torch.dtype, sm: int) -> tuple[str, dict]:
    """(kernel name, its tile constexprs) of the backward for rows of width N in dtype on compute
    capability ``sm`` (90 for sm_90): ``bwd_kernel`` (the row and dW/dB in registers), ``bwd_wide_kernel``
    (three chunks) or ``bwd_two_pass_kernel``."""
    if WIDE_BWD not in WIDE_BWD_MODES:
        raise ValueError(f"opt_core.kernels.layer_norm.WIDE_BWD must be one of {WIDE_BWD_MODES}, got {WIDE_BWD!r}")
    block_n = triton.next_power_of_2(N)
    if block_n <= MAX_REGISTER_ROW_BWD:
        if BWD_PIPELINE not in BWD_PIPELINE_MODES:
            raise ValueError(f"opt_core.kernels.layer_norm.BWD_PIPELINE must be one of {BWD_PIPELINE_MODES}, "
                             f"got {BWD_PIPELINE!r}")
        return "bwd_kernel", dict(BLOCK_N=block_n, PIPELINE=BWD_PIPELINE == "auto")
    if WIDE_BWD == "auto" and sm >= 90 and dtype != torch.float32 and N <= WIDE_CHUNKS * WIDE_CHUNK:
        return "bwd_wide_kernel", dict(CHUNK=WIDE_CHUNK)
    return "bwd_two_pass_kernel", dict(CHUNK=WIDE_CHUNK)


def _sm(device: torch.device) -> int:
    # The interpreter takes sm_90's choices, so the CPU tests run the kernels Hopper runs.
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _bwd_tuner(x: Tensor):
    name, tile = bwd_variant(x.shape[1], x.dtype, _sm(x.device))
    return {"bwd_kernel": _bwd, "bwd_wide_kernel": _bwd_wide, "bwd_two_pass_kernel": _bwd_two_pass}[name], tile


def _programs(M: int, per_sm: int, sms: int) -> int:
    return max(1, min(M, per_sm * sms))


def _launch_bwd(dy: Tensor, dh: Optional[Tensor], x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                mean: Tensor, rstd: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); dweight/dbias are empty where weight/bias are None.  eps goes unread: the
    saved mean and rstd hold it."""
    M, N = x.shape
    weight = _contiguous(weight)
    dx = dispatch.empty((M, N), dtype=x.dtype, device=x.device)
    sms = dispatch.num_sms(x.device)
    tuner, tile = _bwd_tuner(x)
    if tuner is _bwd_two_pass:
        # About two programs per SM, each with a contiguous range of at least one row: its row tiles
        # write its partial rows.
        rows_per_program = max(1, triton.cdiv(M, 2 * sms))
        grid, parts = (max(1, triton.cdiv(M, rows_per_program)),), (rows_per_program,)
        max_programs = grid[0]
    else:
        # The config's programs per SM; each writes its partial rows, zeros where it has no rows.
        grid, parts = (lambda meta: (_programs(M, meta["PROGRAMS_PER_SM"], sms),)), ()
        max_programs = max(_programs(M, c.kwargs["PROGRAMS_PER_SM"], sms) for c in tuner.configs)
    dw_part = dispatch.empty((max_programs, N) if weight is not None else (0,), dtype=torch.float32, device=x.device)
    db_part = dispatch.empty((max_programs, N) if bias is not None else (0,), dtype=torch.float32, device=x.device)
    programs = max_programs
    if M > 0:
        dh_ = dh if dh is not None else dy
        tuner[grid](
            x, weight, dy, dh_, dx, dw_part, db_part, mean, rstd,
            x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), dh_.stride(0), dh_.stride(1),
            M, N, *parts,
            HAS_DH=dh is not None, HAS_W=weight is not None, HAS_B=bias is not None, **tile,
        )
        if tuner is not _bwd_two_pass:
            programs = _programs(M, tuner.best_config.kwargs["PROGRAMS_PER_SM"], sms)
    else:
        dw_part.zero_()
        db_part.zero_()
    dw = dw_part[:programs].sum(0).to(weight.dtype) if weight is not None else x.new_empty(0)
    db = db_part[:programs].sum(0).to(bias.dtype) if bias is not None else x.new_empty(0)
    return dx, dw, db


# --------------------------------------------------------------------------- reference path
def _reference_fwd(x, weight, bias, residual, eps):
    out = reference.layer_norm(x, weight, bias, eps, residual)
    y, h = out if residual is not None else (out, x.new_empty(0))
    hf = (h if residual is not None else x).float().reshape(-1, x.shape[-1])
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
    rows = math.prod(x.shape[:-1])
    return (
        x.new_empty(x.shape),
        x.new_empty(x.shape if residual is not None else (0,)),
        x.new_empty((rows,), dtype=torch.float32),
        x.new_empty((rows,), dtype=torch.float32),
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
    N = x.shape[-1]
    dx, dw, db = torch.ops.opt_core.layer_norm_bwd(
        dy.reshape(-1, N), dh.reshape(-1, N) if ctx.has_residual else None, x.reshape(-1, N), weight, bias, mean,
        rstd, ctx.eps
    )
    dx = dx.view(x.shape)
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
    fp16/bf16/fp32 run the Triton kernels (statistics in fp32), or ``F.layer_norm``
    (``kernels/native.py``) on a CPU without the interpreter; fp64 runs the
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
    if dispatch.use_native(x, KERNEL_DTYPES):
        return native.layer_norm(x, weight, bias, eps, residual)

    # The op takes x in its own shape and returns y and h in it, fresh tensors and not views of 2-D ones. FSDP2
    # warns about a module that returns a view: an in-place op on it would drop FSDP2's hook.
    y, h, _, _ = torch.ops.opt_core.layer_norm_fwd(x, weight, bias, residual, eps)
    return y if residual is None else (y, h)
