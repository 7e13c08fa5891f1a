"""Attention forward for sm_90 in Gluon, FlashAttention-3's schedule (opt-in: ``attention.GLUON``).

Same semantics and outputs as ``attention._launch_fwd`` for what it takes (fp16/bf16, head_dim 64 or
128, causal or not, no padding mask, no dropout): q, k, v (batch, seqlen, heads, head_dim) with unit
last stride; out in the input dtype; lse (batch, heads, seqlen_q) fp32, natural log; causal attention
bottom-right aligned (query i sees key j iff j <= i + seqlen_k - seqlen_q); a row that sees no key
gives out 0 and lse +inf.  Scores are scaled by ``softmax_scale * LOG2E`` and exponentiated with exp2.

Schedule, one program per 128 query rows of one (batch, head), last query block first (the longest
causal ones start first, as in ``fwd_kernel``):

- a producer warp issues TMA loads: the two 64-row Q tiles once, then K and V of each key block into
  a ring of ``NUM_STAGES`` shared-memory slots, each slot guarded by a "ready" mbarrier (TMA bytes
  arrived) and an "empty" one (both consumers are done with it);
- two consumer warpgroups, each owning 64 query rows (its own Q tile) and its own accumulator.  They
  take turns issuing their matrix products (ping-pong, an mbarrier hand-off per turn), so one's
  softmax runs while the other's wgmma runs;
- within a consumer, key block j's Q K^T is issued asynchronously together with block j-1's P V, and
  the softmax of block j runs while P V is still in flight (``warpgroup_mma_wait(1)``).

Out leaves by TMA store through each consumer's Q tile, lse by a masked store.

The interpreter cannot run Gluon: the kernel is checked by the AOT compile (``aot_cases``) and by
``gpu``-marked tests.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from opt_core.kernels import dispatch

DTYPES = (torch.float16, torch.bfloat16)
HEAD_DIMS = (64, 128)
LOG2E = math.log2(math.e)
_LN2 = gl.constexpr(math.log(2.0))
ROWS_PER_CONSUMER = 64  # one wgmma's M: each consumer warpgroup owns a 64-row Q tile
ROWS_PER_PROGRAM = 2 * ROWS_PER_CONSUMER
# Registers per thread of the worker partitions, the second consumer warpgroup and the producer warp
# (setmaxnreg; the compiler gives the first consumer, the default partition, the consumers' 240 too).
# The kernel launches 12 warps at 168 registers: the producer's warpgroup holds 3 idle warps.
CONSUMER_REGS = gl.constexpr(240)
PRODUCER_REGS = gl.constexpr(24)


# (BLOCK_N, NUM_STAGES) per head_dim: a stage holds K and V, 2 * BLOCK_N * head_dim * 2 bytes, beside the
# two Q tiles.  head_dim 128: 2 stages as FlashAttention-3 (164 KB of shared memory; 3 compile too, with
# 230 KB, 2.6 KB under the limit: a candidate for the GPU to measure).
CONFIGS = {64: (128, 3), 128: (128, 2)}


@gluon.constexpr_function
def _mma_layout(n):
    """wgmma accumulator layout of one warpgroup's [64, n] tile."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, coords, num_blocks,
              BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr):
    """Loads the two Q tiles, then K and V of every key block into the ring."""
    q_ready, k_ready, k_empty, v_ready, v_empty, turn = bars
    b, h, start_m = coords
    for c in gl.static_range(2):
        mbarrier.expect(q_ready.index(c), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b, start_m + c * q_desc.block_type.shape[1], h, 0],
                                        q_ready.index(c), q_smem.index(c))
    for j in range(num_blocks):
        slot = j % NUM_STAGES
        # A fresh barrier counts as having completed the phase before its first: the first lap
        # waits on nothing.
        empty_phase = ((j // NUM_STAGES) & 1) ^ 1
        mbarrier.wait(k_empty.index(slot), empty_phase)
        mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [b, j * BLOCK_N, h, 0], k_ready.index(slot), k_smem.index(slot))
        mbarrier.wait(v_empty.index(slot), empty_phase)
        mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [b, j * BLOCK_N, h, 0], v_ready.index(slot), v_smem.index(slot))


