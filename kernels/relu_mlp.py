"""OPT's feed-forward block, ``residual + dropout(fc2(relu(fc1(x))))``, as Triton GEMMs with everything
else fused into their epilogues; forward and backward.

- Shapes: x is flattened to (M, d); fc1 is (ffn, d) and fc2 (d, ffn) in nn.Linear layout, read through
  their strides (a transposed operand is a stride swap, never a copy).  With g = dropout'(dy) the
  backward is dh = (g @ W2) * [h > 0], dW2 = g^T @ h, dx = dh @ W1, dW1 = dh^T @ x.
- One mainloop (``_gemm_tile``: grouped tile order, fp32 accumulation), three epilogues:
  ``fc_kernel`` (bias, ReLU, dropout, residual: GEMM 1 and GEMM 2), ``dh_kernel`` (ReLU mask from the
  saved activation, db1 partial sums) and ``matmul_kernel`` (a plain store: dx, dW1, dW2).
- Only the post-ReLU h is saved.  ReLU is ``where(acc < 0, 0, acc)`` and its gradient mask
  ``where(h <= 0, 0, grad)``, so NaN propagates exactly as in PyTorch (``tl.maximum`` drops it on GPUs).
- Dropout: a Philox keep-mask from (seed, row, column) only, one Philox call per four columns, never
  stored; the backward, any config and ``dropout_mask`` (plain PyTorch) regenerate the same bits.  The
  backward of dropout is one memory-bound pass that writes g and the db2 partial sums.
- Bias gradients are per-tile fp32 column sums reduced on the host: no atomics, bitwise repeatable.
- fp32 inputs multiply with ``input_precision="ieee"`` (no TF32) on their own small tiles.
- Every config fits sm_80's shared memory, so one list serves sm_80 and sm_90.  The pointer mainloop
  wraps rows and columns past the edge around instead of masking them, and the epilogues run in
  column quarters once BLOCK_N >= 128: both keep every config free of spills.
- The seed reaches the op as a 0-dim int64 CPU tensor, so ``torch.compile`` can draw it inside the
  graph; the kernels never specialise on it.
- TMA on sm_90: the mainloop reads A and B through 2-D descriptors over the operands as stored, with
  results bitwise those of the pointer path; switch ``TMA = "auto" | "on" | "off"``.
- Persistent GEMMs with TMA stores on sm_90 (2026-12): where the output's layout allows, persistent
  configs (one program per SM, grouped tile order, the tile and K loops flattened into one pipelined
  loop, the epilogue in eighths written by TMA stores) join today's as autotune candidates; switch
  ``PERSISTENT = "auto" | "off"``.
- Opt-in on sm_90: Gluon ping-pong GEMMs (``relu_mlp_gluon``: a producer warp, two consumer warpgroups
  whose epilogues overlap each other's main loops) for every GEMM of the block; switch
  ``GLUON = "off" | "on"``.

The reasoning and measurements behind each point: ``docs/kernels.md``, section ReLU-MLP.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from opt_core.kernels import dispatch
from opt_core.kernels import native
from opt_core.kernels import reference
from opt_core.kernels import tuning
from opt_core.kernels.op_registry import Direction, register_op
from opt_core.kernels.validation import check_dropout, check_same_device, check_seed, check_shape, check_tensor

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Shared memory a config may use: below sm_80's 163 KiB per block, with room for
# the epilogue's layout conversions; the TMA-only (sm_90) configs below sm_90's 227 KiB.
SMEM_BUDGET = 160 * 1024
TMA_SMEM_BUDGET = 220 * 1024


# --------------------------------------------------------------------------- configs
def _descriptor_blocks(nargs):
    """Autotune pre-hook: TMA descriptors get this config's tiles, [BLOCK_M, BLOCK_K] of A and [BLOCK_K,
    BLOCK_N] of B, or their transposes where the operand is stored the other way round (A_T, B_T).  Pointer
    launches pass tensors, which it leaves alone.  The output's descriptor (OUT_DESC, launches with TMA
    stores) gets one epilogue slice of the persistent loop."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    if isinstance(nargs["A"], TensorDescriptor):
        nargs["A"].block_shape = [bk, bm] if nargs["A_T"] else [bm, bk]
    if isinstance(nargs["B"], TensorDescriptor):
        nargs["B"].block_shape = [bn, bk] if nargs["B_T"] else [bk, bn]
    if isinstance(nargs.get("OUT_DESC"), TensorDescriptor):
        nargs["OUT_DESC"].block_shape = [bm, epilogue_slice_n(bn, persistent=True)]


def epilogue_slice_n(block_n, persistent):
    """Columns the epilogue handles (and a TMA store writes) at a time: quarters of wide tiles, eighths on
    the persistent path, see ``_in_column_slices``."""
    if block_n < 128:
        return block_n
    return block_n // 8 if persistent else block_n // 4


def _gemm_config(bm, bn, bk, warps, stages, group_m=8, persistent=False):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, "PERSISTENT": persistent},
                         num_warps=warps, num_stages=stages, pre_hook=_descriptor_blocks)


# fp16/bf16: wgmma/mma tiles.  128x256 and 256x128 with two warpgroups are the
# usual Hopper winners at OPT sizes; the 128x128 and 64x128 ones serve narrow
# or short problems (few tiles per SM) and sm_80.
HALF_CONFIGS = [
    _gemm_config(128, 256, 64, 8, 3),
    _gemm_config(256, 128, 64, 8, 3),
    _gemm_config(128, 128, 64, 8, 4),
    _gemm_config(128, 128, 64, 4, 4),
    _gemm_config(64, 128, 64, 4, 4),
]
# fp32 (IEEE, FMA): smaller tiles, the dot's operands live in registers.  (With
# A M-contiguous, the weight-gradient layout, ptxas puts 8 bytes on the stack
# on sm_80 for 64x64x32 and 64x128x32 tiles; these two compile clean.)
FP32_CONFIGS = [
    _gemm_config(64, 64, 16, 4, 3),
    _gemm_config(128, 64, 32, 8, 3),
]
# The TMA path only (sm_90, 227 KiB of shared memory): a fourth stage for the two-warpgroup tiles.  Loads
# by TMA need no address registers: these compile at 154-222 registers without spills (AOT check).
TMA_ONLY_CONFIGS = [
    _gemm_config(128, 256, 64, 8, 4),
    _gemm_config(256, 128, 64, 8, 4),
]
# Persistent, TMA stores (sm_90, launches whose output TMA can write): one program per SM walks the tiles
# in grouped order; the tile loop and the K loop are one flattened loop, so the software pipeliner issues
# the next tile's first loads while this tile's epilogue runs, and the epilogue's TMA stores drain from
# shared memory while the next mainloop starts.  Beside today's configs, not instead: the autotuner
# picks per shape bucket.  (Triton 3.6's Hopper warp specialisation does not apply: it needs 4 warps and
# fails on these epilogues, see docs/kernels.md.)
PERSISTENT_CONFIGS = [
    _gemm_config(128, 256, 64, 8, 3, persistent=True),
    _gemm_config(128, 256, 64, 8, 4, persistent=True),
]
GEMM_CONFIGS = HALF_CONFIGS + FP32_CONFIGS + TMA_ONLY_CONFIGS + PERSISTENT_CONFIGS
_FP32_IDS = {id(c) for c in FP32_CONFIGS}
_TMA_ONLY_IDS = {id(c) for c in TMA_ONLY_CONFIGS}

