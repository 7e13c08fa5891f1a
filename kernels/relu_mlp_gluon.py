"""The ReLU-MLP's GEMMs for sm_90 in Gluon: a persistent, warp-specialised "ping-pong" GEMM (opt-in:
``relu_mlp.GLUON``).

C = A @ B (+ epilogue) for fp16/bf16 operands with fp32 accumulation, C in the operands' dtype.  A is
(M, K) and B (K, N), each read through a TMA descriptor over the tensor as stored: a view whose
columns are contiguous (x, h, dh, g) directly, a transposed view (W^T, g^T, dh^T) as a descriptor over
its storage with the shared-memory tile permuted for the wgmma (``A_T`` / ``B_T``, as in relu_mlp).
Epilogues (``gemm_kernel``, ``dh_kernel``): a plain store (dx, dW1, dW2), bias + ReLU (GEMM 1), bias +
dropout + residual (GEMM 2), the ReLU mask from the saved activation and db1's partial column sums (dh).
The dropout's keep-mask is relu_mlp's bit for bit (the same Philox4x32-10 words from (seed, column // 4,
row), ``relu_mlp.dropout_mask``).

Schedule (CUTLASS's "ping-pong"), one program per SM, persistent over the output tiles in grouped
order (program p owns tiles p, p + P, p + 2P, ... of the P programs):

- a producer warp issues the TMA loads of A's and B's K slices for every tile the program owns, in
  tile order, into a ring of ``NUM_STAGES`` shared-memory slots; each slot has a "ready" mbarrier
  (its bytes arrived) and an "empty" one (its consumer is done with it);
- two consumer warpgroups take alternate tiles of the program (consumer c its tiles c, c + 2, ...).
  A consumer runs its tile's main loop (async wgmma, ``warpgroup_mma_wait(1)``: one product in flight
  while the next slot is awaited, the slot before released), hands the turn to the other consumer as
  soon as its last product is issued (``turn`` barriers: main loops never interleave, so one tile
  gets the tensor cores at a time), and then runs its epilogue while the other's main loop runs;
- the epilogue works in column slices of ``SLICE_N`` (``DROPOUT_SLICE_N`` with dropout, whose Philox
  words take four registers per element: registers stay bounded), each slice written by a TMA store from
  the consumer's own staging buffer (TMA clips rows and columns past the edges).

The interpreter cannot run Gluon: the kernel is checked by the AOT compile (``aot_cases``) and by
``gpu``-marked tests.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from opt_core.kernels import dispatch
from opt_core.kernels.gluon_hopper import barriers, gl_dtype, mma_layout, release

DTYPES = (torch.float16, torch.bfloat16)
# One consumer warpgroup's tile and the ring: a 128x128 fp32 accumulator is 128 registers per thread
# (a 128x256 one would be 256, more than a thread has); a stage is (128 + 128) x 64 x 2 = 32 KiB, so
# five stages and the two consumers' [128, 64] staging buffers take 192 KiB of sm_90's 227.
BLOCK_M, BLOCK_N, BLOCK_K = 128, 128, 64
SLICE_N = 64
DROPOUT_SLICE_N = 32
NUM_STAGES = 5
GROUP_M = 8
# Registers per thread (setmaxnreg) of the worker partitions, the second consumer and the producer
# warp; the default partition (the first consumer) gets the consumers' 240 too.  The launch runs 12
# warps (the producer's warpgroup holds 3 idle ones): 2 * 128 * 240 + 128 * 24 <= 64K registers.
CONSUMER_REGS = gl.constexpr(240)
PRODUCER_REGS = gl.constexpr(24)
NUM_WARPS = 4


@gluon.jit
def _tile_coordinates(tile, M, N, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
    # Grouped order, as relu_mlp's: GROUP_M row tiles walk down one column of tiles before moving
    # right, so the B columns they stream are reused from L2 by the whole group.
    tiles_m = gl.cdiv(M, BLOCK_M)
    tiles_n = gl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (tile // per_group) * GROUP_M
    group_m = gl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % group_m
    pid_n = (tile % per_group) // group_m
    return pid_m * BLOCK_M, pid_n * BLOCK_N


@gluon.jit
def _producer(a_desc, b_desc, a_smem, b_smem, ready, empty, M, N, K,
              A_T: gl.constexpr, B_T: gl.constexpr, GROUP_M: gl.constexpr):
    """Loads A's and B's K slices of every tile this program owns, in tile order, into the ring."""
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[1 if A_T else 0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[0 if A_T else 1]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0 if B_T else 1]
    NUM_STAGES: gl.constexpr = a_smem.shape[0]
    nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
    tiles = gl.cdiv(M, BLOCK_M) * gl.cdiv(N, BLOCK_N)
    k_steps = gl.cdiv(K, BLOCK_K)
    slot_count = 0
    for tile in range(gl.program_id(0), tiles, gl.num_programs(0)):
        off_m, off_n = _tile_coordinates(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        for k in range(k_steps):
            slot = slot_count % NUM_STAGES
            # A fresh barrier counts as having completed the phase before its first: the first lap
            # waits on nothing.
            mbarrier.wait(empty.index(slot), ((slot_count // NUM_STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(slot), nbytes)
            off_k = k * BLOCK_K
            if A_T:
                tma.async_copy_global_to_shared(a_desc, [off_k, off_m], ready.index(slot), a_smem.index(slot))
            else:
                tma.async_copy_global_to_shared(a_desc, [off_m, off_k], ready.index(slot), a_smem.index(slot))
            if B_T:
                tma.async_copy_global_to_shared(b_desc, [off_n, off_k], ready.index(slot), b_smem.index(slot))
            else:
                tma.async_copy_global_to_shared(b_desc, [off_k, off_n], ready.index(slot), b_smem.index(slot))
            slot_count += 1


@gluon.jit
def _operand(smem, slot, TRANSPOSED: gl.constexpr):
    """A ring slot as the wgmma reads it: a tile stored transposed is a permuted view, never a copy."""
    tile = smem.index(slot)
    if TRANSPOSED:
        tile = tile.permute((1, 0))
    return tile


@gluon.jit
def _mainloop(a_smem, b_smem, ready, empty, handoff, slot_count, k_steps,
              A_T: gl.constexpr, B_T: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """One tile's fp32 accumulator from the ring slots slot_count .. slot_count + k_steps - 1.  The
    other consumer's turn (``handoff``) starts once the last product is issued."""
    NUM_STAGES: gl.constexpr = a_smem.shape[0]
    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma_layout(BLOCK_N))
    for k in range(k_steps):
        slot = slot_count % NUM_STAGES
        mbarrier.wait(ready.index(slot), (slot_count // NUM_STAGES) & 1)
        a = _operand(a_smem, slot, A_T)
        b = _operand(b_smem, slot, B_T)
        acc = warpgroup_mma(a, b, acc, is_async=True)
        # This product stays in flight; the one before it is done, and so is its slot.
        acc = warpgroup_mma_wait(1, deps=(acc, a, b))[0]
        if k > 0:
            release(empty.index((slot_count - 1) % NUM_STAGES))
        slot_count += 1
    mbarrier.arrive(handoff)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    release(empty.index((slot_count - 1) % NUM_STAGES))
    return acc


@gluon.jit
def _column_slices(acc, SLICES: gl.constexpr):
    """acc's SLICES (a power of two) column slices, left to right, by halving."""
    parts = (acc,)
    for _ in gl.static_range(SLICES.bit_length() - 1):
        halves = ()
        for j in gl.static_range(len(parts)):
            x = parts[j]
            # (M, 2, N/2) then the 2 last, so each half keeps its columns contiguous
            halves += x.reshape([x.shape[0], 2, x.shape[1] // 2]).permute((0, 2, 1)).split()
        parts = halves
    return parts


@gluon.jit
def _keep_multiplier(seed, rows, cols, drop_threshold, drop_scale):
    """[rows, cols] fp32 tile of 0 (dropped) or drop_scale (kept), relu_mlp's keep-mask bit for bit: word
    col % 4 of Philox4x32-10 keyed by the 64-bit seed on the counter (col // 4, row, 0, 0), kept when its
    top 31 bits are >= drop_threshold.  relu_mlp shares one call per four columns; here the four columns
    lie in two threads, so each thread's two of them share one call (the compiler merges the identical
    computations) and every call is made twice: the other consumer's main loop hides the cost."""
    seed = seed.to(gl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(gl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(gl.uint32)
    c0 = (cols // 4).to(gl.uint32, bitcast=True)[None, :]
    c1 = rows.to(gl.uint32, bitcast=True)[:, None]
    c2 = gl.zeros_like(c0)
    c3 = gl.zeros_like(c0)
    for _ in gl.static_range(10):
        c0, c1, c2, c3 = (gl.umulhi(c2, 0xCD9E8D57) ^ c1 ^ k0, c2 * 0xCD9E8D57,
                          gl.umulhi(c0, 0xD2511F53) ^ c3 ^ k1, c0 * 0xD2511F53)
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    q = (cols % 4)[None, :]
    word = gl.where(q == 0, c0, gl.where(q == 1, c1, gl.where(q == 2, c2, c3)))
    return gl.where((word >> 1).to(gl.int32) >= drop_threshold, drop_scale, 0.0)


@gluon.jit
def _fc_epilogue(x, off_m, col0, M, N, BIAS, RES, stride_rm, stride_rn, seed, drop_threshold, drop_scale,
                 HAS_BIAS: gl.constexpr, RELU: gl.constexpr, DROPOUT: gl.constexpr, HAS_RESIDUAL: gl.constexpr):
    """GEMM 1, GEMM 2 and the plain store on the [BLOCK_M, SLICE_N] fp32 slice x at (off_m, col0): + bias,
    ReLU, dropout, + residual, in relu_mlp's order."""
    layout: gl.constexpr = x.type.layout
    rows = off_m + gl.arange(0, x.shape[0], layout=gl.SliceLayout(1, layout))
    cols = col0 + gl.arange(0, x.shape[1], layout=gl.SliceLayout(0, layout))
    col_ok = cols < N
    if HAS_BIAS:
        x = x + gl.load(BIAS + cols, mask=col_ok, other=0.0).to(gl.float32)[None, :]
    if RELU:
        # A select, not maximum: NaN stays NaN, as in relu_mlp's epilogue and PyTorch.
        x = gl.where(x < 0, 0.0, x)
    if DROPOUT:
        # a multiply, not a select: NaN and inf propagate as in PyTorch's dropout
        x = x * _keep_multiplier(seed, rows, cols, drop_threshold, drop_scale)
    if HAS_RESIDUAL:
        mask = (rows < M)[:, None] & col_ok[None, :]
        offsets = rows.to(gl.int64)[:, None] * stride_rm + cols.to(gl.int64)[None, :] * stride_rn
        x = x + gl.load(RES + offsets, mask=mask, other=0.0).to(gl.float32)
    return x


@gluon.jit
def _dh_epilogue(x, off_m, col0, M, N, H, DB_PART, stride_hm, HAS_DBIAS: gl.constexpr):
    """dh on the slice x at (off_m, col0): where(h <= 0, 0, x) with the saved activation h (relu_mlp's mask:
    a NaN h passes its gradient), and with HAS_DBIAS the slice's fp32 column sums into row off_m // BLOCK_M
    of DB_PART (db1's partials; rows past M load h = 0 and add nothing)."""
    layout: gl.constexpr = x.type.layout
    rows = off_m + gl.arange(0, x.shape[0], layout=gl.SliceLayout(1, layout))
    cols = col0 + gl.arange(0, x.shape[1], layout=gl.SliceLayout(0, layout))
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    h = gl.load(H + rows.to(gl.int64)[:, None] * stride_hm + cols[None, :], mask=mask, other=0.0)
    x = gl.where(h <= 0, 0.0, x)
    if HAS_DBIAS:
        gl.store(DB_PART + (off_m // x.shape[0]).to(gl.int64) * N + cols, gl.sum(x, axis=0), mask=col_ok)
    return x


@gluon.jit
def _store_tile(acc, c_desc, c_smem, off_m, off_n, M, N, EPILOGUE: gl.constexpr, epilogue_args):
    """The epilogue of one tile, ``EPILOGUE(slice, off_m, col0, M, N, *epilogue_args)`` on a column slice
    at a time, each slice written by a TMA store from c_smem."""
    SLICE_N: gl.constexpr = c_desc.block_type.shape[1]
    slices = _column_slices(acc, acc.shape[1] // SLICE_N)
    for i in gl.static_range(len(slices)):
        col0 = off_n + i * SLICE_N
        x = EPILOGUE(slices[i], off_m, col0, M, N, *epilogue_args)
        # The previous slice's store has read c_smem (only the issuing thread waits on its copy; the
        # barrier tells the others).
        tma.store_wait(0)
        gl.thread_barrier()
        c_smem.store(x.to(c_desc.dtype))
        fence_async_shared()
        gl.thread_barrier()  # every warp's part is in shared memory before one thread starts the copy
        tma.async_copy_shared_to_global(c_desc, [off_m, col0], c_smem)


@gluon.jit
def _consumer(C: gl.constexpr, a_smem, b_smem, c_smem, bars, c_desc, M, N, K, EPILOGUE: gl.constexpr,
              epilogue_args, A_T: gl.constexpr, B_T: gl.constexpr, GROUP_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """Consumer ``C``: the program's tiles C, C + 2, ...; main loop in its turn, then the epilogue."""
    ready, empty, turn = bars
    BLOCK_M: gl.constexpr = c_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_smem.shape[1 if A_T else 2]
    programs = gl.num_programs(0)
    tiles = gl.cdiv(M, BLOCK_M) * gl.cdiv(N, BLOCK_N)
    k_steps = gl.cdiv(K, BLOCK_K)
    slot_count = C * k_steps  # the ring slots of this consumer's first tile, the program's tile C
    my_turn = 0
    for tile in range(gl.program_id(0) + C * programs, tiles, 2 * programs):
        off_m, off_n = _tile_coordinates(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        mbarrier.wait(turn.index(C), my_turn & 1)
        acc = _mainloop(a_smem, b_smem, ready, empty, turn.index(1 - C), slot_count, k_steps, A_T, B_T,
                        BLOCK_M, BLOCK_N)
        _store_tile(acc, c_desc, c_smem.index(C), off_m, off_n, M, N, EPILOGUE, epilogue_args)
        slot_count += 2 * k_steps  # past the other consumer's tile
        my_turn += 1
    tma.store_wait(0)


@gluon.jit
def _consumer0(a_smem, b_smem, c_smem, bars, c_desc, M, N, K, EPILOGUE: gl.constexpr, epilogue_args,
               A_T: gl.constexpr, B_T: gl.constexpr, GROUP_M: gl.constexpr, BLOCK_N: gl.constexpr):
    _consumer(0, a_smem, b_smem, c_smem, bars, c_desc, M, N, K, EPILOGUE, epilogue_args, A_T, B_T, GROUP_M,
              BLOCK_N)


@gluon.jit
def _consumer1(a_smem, b_smem, c_smem, bars, c_desc, M, N, K, EPILOGUE: gl.constexpr, epilogue_args,
               A_T: gl.constexpr, B_T: gl.constexpr, GROUP_M: gl.constexpr, BLOCK_N: gl.constexpr):
    _consumer(1, a_smem, b_smem, c_smem, bars, c_desc, M, N, K, EPILOGUE, epilogue_args, A_T, B_T, GROUP_M,
              BLOCK_N)


@gluon.jit
def _ping_pong(a_desc, b_desc, c_desc, M, N, K, EPILOGUE: gl.constexpr, epilogue_args,
               A_T: gl.constexpr, B_T: gl.constexpr, GROUP_M: gl.constexpr, NUM_STAGES: gl.constexpr):
    """C = EPILOGUE(A @ B) with A (M, K), B (K, N): a_desc over A's storage ((K, M) with A_T), b_desc over
    B's ((N, K) with B_T), c_desc over C with one epilogue slice as its block; the schedule of the module
    docstring.  Callers write ``epilogue_args`` in the call: a tuple assigned to a variable first has its
    constexprs turned into tensors."""
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0 if B_T else 1]
    a_smem = gl.allocate_shared_memory(a_desc.dtype, [NUM_STAGES] + a_desc.block_type.shape, a_desc.layout)
    b_smem = gl.allocate_shared_memory(b_desc.dtype, [NUM_STAGES] + b_desc.block_type.shape, b_desc.layout)
    c_smem = gl.allocate_shared_memory(c_desc.dtype, [2] + c_desc.block_type.shape, c_desc.layout)
    # ready: the producer's TMA bytes; empty: the slot's consumer; turn: the other consumer's hand-off.
    bars = (barriers(NUM_STAGES, 1), barriers(NUM_STAGES, 1), barriers(2, 1))
    mbarrier.arrive(bars[2].index(0))  # consumer 0 takes the first turn
    gl.warp_specialize([
        (_consumer0, (a_smem, b_smem, c_smem, bars, c_desc, M, N, K, EPILOGUE, epilogue_args, A_T, B_T, GROUP_M,
                      BLOCK_N)),
        (_consumer1, (a_smem, b_smem, c_smem, bars, c_desc, M, N, K, EPILOGUE, epilogue_args, A_T, B_T, GROUP_M,
                      BLOCK_N)),
        (_producer, (a_desc, b_desc, a_smem, b_smem, bars[0], bars[1], M, N, K, A_T, B_T, GROUP_M)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


@gluon.jit(do_not_specialize=["seed"])
def gemm_kernel(
    a_desc, b_desc, c_desc, BIAS, RES, M, N, K, stride_rm, stride_rn, seed, drop_threshold, drop_scale,
    A_T: gl.constexpr, B_T: gl.constexpr, HAS_BIAS: gl.constexpr, RELU: gl.constexpr, DROPOUT: gl.constexpr,
    HAS_RESIDUAL: gl.constexpr, GROUP_M: gl.constexpr, NUM_STAGES: gl.constexpr,
):
    """C = [RES +] [dropout]([relu](A @ B [+ BIAS])): GEMM 1, GEMM 2, dx, dW1, dW2 (see ``_ping_pong``)."""
    _ping_pong(a_desc, b_desc, c_desc, M, N, K, _fc_epilogue,
               (BIAS, RES, stride_rm, stride_rn, seed, drop_threshold, drop_scale, HAS_BIAS, RELU, DROPOUT,
                HAS_RESIDUAL), A_T, B_T, GROUP_M, NUM_STAGES)


@gluon.jit
def dh_kernel(
    a_desc, b_desc, c_desc, H, DB_PART, M, N, K, stride_hm,
    A_T: gl.constexpr, B_T: gl.constexpr, HAS_DBIAS: gl.constexpr, GROUP_M: gl.constexpr, NUM_STAGES: gl.constexpr,
):
    """DH = where(H <= 0, 0, A @ B) (A = g, B = W2) and, per 128-row tile, DH's fp32 column sums into
    DB_PART (db1's partials, as relu_mlp's dh_kernel)."""
    _ping_pong(a_desc, b_desc, c_desc, M, N, K, _dh_epilogue, (H, DB_PART, stride_hm, HAS_DBIAS), A_T, B_T,
               GROUP_M, NUM_STAGES)


# --------------------------------------------------------------------------- host
def smem_layout(dtype: torch.dtype, block_shape) -> gl.NVMMASharedLayout:
    """Shared-memory layout of one [rows, cols] tile: what the TMA writes and the wgmma reads (or, for the
    output, what the epilogue writes and the TMA store reads)."""
    return gl.NVMMASharedLayout.get_default_for(list(block_shape), gl_dtype(dtype))


def _stored_as(t: Tensor) -> Optional[tuple[Tensor, bool]]:
    """(the 2-D storage a TMA descriptor reads, whether the view is its transpose) for the operand view t,
    or None where TMA cannot read it (relu_mlp's ``_tma_operand`` rule)."""
    if t.stride(1) == 1 and dispatch.tma_aligned(t, 1):
        return t, False
    if t.stride(0) == 1 and dispatch.tma_aligned(t, 0):
        return t.t(), True
    return None


def operand_block(rows: int, cols: int, transposed: bool) -> tuple[int, int]:
    """The block a descriptor over an operand's storage loads for a [rows, cols] tile of the operand."""
    return (cols, rows) if transposed else (rows, cols)


def slice_n(dropout: bool) -> int:
    """Columns of one epilogue slice (the output descriptor's block width)."""
    return DROPOUT_SLICE_N if dropout else SLICE_N


def _descriptor(storage: Tensor, block_shape) -> TensorDescriptor:
    # Blocks past the edges arrive as zeros (loads) or are clipped (stores).
    return TensorDescriptor(storage, list(storage.shape), list(storage.stride()), list(block_shape),
                            smem_layout(storage.dtype, block_shape))


def _check_types(a, b, c, **epilogue) -> None:
    """a, b, c and the epilogue's tensors (bias, residual, h: None where absent) are tensors of one 16-bit
    dtype."""
    tensors = dict(a=a, b=b, c=c, **epilogue)
    for name, t in tensors.items():
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if a.dtype not in DTYPES:
        raise TypeError(f"a must be float16 or bfloat16, got {a.dtype}")
    for name, t in tensors.items():
        if t is not None and t.dtype != a.dtype:
            raise TypeError(f"{name} must have a's dtype ({a.dtype}), got {t.dtype}")


def _problem(a, b, c, bias=None, residual=None, h=None) -> Optional[str]:
    """What keeps the kernels from computing c = epilogue(a @ b) with these tensors, or None; the device
    comes last, so every other check runs on any machine."""
    for name, t in (("a", a), ("b", b), ("c", c)):
        if t.dim() != 2:
            return f"{name} must be 2-D, got shape {tuple(t.shape)}"
    (M, K), N = a.shape, b.shape[1]
    if b.shape[0] != K or tuple(c.shape) != (M, N):
        return f"a (M, K), b (K, N) and c (M, N) must agree, got {tuple(a.shape)}, {tuple(b.shape)}, {tuple(c.shape)}"
    if M == 0 or N == 0 or K == 0:
        return f"M, N and K must be at least 1, got {M}, {N}, {K}"
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != N or bias.stride(0) != 1):
        return f"bias must be a contiguous ({N},) vector, got shape {tuple(bias.shape)}, strides {bias.stride()}"
    if residual is not None and tuple(residual.shape) != (M, N):
        return f"residual must have c's shape ({M}, {N}), got {tuple(residual.shape)}"
    if h is not None and (tuple(h.shape) != (M, N) or h.stride(1) != 1):
        return f"h must have c's shape ({M}, {N}) and unit column stride, got {tuple(h.shape)}, strides {h.stride()}"
    for name, t in (("a", a), ("b", b)):
        if _stored_as(t) is None:
            return (f"{name} must suit a TMA descriptor as stored (one unit stride, the other a multiple of 16 "
                    f"bytes, a 16-byte aligned base), got strides {t.stride()}")
    if not dispatch.tma_aligned(c, 1):
        return (f"c must be row-major with rows a multiple of 16 bytes and a 16-byte aligned base, got strides "
                f"{c.stride()}")
    tensors = [t for t in (a, b, c, bias, residual, h) if t is not None]
    if any(t.device != a.device for t in tensors) or a.device.type != "cuda":
        return f"every tensor must be on one CUDA device, got {sorted({str(t.device) for t in tensors})}"
    major, minor = torch.cuda.get_device_capability(a.device)
    if major != 9:
        return f"the device must have compute capability 9.x (Hopper), got {major}.{minor}"
    return None


def _check_dropout(dropout) -> None:
    """``dropout`` is None or relu_mlp's ``_dropout_args``: (seed, threshold, scale)."""
    if dropout is None:
        return
    if not (isinstance(dropout, tuple) and len(dropout) == 3):
        raise TypeError(f"dropout must be None or a (seed, threshold, scale) tuple, got {dropout!r}")
    seed, threshold, scale = dropout
    if not (isinstance(seed, int) and 0 <= seed < 2**63):
        raise ValueError(f"dropout's seed must be an int in [0, 2^63), got {seed!r}")
    if not (isinstance(threshold, int) and 0 <= threshold < 2**31):
        raise ValueError(f"dropout's threshold must be an int in [0, 2^31), got {threshold!r}")
    if not isinstance(scale, float):
        raise TypeError(f"dropout's scale must be a float, got {type(scale).__name__}")


def supported(a: Tensor, b: Tensor, c: Tensor, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
              h: Optional[Tensor] = None) -> bool:
    """Whether ``gemm`` (bias, residual) or ``dh`` (h) takes c = epilogue(a @ b) with these tensors (dropout
    never decides)."""
    try:
        _check_types(a, b, c, bias=bias, residual=residual, h=h)
    except TypeError:
        return False
    return _problem(a, b, c, bias, residual, h) is None


def _launch(kernel, a, b, c, slice_width, tensors, scalars, **flags) -> None:
    """``kernel`` over c's tiles, one program per SM: a and b through descriptors over their storage, c
    through one with an epilogue slice [BLOCK_M, slice_width] as its block; the epilogue's ``tensors``
    (two) and ``scalars`` go before and after M, N and K (the kernels' order)."""
    (a_storage, a_t), (b_storage, b_t) = _stored_as(a), _stored_as(b)
    M, N = c.shape
    tiles = -(-M // BLOCK_M) * -(-N // BLOCK_N)
    with dispatch.device_guard(c):
        kernel[(min(tiles, dispatch.num_sms(c.device)),)](
            _descriptor(a_storage, operand_block(BLOCK_M, BLOCK_K, a_t)),
            _descriptor(b_storage, operand_block(BLOCK_K, BLOCK_N, b_t)),
            _descriptor(c, (BLOCK_M, slice_width)), *tensors, M, N, a.shape[1], *scalars,
            A_T=a_t, B_T=b_t, GROUP_M=GROUP_M, NUM_STAGES=NUM_STAGES, num_warps=NUM_WARPS, **flags,
        )


def gemm(a: Tensor, b: Tensor, c: Tensor, *, bias: Optional[Tensor] = None, relu: bool = False,
         dropout: Optional[tuple[int, int, float]] = None, residual: Optional[Tensor] = None) -> None:
    """c = [residual +] [dropout]([relu](a @ b [+ bias])) in place, for the 2-D views a (M, K), b (K, N) with
    any strides TMA can read (a transposed view is read from its storage) and c row-major: relu_mlp's
    ``_launch_matmul`` (dx, dW1, dW2), ``_launch_fc1`` (bias, relu) and ``_launch_fc2`` (bias, dropout,
    residual).  ``dropout``: None or (seed, threshold, scale) as relu_mlp's ``_dropout_args`` gives them.
    TypeError or ValueError naming what it cannot take, before any launch."""
    _check_types(a, b, c, bias=bias, residual=residual)
    if not isinstance(relu, bool):
        raise TypeError(f"relu must be a bool, got {type(relu).__name__}")
    _check_dropout(dropout)
    problem = _problem(a, b, c, bias, residual)
    if problem is not None:
        raise ValueError(f"relu_mlp_gluon.gemm: {problem}")
    seed, threshold, scale = dropout if dropout is not None else (0, 0, 1.0)
    res_strides = residual.stride() if residual is not None else (0, 0)
    _launch(gemm_kernel, a, b, c, slice_n(dropout is not None), (bias, residual),
            (*res_strides, seed, threshold, scale), HAS_BIAS=bias is not None, RELU=relu,
            DROPOUT=dropout is not None, HAS_RESIDUAL=residual is not None)


def dh(a: Tensor, b: Tensor, c: Tensor, h: Tensor, with_db: bool) -> Optional[Tensor]:
    """c = where(h <= 0, 0, a @ b) in place: relu_mlp's ``_launch_dh`` (a = g, b = W2, h the saved
    activation, c = dh); with ``with_db`` also db1, c's fp32 column sums (per-tile partials summed here),
    else None.  TypeError or ValueError naming what it cannot take, before any launch."""
    _check_types(a, b, c, h=h)
    if not isinstance(with_db, bool):
        raise TypeError(f"with_db must be a bool, got {type(with_db).__name__}")
    problem = _problem(a, b, c, h=h)
    if problem is not None:
        raise ValueError(f"relu_mlp_gluon.dh: {problem}")
    M, N = c.shape
    db_part = dispatch.empty((-(-M // BLOCK_M), N), dtype=torch.float32, device=c.device) if with_db else None
    _launch(dh_kernel, a, b, c, slice_n(False), (h, db_part), (h.stride(0),), HAS_DBIAS=with_db)
    return db_part.sum(0) if with_db else None