@gluon.jit
def _softmax_step(s, m_i, l_i, start_n, keys, qk_scale, BLOCK_N: gl.constexpr):
    """Online-softmax update over one key block's scores: (p, m_new, l_new, alpha), as ``_fwd_blocks``.
    ``keys`` = (per row the last key it sees, the least of them): only blocks past the least are masked."""
    last_key, least_last_key = keys
    s = s * qk_scale
    if start_n + BLOCK_N - 1 > least_last_key:
        cols = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s.type.layout))
        # replace, not add: a NaN score of a hidden key must not leak
        s = gl.where(cols[None, :] <= last_key[:, None], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1))
    # A row with no visible key so far keeps m = -inf; subtracting 0 keeps exp2 at 0, not NaN.
    m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_sub)
    p = gl.exp2(s - m_sub[:, None])
    l_new = l_i * alpha + gl.sum(p, 1)
    return p, m_new, l_new, alpha


@gluon.jit
def _release(empty):
    """This consumer is done with a ring slot.  One thread arrives: every warp of the warpgroup must have
    passed its wgmma wait first (a warp's wait covers its own part of the product)."""
    gl.thread_barrier()
    mbarrier.arrive(empty)


@gluon.jit
def _wait_ready(bar, j, NUM_STAGES: gl.constexpr):
    mbarrier.wait(bar.index(j % NUM_STAGES), (j // NUM_STAGES) & 1)


@gluon.jit
def _consume(C: gl.constexpr, q_smem, k_smem, v_smem, bars, num_blocks, keys, qk_scale, o_layout: gl.constexpr,
             BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr):
    """Consumer ``C``'s pass over the key blocks: (acc, l_i, m_i) of its 64 rows.

    Each consumer issues its products in turns 0 .. num_blocks (turn j: Q K_j^T and P_{j-1} V_{j-1});
    a turn starts when the other consumer has issued its previous one (``turn`` barriers), so the
    tensor cores run one consumer's products while the other does its softmax."""
    q_ready, k_ready, k_empty, v_ready, v_empty, turn = bars
    BLOCK_M: gl.constexpr = q_smem.shape[2]
    s_layout: gl.constexpr = _mma_layout(BLOCK_N)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    dtype: gl.constexpr = q_smem.dtype
    mine = turn.index(C)
    theirs = turn.index(1 - C)
    mbarrier.wait(q_ready.index(C), 0)
    q = q_smem.index(C).reshape([BLOCK_M, HEAD_DIM])
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    if num_blocks > 0:
        mbarrier.wait(mine, 0)
        _wait_ready(k_ready, 0, NUM_STAGES)
        k0 = k_smem.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
        s0_tok = warpgroup_mma(q, k0, s_zero, use_acc=False, is_async=True)
        mbarrier.arrive(theirs)
        s0 = warpgroup_mma_wait(0, deps=(s0_tok, q, k0))[0]
        _release(k_empty.index(0))
        p, m_i, l_i = _softmax_step(s0, m_i, l_i, 0, keys, qk_scale, BLOCK_N)[:3]  # no O to rescale yet
        # P as the A operand of P V, from registers; carried in 16 bits
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        for j in range(1, num_blocks):
            mbarrier.wait(mine, j & 1)
            _wait_ready(k_ready, j, NUM_STAGES)
            k = k_smem.index(j % NUM_STAGES).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
            s_tok = warpgroup_mma(q, k, s_zero, use_acc=False, is_async=True)
            _wait_ready(v_ready, j - 1, NUM_STAGES)
            v = v_smem.index((j - 1) % NUM_STAGES).reshape([BLOCK_N, HEAD_DIM])
            acc_tok = warpgroup_mma(p_op, v, acc, is_async=True)
            mbarrier.arrive(theirs)
            # Q K_j^T done, P_{j-1} V_{j-1} still in flight across this block's softmax.
            s = warpgroup_mma_wait(1, deps=(s_tok, q, k))[0]
            _release(k_empty.index(j % NUM_STAGES))
            p, m_new, l_i, alpha = _softmax_step(s, m_i, l_i, j * BLOCK_N, keys, qk_scale, BLOCK_N)
            acc = warpgroup_mma_wait(0, deps=(acc_tok, p_op, v))[0]
            _release(v_empty.index((j - 1) % NUM_STAGES))
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            m_i = m_new
        mbarrier.wait(mine, num_blocks & 1)
        _wait_ready(v_ready, num_blocks - 1, NUM_STAGES)
        v = v_smem.index((num_blocks - 1) % NUM_STAGES).reshape([BLOCK_N, HEAD_DIM])
        acc_tok = warpgroup_mma(p_op, v, acc, is_async=True)
        mbarrier.arrive(theirs)
        acc = warpgroup_mma_wait(0, deps=(acc_tok, p_op, v))[0]
        _release(v_empty.index((num_blocks - 1) % NUM_STAGES))
    return acc, l_i, m_i


@gluon.jit
def _consumer(C: gl.constexpr, q_smem, k_smem, v_smem, bars, o_desc, LSE, out_args, num_blocks, qk_scale,
              BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr):
    """Consumer ``C``: its pass over the key blocks, then its 64 rows of out and lse."""
    b, h, lse_base, start_m, seqlen_q, seqlen_k = out_args
    BLOCK_M: gl.constexpr = q_smem.shape[2]
    s_layout: gl.constexpr = _mma_layout(BLOCK_N)
    o_layout: gl.constexpr = _mma_layout(HEAD_DIM)
    first_row = start_m + C * BLOCK_M
    rows = first_row + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    last_key = gl.full([BLOCK_M], seqlen_k - 1, gl.int32, gl.SliceLayout(1, s_layout))
    least_last_key = seqlen_k - 1
    if CAUSAL:  # rows see more keys further down: the first row sees the fewest
        last_key = gl.minimum(rows + (seqlen_k - seqlen_q), last_key)
        least_last_key = gl.minimum(first_row + (seqlen_k - seqlen_q), least_last_key)
    acc, l_i, m_i = _consume(C, q_smem, k_smem, v_smem, bars, num_blocks, (last_key, least_last_key), qk_scale,
                             o_layout, BLOCK_N, HEAD_DIM, NUM_STAGES)

    sees_no_key = l_i == 0.0  # 0 out, even if a shared tile held 0 * NaN
    l_safe = gl.where(sees_no_key, 1.0, l_i)
    lse = gl.where(sees_no_key, float("inf"), (m_i + gl.log2(l_safe)) * _LN2)
    gl.store(LSE + lse_base + rows, lse, mask=rows < seqlen_q)
    out = acc / gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))[:, None]
    out = gl.where(gl.convert_layout(sees_no_key, gl.SliceLayout(1, o_layout))[:, None], 0.0, out)
    # Out leaves by TMA through this consumer's Q tile (its last product is done): rows past seqlen_q
    # are not written.
    q_smem.index(C).reshape([BLOCK_M, HEAD_DIM]).store(out.to(q_smem.dtype))
    fence_async_shared()
    gl.thread_barrier()  # every warp's part is in shared memory before one thread starts the copy
    tma.async_copy_shared_to_global(o_desc, [b, first_row, h, 0], q_smem.index(C))
    tma.store_wait(0)