DROPOUT_BWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w)
    for bm, bn, w in ((16, 256, 4), (32, 128, 4), (32, 256, 8), (64, 128, 8))
]
# rows_per_program is a multiple of this, so every BLOCK_M divides it.
DROPOUT_BWD_ROW_QUANTUM = 64


def _smem_bytes(c, element_size):
    """The mainloop's stages, and for the persistent configs the epilogue slice a TMA store reads from."""
    k = c.kwargs
    staging = k["BLOCK_M"] * epilogue_slice_n(k["BLOCK_N"], persistent=True) if k["PERSISTENT"] else 0
    return (c.num_stages * (k["BLOCK_M"] * k["BLOCK_K"] + k["BLOCK_K"] * k["BLOCK_N"]) + staging) * element_size


def prune_gemm_configs(configs, nargs, **kwargs):
    """The configs of the operands' precision that fit shared memory (the persistent ones only where
    the launch gives TMA stores), less those whose BLOCK_M or BLOCK_N exceeds the problem (rounded up
    to a power of two) and is not the smallest on offer: a 256-row tile for 40 tokens only wastes the
    SM.  The smallest tile if nothing is left."""
    fp32 = kwargs["INPUT_PRECISION"] == "ieee"
    tma = bool(kwargs.get("TMA"))
    tma_store = bool(kwargs.get("TMA_STORE"))
    budget = TMA_SMEM_BUDGET if tma else SMEM_BUDGET
    pool = [c for c in configs if (id(c) in _FP32_IDS) == fp32 and (tma or id(c) not in _TMA_ONLY_IDS)
            and (tma_store or not c.kwargs["PERSISTENT"]) and _smem_bytes(c, 4 if fp32 else 2) <= budget]
    M, N = nargs["M"], nargs["N"]
    min_m = min(c.kwargs["BLOCK_M"] for c in pool)
    min_n = min(c.kwargs["BLOCK_N"] for c in pool)
    kept = [c for c in pool
            if c.kwargs["BLOCK_M"] <= max(min_m, triton.next_power_of_2(M))
            and c.kwargs["BLOCK_N"] <= max(min_n, triton.next_power_of_2(N))]
    return kept or [min(pool, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def prune_dropout_bwd_configs(configs, nargs, **kwargs):
    # Narrow rows (d < 256) would leave half of a 256-wide tile idle.
    N = nargs["N"]
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= max(128, triton.next_power_of_2(N))]
    return kept or configs[:1]


def _for_launch(configs, interpreter_config):
    # Under the interpreter the autotuner would time every config in numpy; one
    # config (below) is all a CPU test needs.
    return [interpreter_config] if dispatch.INTERPRET else configs


# Interpreter tiles: the interpreter's cost is per tl op and per program, so
# tiles are as big as numpy's matmul allows before OpenBLAS goes multi-threaded
# (a 128x64 @ 64x128 dot takes ~15 ms on 2 cores instead of ~0.1 ms), and small
# enough that the test shapes have partial tiles, partial quarters, several K
# steps and a partial last K step.  GROUP_M=3 leaves partial groups.  It asks for the persistent loop,
# which runs where a launch gives TMA stores (TMA and PERSISTENT "on"/"auto"); other launches run
# today's one-tile-per-program kernel with it, so the one config tests both.
_INTERP_GEMM = _gemm_config(128, 128, 32, 4, 1, group_m=3, persistent=True)
_INTERP_DROPOUT_BWD = triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=4)


# --------------------------------------------------------------------------- dropout mask
def dropout_threshold(p: float) -> int:
    """Keep an element when the top 31 bits of its Philox word are >= this."""
    return min(int(round(p * 2**31)), 2**31 - 1)