@gluon.jit
def _consumer0(q_smem, k_smem, v_smem, bars, o_desc, LSE, out_args, num_blocks, qk_scale,
               BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr):
    _consumer(0, q_smem, k_smem, v_smem, bars, o_desc, LSE, out_args, num_blocks, qk_scale, BLOCK_N, HEAD_DIM,
              NUM_STAGES, CAUSAL)


@gluon.jit
def _consumer1(q_smem, k_smem, v_smem, bars, o_desc, LSE, out_args, num_blocks, qk_scale,
               BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr):
    _consumer(1, q_smem, k_smem, v_smem, bars, o_desc, LSE, out_args, num_blocks, qk_scale, BLOCK_N, HEAD_DIM,
              NUM_STAGES, CAUSAL)


@gluon.jit
def _barriers(count: gl.constexpr, arrivals: gl.constexpr):
    bars = gl.allocate_shared_memory(gl.int64, [count, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(count):
        mbarrier.init(bars.index(i), count=arrivals)
    return bars


@gluon.jit
def fwd_kernel(
    q_desc, k_desc, v_desc, o_desc, LSE, heads, seqlen_q, seqlen_k, qk_scale,
    HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
):
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[1]
    num_m = gl.cdiv(seqlen_q, 2 * BLOCK_M)
    pid = gl.program_id(0)
    bh = pid // num_m
    start_m = (num_m - 1 - pid % num_m) * (2 * BLOCK_M)  # last query block first
    b = bh // heads
    h = bh % heads
    hi = seqlen_k
    if CAUSAL:  # keys some row of the block sees: j <= start_m + 2 * BLOCK_M - 1 + seqlen_k - seqlen_q
        hi = gl.minimum(gl.maximum(start_m + 2 * BLOCK_M + seqlen_k - seqlen_q, 0), seqlen_k)
    num_blocks = gl.cdiv(hi, BLOCK_N)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [NUM_STAGES] + v_desc.block_type.shape, v_desc.layout)
    # One arrival from the producer's TMA (plus its bytes) fills a slot; one from each consumer empties it.
    bars = (_barriers(2, 1), _barriers(NUM_STAGES, 1), _barriers(NUM_STAGES, 2), _barriers(NUM_STAGES, 1),
            _barriers(NUM_STAGES, 2), _barriers(2, 1))
    mbarrier.arrive(bars[5].index(0))  # consumer 0 takes the first turn

    out_args = (b, h, bh.to(gl.int64) * seqlen_q, start_m, seqlen_q, seqlen_k)
    # Constexprs go in the tuples literally: a tuple assigned to a variable turns them into tensors.
    gl.warp_specialize([
        (_consumer0, (q_smem, k_smem, v_smem, bars, o_desc, LSE, out_args, num_blocks, qk_scale, BLOCK_N,
                      HEAD_DIM, NUM_STAGES, CAUSAL)),
        (_consumer1, (q_smem, k_smem, v_smem, bars, o_desc, LSE, out_args, num_blocks, qk_scale, BLOCK_N,
                      HEAD_DIM, NUM_STAGES, CAUSAL)),
        (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, (b, h, start_m), num_blocks, BLOCK_N,
                     NUM_STAGES)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


# --------------------------------------------------------------------------- host
def _gl_dtype(dtype: torch.dtype):
    return gl.bfloat16 if dtype == torch.bfloat16 else gl.float16


def smem_layout(dtype: torch.dtype, rows: int, head_dim: int):
    """Shared-memory layout of a [1, rows, 1, head_dim] tile of (batch, seqlen, heads, head_dim): what the
    TMA writes and the wgmma reads."""
    return gl.NVMMASharedLayout.get_default_for([1, rows, 1, head_dim], _gl_dtype(dtype))


def _descriptor(t: Tensor, rows: int) -> TensorDescriptor:
    # Out-of-range rows (past seqlen) arrive as zeros.
    block = [1, rows, 1, t.shape[3]]
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, smem_layout(t.dtype, rows, t.shape[3]))


def _problem(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """What keeps the kernel from taking q, k, v, or None.  The device comes last, so every other check
    runs on any machine."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            return f"{name} must be a 4-D tensor (batch, seqlen, heads, head_dim)"
        if t.dtype not in DTYPES:
            return f"{name} must be float16 or bfloat16, got {t.dtype}"
    if not q.dtype == k.dtype == v.dtype:
        return f"q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    B, Sq, H, D = q.shape
    if D not in HEAD_DIMS:
        return f"head_dim (q.shape[3]) must be one of {HEAD_DIMS}, got {D}"
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, H, D) or v.shape != k.shape:
        return f"k and v must have shape ({B}, seqlen_k, {H}, {D}) to match q, got {tuple(k.shape)}, {tuple(v.shape)}"
    if q.numel() == 0 or k.numel() == 0:
        return f"q and k must not be empty, got shapes {tuple(q.shape)}, {tuple(k.shape)}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not dispatch.tma_aligned(t):
            return (f"{name} must suit a TMA descriptor: unit last stride, 16-byte aligned base and other "
                    f"strides multiples of 16 bytes, got strides {t.stride()}")
    if not (q.device == k.device == v.device and q.device.type == "cuda"):
        return f"q, k and v must be on one CUDA device, got {q.device}, {k.device}, {v.device}"
    major, minor = torch.cuda.get_device_capability(q.device)
    if major != 9:
        return f"the device must have compute capability 9.x (Hopper), got {major}.{minor}"
    return None


def supported(q: Tensor, k: Tensor, v: Tensor, key_padding_mask, dropout_p: float) -> bool:
    """Whether ``attention_fwd`` takes this forward: no padding mask, no dropout, and q, k, v as it needs them."""
    return key_padding_mask is None and dropout_p == 0 and _problem(q, k, v) is None


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, softmax_scale: float) -> tuple[Tensor, Tensor]:
    """(out, lse) as ``attention._launch_fwd`` returns them, from the Gluon kernel; ValueError naming what it
    cannot take."""
    problem = _problem(q, k, v)
    if problem is not None:
        raise ValueError(f"attention_gluon.attention_fwd: {problem}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    block_n, num_stages = CONFIGS[D]
    out = dispatch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)
    lse = dispatch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(Sq, ROWS_PER_PROGRAM) * B * H,)
    fwd_kernel[grid](
        _descriptor(q, ROWS_PER_CONSUMER), _descriptor(k, block_n), _descriptor(v, block_n),
        _descriptor(out, ROWS_PER_CONSUMER), lse, H, Sq, Sk, float(softmax_scale) * LOG2E,
        HEAD_DIM=D, CAUSAL=causal, BLOCK_N=block_n, NUM_STAGES=num_stages, num_warps=4,
    )
    return out, lse