@triton.jit
def _dropout_multiplier(seed, rows, col_start, threshold, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_N] fp32 tile of 0 (dropped) or ``scale`` (kept) for rows
    ``rows`` and columns col_start + [0, BLOCK_N); col_start is a multiple of 4."""
    groups = col_start // 4 + tl.arange(0, BLOCK_N // 4)
    c0 = tl.broadcast_to(groups[None, :], (BLOCK_M, BLOCK_N // 4))
    c1 = tl.broadcast_to(rows[:, None], (BLOCK_M, BLOCK_N // 4))
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, 0, 0)
    k0 = tl.where((r0 >> 1).to(tl.int32) >= threshold, scale, 0.0)
    k1 = tl.where((r1 >> 1).to(tl.int32) >= threshold, scale, 0.0)
    k2 = tl.where((r2 >> 1).to(tl.int32) >= threshold, scale, 0.0)
    k3 = tl.where((r3 >> 1).to(tl.int32) >= threshold, scale, 0.0)
    # tl.join stacks along a new last axis, so element [m, j, t, s] of the outer
    # join is word 2t + s: after the reshape word q sits at column 4j + q.
    return tl.reshape(tl.join(tl.join(k0, k2), tl.join(k1, k3)), (BLOCK_M, BLOCK_N))


_MASK32 = 0xFFFFFFFF
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85


def _mulhilo32(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # The 64-bit product a * x of two uint32 values, from int64 pieces that
    # cannot overflow: x = xh * 2^16 + xl.
    lo_part = a * (x & 0xFFFF)
    t = a * (x >> 16) + (lo_part >> 16)
    return t >> 16, ((t & 0xFFFF) << 16) | (lo_part & 0xFFFF)


def _philox4x32(seed: int, c0: torch.Tensor, c1: torch.Tensor, rounds: int = 10):
    """Triton's tl.philox(seed, c0, c1, 0, 0) for uint32 counters held in int64."""
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _MASK32, (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def dropout_mask(seed: int, p: float, shape: Sequence[int], device=None) -> torch.Tensor:
    """The keep-mask (bool, ``shape``) the kernels use for ``seed`` and ``p``.

    Rows are the flattened leading dimensions, as in ``relu_mlp``.  Plain
    PyTorch (Philox in int64 arithmetic), bit-identical to the kernels'."""
    shape = tuple(shape)
    N = shape[-1] if shape else 1
    M = math.prod(shape[:-1]) if len(shape) > 1 else 1
    groups = triton.cdiv(N, 4)
    c0 = torch.arange(groups, dtype=torch.int64, device=device).expand(M, groups)
    c1 = torch.arange(M, dtype=torch.int64, device=device)[:, None].expand(M, groups)
    words = torch.stack(_philox4x32(int(seed) & (2**64 - 1), c0, c1), dim=-1)  # word q serves column 4j + q
    keep = (words.reshape(M, 4 * groups)[:, :N] >> 1) >= dropout_threshold(p)
    return keep.reshape(shape)


# --------------------------------------------------------------------------- kernels
@triton.jit
def _tile_coordinates(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ordering: consecutive tiles walk GROUP_M row tiles down one
    # column of tiles before moving right, so the B columns they stream are
    # reused from L2 by the whole group.
    tiles_m = (M + BLOCK_M - 1) // BLOCK_M
    tiles_n = (N + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows_left = tiles_m - first_m
    group_m = tl.where(rows_left < GROUP_M, rows_left, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m, pid_n


@triton.jit
def _gemm_tile(A, B, M, N, K, strides,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
               INPUT_PRECISION: tl.constexpr, TMA: tl.constexpr, A_T: tl.constexpr, B_T: tl.constexpr):
    """(acc, pid_m, pid_n): this program's fp32 [BLOCK_M, BLOCK_N] tile of A @ B and its coordinates.
    With TMA, A and B are 2-D descriptors over the operands as stored (A_T: A is stored (K, M); B_T: B
    is stored (N, K)) and tiles past the edges arrive as zeros; otherwise pointers read through
    ``strides`` = (stride_am, stride_ak, stride_bk, stride_bn)."""
    pid_m, pid_n = _tile_coordinates(tl.program_id(0), M, N, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, GROUP_M=GROUP_M)
    if TMA:
        acc = _tma_mainloop(A, B, K, pid_m, pid_n, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                            INPUT_PRECISION=INPUT_PRECISION, A_T=A_T, B_T=B_T)
    else:
        acc = _pointer_mainloop(A, B, M, N, K, *strides, pid_m, pid_n, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                BLOCK_K=BLOCK_K, INPUT_PRECISION=INPUT_PRECISION)
    return acc, pid_m, pid_n


@triton.jit
def _tma_mainloop(A, B, K, pid_m, pid_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr, A_T: tl.constexpr, B_T: tl.constexpr):
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        off_k = k * BLOCK_K
        if A_T:
            a = tl.trans(A.load([off_k, off_m]))
        else:
            a = A.load([off_m, off_k])
        if B_T:
            b = tl.trans(B.load([off_n, off_k]))
        else:
            b = B.load([off_k, off_n])
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _persistent_gemm(A, B, M, N, K, EPILOGUE: tl.constexpr, epilogue_args,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr, A_T: tl.constexpr, B_T: tl.constexpr):
    """Every tile this program owns (tiles pid, pid + programs, ...: the grid is one program per SM) through
    the TMA mainloop and ``EPILOGUE`` (see ``_in_column_slices``).  ``flatten`` makes the tile loop and
    the K loop one pipelined loop, so the next tile's loads are in flight during this tile's epilogue.
    The epilogue counts tiles with its own counter, as Triton's persistent-matmul tutorial does: the
    pipeliner then need not keep the mainloop's coordinates alive across the loop's stages."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    epilogue_tile = pid - programs
    for tile in tl.range(pid, tiles, programs, flatten=True):
        pid_m, pid_n = _tile_coordinates(tile, M, N, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, GROUP_M=GROUP_M)
        acc = _tma_mainloop(A, B, K, pid_m, pid_n, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                            INPUT_PRECISION=INPUT_PRECISION, A_T=A_T, B_T=B_T)
        epilogue_tile += programs
        pid_m, pid_n = _tile_coordinates(epilogue_tile, M, N, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, GROUP_M=GROUP_M)
        _in_column_slices(acc, pid_m, pid_n, EPILOGUE, epilogue_args, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                          EIGHTHS=True)


@triton.jit
def _pointer_mainloop(A, B, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, pid_m, pid_n,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      INPUT_PRECISION: tl.constexpr):
    # Rows and columns past the edge wrap around (rm % M) instead of being
    # masked: they load valid memory and their results are never stored, and
    # without the row/column predicates the 128-register-accumulator configs
    # fit in 255 registers on sm_80 (masked, they spilled 8-40 bytes).  With M
    # and N multiples of 16 the remainder keeps the loads 16-byte vectors.
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = A + rm.to(tl.int64)[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = B + rk[:, None] * stride_bk + rn.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=rk[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _quarters(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The four column quarters of acc, left to right."""
    left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
    q0, q1 = tl.split(tl.permute(tl.reshape(left, (BLOCK_M, 2, BLOCK_N // 4)), (0, 2, 1)))
    q2, q3 = tl.split(tl.permute(tl.reshape(right, (BLOCK_M, 2, BLOCK_N // 4)), (0, 2, 1)))
    return q0, q1, q2, q3


@triton.jit
def _in_halves(x, row0, col0, EPILOGUE: tl.constexpr, epilogue_args, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
    """EPILOGUE on the left and right halves of the [BLOCK_M, WIDTH] slice x starting at column col0."""
    left, right = tl.split(tl.permute(tl.reshape(x, (BLOCK_M, 2, WIDTH // 2)), (0, 2, 1)))
    EPILOGUE(left, row0, col0, *epilogue_args, BLOCK_M=BLOCK_M, SLICE_N=WIDTH // 2)
    EPILOGUE(right, row0, col0 + WIDTH // 2, *epilogue_args, BLOCK_M=BLOCK_M, SLICE_N=WIDTH // 2)


@triton.jit
def _in_column_slices(acc, pid_m, pid_n, EPILOGUE: tl.constexpr, epilogue_args,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EIGHTHS: tl.constexpr):
    """``EPILOGUE(slice, first row, first column, *epilogue_args, BLOCK_M=, SLICE_N=width)`` over tile
    (pid_m, pid_n): on its four column quarters (with ``EIGHTHS``, eighths) once BLOCK_N >= 128, else on
    the whole tile.  Callers write the ``epilogue_args`` tuple in the call: a tuple assigned to a variable
    first has its constexprs turned into tensors (Triton's assignment rule), and the epilogue's flags must
    stay constexprs.  With a whole
    128-register-per-thread accumulator live beside the dropout's Philox words, a residual or activation
    tile and the store's layout conversion, ptxas spills (up to 840 bytes per thread at 128x256 on
    sm_90); in quarters no kept config spills.  The persistent loop works in eighths: its flattened loop
    keeps more alive, and its fc2 epilogue (dropout, residual) takes 238 registers in quarters, 198 in
    eighths; a TMA store then stages an eighth of the tile in shared memory."""
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    if BLOCK_N >= 128:
        S: tl.constexpr = BLOCK_N // 4
        q0, q1, q2, q3 = _quarters(acc, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
        if EIGHTHS:
            _in_halves(q0, row0, col0, EPILOGUE, epilogue_args, BLOCK_M, S)
            _in_halves(q1, row0, col0 + S, EPILOGUE, epilogue_args, BLOCK_M, S)
            _in_halves(q2, row0, col0 + 2 * S, EPILOGUE, epilogue_args, BLOCK_M, S)
            _in_halves(q3, row0, col0 + 3 * S, EPILOGUE, epilogue_args, BLOCK_M, S)
        else:
            EPILOGUE(q0, row0, col0, *epilogue_args, BLOCK_M=BLOCK_M, SLICE_N=S)
            EPILOGUE(q1, row0, col0 + S, *epilogue_args, BLOCK_M=BLOCK_M, SLICE_N=S)
            EPILOGUE(q2, row0, col0 + 2 * S, *epilogue_args, BLOCK_M=BLOCK_M, SLICE_N=S)
            EPILOGUE(q3, row0, col0 + 3 * S, *epilogue_args, BLOCK_M=BLOCK_M, SLICE_N=S)
    else:
        EPILOGUE(acc, row0, col0, *epilogue_args, BLOCK_M=BLOCK_M, SLICE_N=BLOCK_N)


@triton.jit
def _store_slice(C, OUT_DESC, value, row0, col0, rows, cols, mask, stride_cm):
    """One epilogue slice of the output: a TMA store where the persistent loop has the output's
    descriptor (TMA clips what lies past the edges), else a masked store through pointers."""
    if OUT_DESC is None:
        tl.store(C + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :], value.to(C.dtype.element_ty), mask=mask)
    else:
        OUT_DESC.store([row0, col0], value.to(C.dtype.element_ty))


@triton.jit
def _fc_epilogue(acc, row0, col0, BIAS, RES, C, OUT_DESC, M, N, stride_rm, stride_rn, stride_cm,
                 seed, drop_threshold, drop_scale,
                 HAS_BIAS: tl.constexpr, RELU: tl.constexpr, DROPOUT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                 BLOCK_M: tl.constexpr, SLICE_N: tl.constexpr):
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, SLICE_N)
    col_ok = cols < N
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if RELU:
        # Not tl.maximum: without propagate_nan it turns NaN into 0 on the GPU
        # (and not in the interpreter, so no CPU test would notice).  A select
        # on acc < 0 keeps NaN the same way on both.
        acc = tl.where(acc < 0, 0.0, acc)
    if DROPOUT:
        acc = acc * _dropout_multiplier(seed, rows, col0, drop_threshold, drop_scale, BLOCK_M=BLOCK_M,
                                        BLOCK_N=SLICE_N)
    mask = (rows < M)[:, None] & col_ok[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(RES + rows.to(tl.int64)[:, None] * stride_rm + cols[None, :] * stride_rn, mask=mask,
                       other=0.0).to(tl.float32)
    _store_slice(C, OUT_DESC, acc, row0, col0, rows, cols, mask, stride_cm)


@triton.jit(do_not_specialize=["seed"])
def fc_kernel(
    A, B, BIAS, RES, C, OUT_DESC,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_rm, stride_rn, stride_cm,
    seed, drop_threshold, drop_scale,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, DROPOUT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, TMA: tl.constexpr, A_T: tl.constexpr, B_T: tl.constexpr, TMA_STORE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    """C = [RES +] [dropout]([relu](A @ B [+ BIAS])): GEMM 1 with bias and ReLU,
    GEMM 2 with bias, dropout and the residual add.  OUT_DESC: C's descriptor where the launch gives
    TMA stores (TMA_STORE), for the persistent configs."""
    if PERSISTENT and TMA_STORE:
        _persistent_gemm(A, B, M, N, K, _fc_epilogue, (BIAS, RES, C, OUT_DESC, M, N, stride_rm, stride_rn, stride_cm,
                         seed, drop_threshold, drop_scale, HAS_BIAS, RELU, DROPOUT, HAS_RESIDUAL),
                         BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M,
                         INPUT_PRECISION=INPUT_PRECISION, A_T=A_T, B_T=B_T)
    else:
        acc, pid_m, pid_n = _gemm_tile(A, B, M, N, K, (stride_am, stride_ak, stride_bk, stride_bn),
                                       BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M,
                                       INPUT_PRECISION=INPUT_PRECISION, TMA=TMA, A_T=A_T, B_T=B_T)
        _in_column_slices(acc, pid_m, pid_n, _fc_epilogue, (BIAS, RES, C, None, M, N, stride_rm, stride_rn,
                          stride_cm, seed, drop_threshold, drop_scale, HAS_BIAS, RELU, DROPOUT, HAS_RESIDUAL),
                          BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, EIGHTHS=False)


@triton.jit
def _dh_epilogue(acc, row0, col0, H, DH, OUT_DESC, DB_PART, M, N, stride_hm, stride_dhm,
                 HAS_DBIAS: tl.constexpr, BLOCK_M: tl.constexpr, SLICE_N: tl.constexpr):
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, SLICE_N)
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    # Rows past M load h = 0, so they add nothing to the column sums.
    h = tl.load(H + rows.to(tl.int64)[:, None] * stride_hm + cols[None, :], mask=mask, other=0.0)
    acc = tl.where(h <= 0, 0.0, acc)
    _store_slice(DH, OUT_DESC, acc, row0, col0, rows, cols, mask, stride_dhm)
    if HAS_DBIAS:
        tl.store(DB_PART + (row0 // BLOCK_M).to(tl.int64) * N + cols, tl.sum(acc, axis=0), mask=col_ok)


@triton.jit
def dh_kernel(
    A, B, H, DH, OUT_DESC, DB_PART,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_hm, stride_dhm,
    HAS_DBIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, TMA: tl.constexpr, A_T: tl.constexpr,
    B_T: tl.constexpr, TMA_STORE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    """DH = where(H <= 0, 0, A @ B) (A = g, B = W2) and, per row tile, the fp32
    column sums of DH (the db1 partials).  OUT_DESC as in fc_kernel, over DH."""
    if PERSISTENT and TMA_STORE:
        _persistent_gemm(A, B, M, N, K, _dh_epilogue, (H, DH, OUT_DESC, DB_PART, M, N, stride_hm, stride_dhm,
                         HAS_DBIAS), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M,
                         INPUT_PRECISION=INPUT_PRECISION, A_T=A_T, B_T=B_T)
    else:
        acc, pid_m, pid_n = _gemm_tile(A, B, M, N, K, (stride_am, stride_ak, stride_bk, stride_bn),
                                       BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M,
                                       INPUT_PRECISION=INPUT_PRECISION, TMA=TMA, A_T=A_T, B_T=B_T)
        _in_column_slices(acc, pid_m, pid_n, _dh_epilogue, (H, DH, None, DB_PART, M, N, stride_hm, stride_dhm,
                          HAS_DBIAS), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, EIGHTHS=False)


@triton.jit
def _store_epilogue(acc, row0, col0, C, OUT_DESC, M, N, stride_cm, BLOCK_M: tl.constexpr, SLICE_N: tl.constexpr):
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, SLICE_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    _store_slice(C, OUT_DESC, acc, row0, col0, rows, cols, mask, stride_cm)


@triton.jit
def matmul_kernel(
    A, B, C, OUT_DESC,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
    INPUT_PRECISION: tl.constexpr, TMA: tl.constexpr, A_T: tl.constexpr, B_T: tl.constexpr, TMA_STORE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    """C = A @ B: dx = dh @ W1 and the weight gradients dW2 = g^T @ h, dW1 = dh^T @ x.  OUT_DESC as in
    fc_kernel."""
    if PERSISTENT and TMA_STORE:
        _persistent_gemm(A, B, M, N, K, _store_epilogue, (C, OUT_DESC, M, N, stride_cm),
                         BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M,
                         INPUT_PRECISION=INPUT_PRECISION, A_T=A_T, B_T=B_T)
    else:
        acc, pid_m, pid_n = _gemm_tile(A, B, M, N, K, (stride_am, stride_ak, stride_bk, stride_bn),
                                       BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M,
                                       INPUT_PRECISION=INPUT_PRECISION, TMA=TMA, A_T=A_T, B_T=B_T)
        _in_column_slices(acc, pid_m, pid_n, _store_epilogue, (C, None, M, N, stride_cm),
                          BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, EIGHTHS=False)


@triton.jit(do_not_specialize=["seed"])
def dropout_bwd_kernel(
    DY, G, DB_PART,
    M, N, stride_dym, stride_dyn, rows_per_program,
    seed, drop_threshold, drop_scale,
    DROPOUT: tl.constexpr, WRITE_G: tl.constexpr, HAS_DBIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """G = DY * keep / (1 - p) and this program's fp32 column sums of G (db2
    partials) over its range of rows."""
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid_r * rows_per_program
    row_end = row_start + rows_per_program
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = ((rows < row_end) & (rows < M))[:, None] & col_ok[None, :]
        r = rows.to(tl.int64)[:, None]
        g = tl.load(DY + r * stride_dym + cols[None, :] * stride_dyn, mask=mask, other=0.0).to(tl.float32)
        if DROPOUT:
            g = g * _dropout_multiplier(seed, rows, pid_n * BLOCK_N, drop_threshold, drop_scale, BLOCK_M=BLOCK_M,
                                        BLOCK_N=BLOCK_N)
        if WRITE_G:
            tl.store(G + r * N + cols[None, :], g.to(G.dtype.element_ty), mask=mask)
        if HAS_DBIAS:
            db += tl.sum(g, axis=0)
    if HAS_DBIAS:
        tl.store(DB_PART + pid_r.to(tl.int64) * N + cols, db, mask=col_ok)


_GEMM_KEY = ["M", "N", "K", "INPUT_PRECISION", "TMA", "A_T", "B_T", "TMA_STORE"]
# Token counts are M or K of every GEMM: sizes key by their power-of-two bucket (prune_gemm_configs
# reads next_power_of_2 of M and N too), so a new batch size does not tune again.
_GEMM_BUCKETS = ["M", "N", "K"]
_GEMM_PRUNE = {"early_config_prune": prune_gemm_configs}
_fc = tuning.autotune(_for_launch(GEMM_CONFIGS, _INTERP_GEMM), key=_GEMM_KEY + ["RELU", "DROPOUT", "HAS_RESIDUAL"],
                      prune_configs_by=_GEMM_PRUNE, buckets=_GEMM_BUCKETS)(fc_kernel)
_dh = tuning.autotune(_for_launch(GEMM_CONFIGS, _INTERP_GEMM), key=_GEMM_KEY,
                      prune_configs_by=_GEMM_PRUNE, buckets=_GEMM_BUCKETS)(dh_kernel)
_matmul = tuning.autotune(_for_launch(GEMM_CONFIGS, _INTERP_GEMM), key=_GEMM_KEY,
                          prune_configs_by=_GEMM_PRUNE, buckets=_GEMM_BUCKETS)(matmul_kernel)
_dropout_bwd = tuning.autotune(_for_launch(DROPOUT_BWD_CONFIGS, _INTERP_DROPOUT_BWD), key=["N", "DROPOUT", "WRITE_G"],
                               prune_configs_by={"early_config_prune": prune_dropout_bwd_configs},
                               buckets=["N"])(dropout_bwd_kernel)


# --------------------------------------------------------------------------- launchers
def input_precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


# Whether the GEMMs read their operands through TMA descriptors ("auto" | "on" | "off", see
# dispatch.tma_enabled).
TMA = "auto"


def _tma_operand(t):
    """(descriptor, stored transposed) for a 2-D operand view, or None where TMA cannot read it: the view
    itself when its rows are contiguous, else the transposed storage it is a view of (W^T, g^T, dh^T)."""
    if t.stride(1) == 1 and dispatch.tma_aligned(t, 1):
        return TensorDescriptor(t, list(t.shape), [t.stride(0), 1], [1, 1]), False
    if t.stride(0) == 1 and dispatch.tma_aligned(t, 0):
        return TensorDescriptor(t, [t.shape[1], t.shape[0]], [t.stride(1), 1], [1, 1]), True
    return None


def _operands(a, b):
    """(A, B, flags) to launch a GEMM on the views a (M, K) and b (K, N): descriptors where the switch, the
    device and both layouts allow (the block shapes are set by the config's pre-hook), else the tensors."""
    if dispatch.tma_enabled(TMA, a, "opt_core.kernels.relu_mlp.TMA"):
        da, db = _tma_operand(a), _tma_operand(b)
        if da is not None and db is not None:
            return da[0], db[0], dict(TMA=True, A_T=da[1], B_T=db[1])
    return a, b, dict(TMA=False, A_T=False, B_T=False)


# Whether GEMMs on the TMA path may run the persistent configs, which write their output through TMA
# stores: "auto" beside today's configs (the autotuner picks per shape bucket), "off" today's kernels only
# (the A/B baseline).
PERSISTENT = "auto"
PERSISTENT_MODES = ("auto", "off")


def _output(c, layout):
    """(OUT_DESC, TMA_STORE) for a GEMM writing the contiguous c: c's descriptor (the pre-hook sets its block
    shape) where the switch allows, the operands come through TMA and c's layout suits TMA; else (None,
    False)."""
    if PERSISTENT not in PERSISTENT_MODES:
        raise ValueError(f"opt_core.kernels.relu_mlp.PERSISTENT must be one of {PERSISTENT_MODES}, got {PERSISTENT!r}")
    if PERSISTENT == "off" or not layout["TMA"] or not dispatch.tma_aligned(c, 1):
        return None, False
    return TensorDescriptor(c, list(c.shape), [c.stride(0), 1], [1, 1]), True


# Whether the GEMMs go to the Gluon ping-pong kernels (kernels/relu_mlp_gluon.py: sm_90, fp16/bf16, operands
# and output as TMA reads and writes them) where they take the launch: "off" | "on"; every GEMM of the block
# (GEMM 2's dropout draws the same keep-mask).  Off until a GPU run has passed their gpu tests and measured
# them faster.
GLUON = "off"
GLUON_MODES = ("off", "on")


def _gluon(a, b, c, **epilogue):
    """The Gluon module where the switch is on, the tensors are CUDA ones and it takes c = epilogue(a @ b)
    with the epilogue's tensors (bias, residual or h); else None (the caller launches the Triton kernel)."""
    if GLUON not in GLUON_MODES:
        raise ValueError(f"opt_core.kernels.relu_mlp.GLUON must be one of {GLUON_MODES}, got {GLUON!r}")
    if GLUON == "off" or not a.is_cuda:
        return None
    from opt_core.kernels import relu_mlp_gluon  # here: a Triton without Gluon's Hopper modules still imports us

    return relu_mlp_gluon if relu_mlp_gluon.supported(a, b, c, **epilogue) else None


def _gemm_grid(M, N, device):
    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        if meta["PERSISTENT"] and meta["TMA_STORE"]:
            # One program per SM (a persistent tile fills an SM's shared memory), each walking its tiles.
            return (min(tiles, dispatch.num_sms(device)),)
        return (tiles,)
    return grid


def _dropout_args(seed, p):
    if p == 0.0:
        return 0, 0, 1.0
    return int(seed), dropout_threshold(p), 1.0 / (1.0 - p)


def _launch_matmul(a, b, c):
    """c = a @ b for 2-D views with any strides (c contiguous)."""
    gluon = _gluon(a, b, c)
    if gluon is not None:
        return gluon.gemm(a, b, c)
    M, K = a.shape
    N = b.shape[1]
    A, B, layout = _operands(a, b)
    out_desc, tma_store = _output(c, layout)
    _matmul[_gemm_grid(M, N, c.device)](
        A, B, c, out_desc, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0),
        INPUT_PRECISION=input_precision(a.dtype), TMA_STORE=tma_store, **layout,
    )


def _launch_fc1(x, w1, b1, h):
    """GEMM 1: h = relu(x @ W1^T + b1); W1^T is W1 read with its strides swapped."""
    gluon = _gluon(x, w1.t(), h, bias=b1)
    if gluon is not None:
        return gluon.gemm(x, w1.t(), h, bias=b1, relu=True)
    M, d = x.shape
    ffn = w1.shape[0]
    A, B, layout = _operands(x, w1.t())
    out_desc, tma_store = _output(h, layout)
    _fc[_gemm_grid(M, ffn, h.device)](
        A, B, b1, None, h, out_desc, M, ffn, d,
        x.stride(0), x.stride(1), w1.stride(1), w1.stride(0), 0, 0, h.stride(0),
        0, 0, 1.0,
        HAS_BIAS=b1 is not None, RELU=True, DROPOUT=False, HAS_RESIDUAL=False,
        INPUT_PRECISION=input_precision(x.dtype), TMA_STORE=tma_store, **layout,
    )


def _launch_fc2(h, w2, b2, residual, seed, p, out):
    """GEMM 2: out = residual + dropout(h @ W2^T + b2)."""
    gluon = _gluon(h, w2.t(), out, bias=b2, residual=residual)
    if gluon is not None:
        return gluon.gemm(h, w2.t(), out, bias=b2, dropout=_dropout_args(seed, p) if p > 0.0 else None,
                          residual=residual)
    M, ffn = h.shape
    d = w2.shape[0]
    seed_, threshold, scale = _dropout_args(seed, p)
    A, B, layout = _operands(h, w2.t())
    out_desc, tma_store = _output(out, layout)
    _fc[_gemm_grid(M, d, out.device)](
        A, B, b2, residual, out, out_desc, M, d, ffn,
        h.stride(0), h.stride(1), w2.stride(1), w2.stride(0),
        residual.stride(0) if residual is not None else 0, residual.stride(1) if residual is not None else 0,
        out.stride(0),
        seed_, threshold, scale,
        HAS_BIAS=b2 is not None, RELU=False, DROPOUT=p > 0.0, HAS_RESIDUAL=residual is not None,
        INPUT_PRECISION=input_precision(h.dtype), TMA_STORE=tma_store, **layout,
    )


def _launch_dh(g, w2, h, dh, has_db1):
    """dh = (g @ W2) * [h > 0]; with has_db1 also db1 (fp32 partials, reduced here)."""
    gluon = _gluon(g, w2, dh, h=h)
    if gluon is not None:
        return gluon.dh(g, w2, dh, h, has_db1)
    M, d = g.shape
    ffn = w2.shape[1]
    db1_part = None
    if has_db1:
        # A row per row tile of the smallest BLOCK_M the launch may pick; the
        # config it runs with writes the first cdiv(M, its BLOCK_M) rows.
        min_block_m = min(c.kwargs["BLOCK_M"] for c in _dh.configs)
        db1_part = dispatch.empty((triton.cdiv(M, min_block_m), ffn), dtype=torch.float32, device=g.device)
    A, B, layout = _operands(g, w2)
    out_desc, tma_store = _output(dh, layout)
    _dh[_gemm_grid(M, ffn, dh.device)](
        A, B, h, dh, out_desc, db1_part, M, ffn, d,
        g.stride(0), g.stride(1), w2.stride(0), w2.stride(1), h.stride(0), dh.stride(0),
        HAS_DBIAS=has_db1, INPUT_PRECISION=input_precision(g.dtype), TMA_STORE=tma_store, **layout,
    )
    if not has_db1:
        return None
    return db1_part[: triton.cdiv(M, _dh.best_config.kwargs["BLOCK_M"])].sum(0)


def _launch_fwd(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
                residual: Optional[Tensor], seed: Tensor, dropout_p: float) -> tuple[Tensor, Tensor]:
    """(out, h) over the rows of x (its last dimension): out in x's shape, h = relu(fc1(x)) one row per
    token, what the backward needs.  ``seed`` is a 0-dim int64 CPU tensor; dropout is off when
    ``dropout_p`` is 0."""
    shape, d = x.shape, x.shape[-1]
    x = x.reshape(-1, d)
    residual = residual.reshape(-1, d) if residual is not None else None
    M, ffn = x.shape[0], w1.shape[0]
    h = dispatch.empty((M, ffn), dtype=x.dtype, device=x.device)
    out = dispatch.empty(shape, dtype=x.dtype, device=x.device)
    if M == 0:
        return out, h
    # Biases are read as plain vectors; a strided one (a view) is copied.
    b1, b2 = (b.contiguous() if b is not None else None for b in (b1, b2))
    _launch_fc1(x, w1, b1, h)
    _launch_fc2(h, w2, b2, residual, seed, dropout_p, out.view(M, d))
    return out, h


def _launch_dropout_bwd(dy, seed, p, write_g, has_dbias):
    M, N = dy.shape
    g = dispatch.empty((M, N) if write_g else (0,), dtype=dy.dtype, device=dy.device)
    # About four programs per SM over the (column tiles x row ranges) grid.
    col_tiles = triton.cdiv(N, 128)
    row_ranges = max(1, min(triton.cdiv(M, DROPOUT_BWD_ROW_QUANTUM),
                            triton.cdiv(4 * dispatch.num_sms(dy.device), col_tiles)))
    q = DROPOUT_BWD_ROW_QUANTUM
    rows_per_program = triton.cdiv(triton.cdiv(M, row_ranges), q) * q
    row_ranges = triton.cdiv(M, rows_per_program)
    db_part = dispatch.empty((row_ranges, N) if has_dbias else (0,), dtype=torch.float32, device=dy.device)
    seed_, threshold, scale = _dropout_args(seed, p)
    _dropout_bwd[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), row_ranges)](
        dy, g, db_part, M, N, dy.stride(0), dy.stride(1), rows_per_program,
        seed_, threshold, scale,
        DROPOUT=p > 0.0, WRITE_G=write_g, HAS_DBIAS=has_dbias,
    )
    return g, db_part


def _launch_bwd(dy: Tensor, x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
                h: Tensor, seed: Tensor, dropout_p: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw1, db1, dw2, db2); a bias gradient is empty where the bias is None.  The kernels use the
    saved h (and the biases only for whether they exist)."""
    M, d = x.shape
    ffn = w1.shape[0]
    has_b1, has_b2 = b1 is not None, b2 is not None
    dx = dispatch.empty((M, d), dtype=x.dtype, device=x.device)
    dw1 = dispatch.empty((ffn, d), dtype=w1.dtype, device=x.device)
    dw2 = dispatch.empty((d, ffn), dtype=w2.dtype, device=x.device)
    if M == 0:
        dw1.zero_()
        dw2.zero_()
        return (dx, dw1, x.new_zeros(ffn if has_b1 else 0), dw2, x.new_zeros(d if has_b2 else 0))

    # g = dropout'(dy) (and db2's partials).  Without dropout a unit-stride dy
    # is g already; any other stride (an expanded .sum() gradient) is copied
    # by the same pass, so the GEMMs below read g with its natural layout.
    write_g = dropout_p > 0.0 or dy.stride(1) != 1
    # Absent bias gradients are distinct empty tensors: a custom op's outputs
    # may not alias each other.
    g, db2 = dy, x.new_empty(0)
    if write_g or has_b2:
        g_buf, db2_part = _launch_dropout_bwd(dy, seed, dropout_p, write_g, has_b2)
        if write_g:
            g = g_buf
        if has_b2:
            db2 = db2_part.sum(0).to(x.dtype)

    dh = dispatch.empty((M, ffn), dtype=x.dtype, device=x.device)
    db1 = _launch_dh(g, w2, h, dh, has_b1)
    db1 = db1.to(x.dtype) if has_b1 else x.new_empty(0)
    _launch_matmul(g.t(), h, dw2)      # dW2 = g^T @ h
    _launch_matmul(dh, w1, dx)         # dx = dh @ W1
    _launch_matmul(dh.t(), x, dw1)     # dW1 = dh^T @ x
    return dx, dw1, db1, dw2, db2


# --------------------------------------------------------------------------- reference path
def _reference_mask(seed, p, M, d, device):
    return dropout_mask(int(seed), p, (M, d), device) if p > 0.0 else None


def _reference_fwd(x, w1, b1, w2, b2, residual, seed, p):
    # In x's own shape, so that out is not a view of a 2-D result (see relu_mlp); the mask is drawn per row.
    rows = math.prod(x.shape[:-1])
    mask = _reference_mask(seed, p, rows, w2.shape[0], x.device)
    out, h = reference.relu_mlp(x, w1, b1, w2, b2, residual, mask.view(x.shape) if mask is not None else None, p,
                                return_hidden=True)
    return out, h.reshape(rows, w1.shape[0])


def _reference_bwd(dy, x, w1, b1, w2, b2, h, seed, p):
    # Differentiates the reference forward again from x and the weights: the saved h goes unread.
    mask = _reference_mask(seed, p, x.shape[0], w2.shape[0], x.device)
    grads = dispatch.reference_vjp(
        lambda x_, w1_, b1_, w2_, b2_: reference.relu_mlp(x_, w1_, b1_, w2_, b2_, None, mask, p),
        (x, w1, b1, w2, b2), dy,
    )
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


# --------------------------------------------------------------------------- torch.library ops
def _fwd_fake(x, w1, b1, w2, b2, residual, seed, dropout_p):
    return x.new_empty(x.shape), x.new_empty((math.prod(x.shape[:-1]), w1.shape[0]))


def _bwd_fake(dy, x, w1, b1, w2, b2, h, seed, dropout_p):
    return (
        x.new_empty(x.shape),
        w1.new_empty(w1.shape),
        b1.new_empty(b1.shape) if b1 is not None else x.new_empty(0),
        w2.new_empty(w2.shape),
        b2.new_empty(b2.shape) if b2 is not None else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, residual, seed, dropout_p = inputs
    _, h = output
    ctx.has_residual = residual is not None
    ctx.dropout_p = dropout_p
    # Per token only x and h (the post-ReLU activation) are kept: no
    # pre-activation, no dropout mask.
    ctx.save_for_backward(x, w1, b1, w2, b2, h, seed)
    ctx.mark_non_differentiable(h)


def _backward(ctx, dout, _dh):
    x, w1, b1, w2, b2, h, seed = ctx.saved_tensors
    d = x.shape[-1]
    dx, dw1, db1, dw2, db2 = torch.ops.opt_core.relu_mlp_bwd(dout.reshape(-1, d), x.reshape(-1, d), w1, b1, w2, b2,
                                                             h, seed, ctx.dropout_p)
    return (
        dx.view(x.shape),
        dw1,
        db1 if b1 is not None else None,
        dw2,
        db2 if b2 is not None else None,
        dout if ctx.has_residual else None,
        None,
        None,
    )


register_op("relu_mlp", dtypes=KERNEL_DTYPES, setup_context=_setup_context, gradients=_backward,
            forward=Direction(_launch_fwd, _reference_fwd, _fwd_fake, chosen_by="x"),
            backward=Direction(_launch_bwd, _reference_bwd, _bwd_fake, chosen_by="x"))


# --------------------------------------------------------------------------- public API
def _check_weight(name, w, shape, what):
    check_tensor(name, w, min_ndim=1)
    if tuple(w.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} ({what}), got {tuple(w.shape)}")


def relu_mlp(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    *,
    residual: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: Optional[int] = None,
) -> torch.Tensor:
    """OPT's feed-forward block: ``residual + dropout(fc2(relu(fc1(x))))``.

    ``x`` is ``(..., d)``; ``fc1_weight`` ``(ffn, d)`` and ``fc2_weight`` ``(d, ffn)``
    in ``nn.Linear`` layout, biases ``(ffn,)`` / ``(d,)`` or None; ``residual``
    like ``x`` or None.  Every tensor has ``x``'s dtype and device.  Dropout
    (probability ``dropout_p`` in [0, 1)) applies only when ``training``; its
    mask comes from ``seed`` (an int in [0, 2^63)), drawn from torch's CPU
    generator when None, so ``torch.manual_seed`` reproduces a run.
    ``dropout_mask(seed, p, out.shape)`` regenerates the keep-mask.
    fp16/bf16/fp32 run the Triton kernels (fp32 accumulation; fp32 operands
    without TF32), or ``kernels/native.py`` on a CPU without the interpreter
    (plain autograd; dropout there is torch's own ``F.dropout``, ``seed`` unused);
    fp64 runs the reference.
    """
    check_tensor("x", x, min_ndim=1)
    d = x.shape[-1]
    if d < 1:
        raise ValueError(f"x must have a last dimension of at least 1, got shape {tuple(x.shape)}")
    check_tensor("fc1_weight", fc1_weight, min_ndim=2)
    ffn = fc1_weight.shape[0]
    if ffn < 1:
        raise ValueError(f"fc1_weight must have at least one output feature, got shape {tuple(fc1_weight.shape)}")
    _check_weight("fc1_weight", fc1_weight, (ffn, d), f"out_features, in_features = x's last dimension {d}")
    _check_weight("fc2_weight", fc2_weight, (d, ffn), f"out_features = {d}, in_features = fc1's out_features {ffn}")
    if fc1_bias is not None:
        check_tensor("fc1_bias", fc1_bias)
        check_shape("fc1_bias", fc1_bias, (ffn,))
    if fc2_bias is not None:
        check_tensor("fc2_bias", fc2_bias)
        check_shape("fc2_bias", fc2_bias, (d,))
    if residual is not None:
        check_tensor("residual", residual)
        check_shape("residual", residual, tuple(x.shape))
    for name, t in (("fc1_weight", fc1_weight), ("fc1_bias", fc1_bias), ("fc2_weight", fc2_weight),
                    ("fc2_bias", fc2_bias), ("residual", residual)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {t.dtype}")
    check_same_device("x", x, fc1_weight=fc1_weight, fc1_bias=fc1_bias, fc2_weight=fc2_weight,
                      fc2_bias=fc2_bias, residual=residual)
    dropout_p = check_dropout("dropout_p", dropout_p)
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    if seed is not None:
        check_seed("seed", seed)

    p = dropout_p if training else 0.0
    if dispatch.use_native(x, KERNEL_DTYPES):
        return native.relu_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual=residual, dropout_p=p)
    if p == 0.0:
        seed_t = torch.zeros((), dtype=torch.int64)
    elif seed is None:
        seed_t = torch.randint(0, 2**62, (), dtype=torch.int64)
    else:
        seed_t = torch.tensor(seed, dtype=torch.int64)
    # The op takes x in its own shape and returns out in it, a fresh tensor and not a view of a 2-D one. FSDP2
    # warns about a module that returns a view: an in-place op on it would drop FSDP2's hook.
    out, _ = torch.ops.opt_core.relu_mlp_fwd(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, seed_t, p)
    return out
