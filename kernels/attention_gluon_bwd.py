"""Attention backward for sm_90 in Gluon, FlashAttention-3's five-product scheme (opt-in: ``attention.GLUON_BWD``).

Same semantics and gradients as ``attention._launch_bwd`` for what it takes (fp16/bf16, head_dim 64 or 128,
causal or not, no padding mask, no dropout, softmax_scale > 0): dout, q, k, v (batch, seqlen, heads,
head_dim) with unit last stride; lse (the forward's: natural log, +inf on rows that see no key) and
delta = rowsum(dO * O), both (batch, heads, seqlen_q) fp32, contiguous; causal attention bottom-right
aligned (query i sees key j iff j <= i + seqlen_k - seqlen_q).

Schedule, one program per 128 keys of one (batch, head):

- a producer warp loads K and V once by TMA (a 64-key tile per consumer, and K again as four [64 keys,
  head_dim/2] tiles for the dQ products), then for every 64-row query block that sees these keys Q and
  dO (TMA) and the rows' lse / scale and delta (plain loads, stored by the warp) into a ring of
  ``NUM_STAGES`` slots.  A slot's "ready" mbarrier completes on the TMA bytes plus the producer's second
  arrival after its lse/delta stores; its "empty" one on one arrival from each consumer;
- two consumer warpgroups, each owning 64 whole key rows and their fp32 dK and dV.  Per query block:
  S^T = K Q^T and dP^T = V dO^T, issued together with accumulators that start at -lse / scale and
  -delta (no row vector stays live); P^T = exp2(S^T * scale * log2 e), with dP^T in flight;
  dV += P^T dO (A from registers) in flight while dS^T = P^T dP^T is formed; dK += dS^T Q; dS^T into
  shared memory (two buffers: a consumer may write the next block's while the other still reads this
  one; a "ds_ready" mbarrier per buffer, one arrival from each consumer).  Then each consumer takes half
  of head_dim of dQ = dS K over all 128 keys (two chained products, the transposed dS^T tiles as A) and
  adds it into an fp32 sum in global memory (atomics);
- ``deterministic``: a turn-keeper warp orders those adds: the key blocks add their parts of a query
  block's dQ half from the last key block that sees it down (a lock per query block and half holds the
  token, index + 1, of the key block that added last; key block n waits for n + 2 where block n + 1
  sees the query block, gives the consumer its turn by an mbarrier, and puts n + 1 when the consumer
  says its adds are issued).  Programs then start last key block first (not longest first), so a
  program waits only for ones started before it, and since a key block's first query blocks are ones
  the block above does not see, the programs run in step; the fp32 sums' order never depends on timing:
  bitwise repeatable.  ``deterministic=False`` adds in any order, longest key blocks first.

dK (times scale) and dV leave by TMA store through the consumer's own K and V tiles; dQ's parts are
added times scale, and the fp32 sum reaches dq's dtype and layout in one copy.  The interpreter cannot run Gluon: the
kernel is checked by the AOT compile (``aot_cases.attention_gluon_bwd_cases``) and by ``gpu``-marked tests.
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

from opt_core.kernels import dispatch
from opt_core.kernels.attention_gluon import LOG2E, _descriptor, _problem
from opt_core.kernels.gluon_hopper import barriers, mma_layout, release, wait_ready

HEAD_DIMS = (64, 128)
BLOCK_M = 64  # query rows per step: one wgmma's N for S^T and dP^T, its M for dQ
KEYS_PER_CONSUMER = 64  # one wgmma's M: each consumer warpgroup owns 64 key rows
BLOCK_N = 2 * KEYS_PER_CONSUMER
_BLOCK_M = gl.constexpr(BLOCK_M)
_KEYS = gl.constexpr(KEYS_PER_CONSUMER)
# Registers per thread of the consumers and of the producer and turn-keeper warps (setmaxnreg), as the
# forward: 12 warps launched at 168 registers, the workers' warpgroup holding 2 idle warps.
CONSUMER_REGS = gl.constexpr(240)
WORKER_REGS = gl.constexpr(24)
# Ring slots of (Q, dO, lse, delta) per head_dim: a slot holds 2 * 64 * head_dim * 2 bytes beside K, V and
# K's dQ tiles (3 * 128 * head_dim * 2 bytes) and the dS^T buffers (32 KB): 130 KB at 64, 194 KB at 128.
NUM_STAGES = {64: 3, 128: 2}


@gluon.jit
def _load_keys(descs, k_smem, v_smem, kh_smem, kv_ready, b, h, start_n):
    """K and V of the program's key block, each consumer's 64 keys a tile; and K again in [64 keys,
    head_dim/2] tiles (index: keys' consumer * 2 + dQ half) for the dQ products."""
    q_desc, do_desc, k_desc, v_desc, kh_desc = descs
    KEYS: gl.constexpr = k_desc.block_type.shape[1]
    HALF: gl.constexpr = kh_desc.block_type.shape[3]
    mbarrier.expect(kv_ready, 2 * k_desc.block_type.nbytes + 2 * v_desc.block_type.nbytes
                    + 4 * kh_desc.block_type.nbytes)
    for c in gl.static_range(2):
        tma.async_copy_global_to_shared(k_desc, [b, start_n + c * KEYS, h, 0], kv_ready, k_smem.index(c))
        tma.async_copy_global_to_shared(v_desc, [b, start_n + c * KEYS, h, 0], kv_ready, v_smem.index(c))
        for half in gl.static_range(2):
            tma.async_copy_global_to_shared(kh_desc, [b, start_n + c * KEYS, h, half * HALF], kv_ready,
                                            kh_smem.index(2 * c + half))


@gluon.jit
def _producer(descs, LSE, DELTA, smem, bars, sizes, sm_scale, NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr,
              DETERMINISTIC: gl.constexpr):
    """K and V once, then Q, dO, lse / scale and delta of every query block into the ring."""
    q_desc, do_desc, k_desc, v_desc, kh_desc = descs
    q_smem, do_smem, k_smem, v_smem, kh_smem, lse_smem, delta_smem, ds_smem = smem
    kv_ready, ready, empty, ds_ready, turn, added = bars
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[1]
    KEYS: gl.constexpr = k_desc.block_type.shape[1]
    bh, b, h, key_block, start_n, lo, num_blocks = _work(sizes, BLOCK_M, KEYS, CAUSAL, DETERMINISTIC)
    row_base = bh.to(gl.int64) * sizes[1]
    seqlen_q = sizes[1]
    _load_keys(descs, k_smem, v_smem, kh_smem, kv_ready, b, h, start_n)
    rows_layout: gl.constexpr = gl.BlockedLayout([BLOCK_M // 32], [32], [1], [0])
    offs = gl.arange(0, BLOCK_M, layout=rows_layout)
    for i in range(num_blocks):
        slot = i % NUM_STAGES
        start_m = lo + i * BLOCK_M
        # A fresh barrier counts as having completed the phase before its first: the first lap waits on
        # nothing.
        mbarrier.wait(empty.index(slot), ((i // NUM_STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(slot), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b, start_m, h, 0], ready.index(slot), q_smem.index(slot))
        tma.async_copy_global_to_shared(do_desc, [b, start_m, h, 0], ready.index(slot), do_smem.index(slot))
        # Rows past seqlen_q: Q = dO = 0 from the TMA, delta = 0 and lse = +inf, so P = 0 (not exp2(0)).
        rows = start_m + offs
        row_ok = rows < seqlen_q
        lse = gl.load(LSE + row_base + rows, mask=row_ok, other=float("inf"))
        lse_smem.index(slot).store(lse / sm_scale)
        delta_smem.index(slot).store(gl.load(DELTA + row_base + rows, mask=row_ok, other=0.0))
        gl.thread_barrier()  # every lane's stores before the one arrival that publishes them
        mbarrier.arrive(ready.index(slot))


@gluon.jit
def _probabilities(s_t, start_m, first_key, qk_scale, diag, seqlen_k, CAUSAL: gl.constexpr):
    """P^T from one consumer's [64 keys, 64 queries] S^T - lse / scale.  Masked only where some key is
    past seqlen_k or (causal) hidden from the block's first row: K's rows past seqlen_k load as 0, and
    their P must not be exp2(-lse * log2 e) (huge where lse is very negative)."""
    s_t = s_t * qk_scale
    key_last = first_key + s_t.shape[0] - 1
    masked = key_last >= seqlen_k
    if CAUSAL:  # rows see more keys further down: the block's first row sees the fewest
        masked = masked | (key_last > start_m + diag)
    if masked:
        rows = start_m + gl.arange(0, s_t.shape[1], layout=gl.SliceLayout(0, s_t.type.layout))
        cols = first_key + gl.arange(0, s_t.shape[0], layout=gl.SliceLayout(1, s_t.type.layout))
        visible = cols[:, None] < seqlen_k
        if CAUSAL:
            visible = visible & (cols[:, None] <= rows[None, :] + diag)
        s_t = gl.where(visible, s_t, float("-inf"))  # replace, not add: a NaN score of a hidden key must not leak
    return gl.exp2(s_t)


@gluon.jit
def _unhoisted(index, i):
    """``index`` (a constant tile index), computed from the loop counter i (< 2**30) so that the compiler
    builds the tile's wgmma descriptors inside the loop instead of hoisting them: hoisted, the 8 k-steps'
    descriptors of each of K and V at head_dim 128 stay live across the loop and spill registers."""
    return index + (i >> 30)


@gluon.jit
def _scores(C: gl.constexpr, i, slot, smem):
    """Issues consumer C's S^T = K Q^T - lse / scale and dP^T = V dO^T - delta (the accumulators start at
    the shifts, so no row vector stays live across the products: registers); their tokens.  ptxas waits
    for S^T before dP^T's issue (C7517: it cannot tell across the loop that the last block's dP^T, which
    wrote these registers, is done); dP^T still runs across the exponentials.  With dP^T started at 0
    and delta subtracted after, there is no wait, but head_dim 128 spills 8-16 bytes."""
    q_smem, do_smem, k_smem, v_smem, kh_smem, lse_smem, delta_smem, ds_smem = smem
    KEYS: gl.constexpr = k_smem.shape[2]
    HEAD_DIM: gl.constexpr = k_smem.shape[4]
    BLOCK_M: gl.constexpr = q_smem.shape[2]
    s_layout: gl.constexpr = mma_layout(BLOCK_M)
    mine = _unhoisted(C, i)
    k = k_smem.index(mine).reshape([KEYS, HEAD_DIM])
    v = v_smem.index(mine).reshape([KEYS, HEAD_DIM])
    q = q_smem.index(slot).reshape([BLOCK_M, HEAD_DIM])
    do = do_smem.index(slot).reshape([BLOCK_M, HEAD_DIM])
    zero = gl.zeros([KEYS, BLOCK_M], gl.float32, s_layout)
    s_init = zero - lse_smem.index(slot).load(gl.SliceLayout(0, s_layout))[None, :]
    s_tok = warpgroup_mma(k, q.permute((1, 0)), s_init, is_async=True)
    dp_init = zero - delta_smem.index(slot).load(gl.SliceLayout(0, s_layout))[None, :]
    dp_tok = warpgroup_mma(v, do.permute((1, 0)), dp_init, is_async=True)
    return s_tok, dp_tok, (k, v, q, do)


@gluon.jit
def _hand_over_ds(C: gl.constexpr, ds_t, buf, ds_smem, ds_ready):
    """This consumer's dS^T into its buffer; the other consumer's dQ products read it."""
    ds_smem.index(2 * buf + C).store(ds_t)
    fence_async_shared()  # the generic-proxy stores before the wgmmas' (async proxy) reads
    gl.thread_barrier()
    mbarrier.arrive(ds_ready.index(buf))


@gluon.jit
def _issue_dq(C: gl.constexpr, i, ds_smem, kh_smem, ds_ready):
    """dQ[:, C's half of head_dim] = dS K over all 128 keys, once both dS^T of query block i are in: two
    chained products with the transposed dS^T tiles as A.  Its token and operands."""
    KEYS: gl.constexpr = kh_smem.shape[2]
    HALF: gl.constexpr = kh_smem.shape[4]
    BLOCK_M: gl.constexpr = ds_smem.shape[2]
    buf = i % 2
    mbarrier.wait(ds_ready.index(buf), (i // 2) & 1)
    ds0 = ds_smem.index(2 * buf).permute((1, 0))
    ds1 = ds_smem.index(2 * buf + 1).permute((1, 0))
    kh0 = kh_smem.index(_unhoisted(C, i)).reshape([KEYS, HALF])
    kh1 = kh_smem.index(_unhoisted(2 + C, i)).reshape([KEYS, HALF])
    dq_tok = warpgroup_mma(ds0, kh0, gl.zeros([BLOCK_M, HALF], gl.float32, mma_layout(HALF)), use_acc=False,
                           is_async=True)
    dq_tok = warpgroup_mma(ds1, kh1, dq_tok, is_async=True)
    return dq_tok, (ds0, ds1, kh0, kh1)


@gluon.jit
def _add_dq(dq, DQ_ACC, i, start_m, half, turn, added, DETERMINISTIC: gl.constexpr):
    """Adds this consumer's half of a query block's dQ (already times the scale) into the fp32 sum;
    DETERMINISTIC when the turn keeper says the key block above this one has added its own, telling it when
    these are issued.  DQ_ACC has whole query blocks of rows: no mask (rows past seqlen_q add zeros that are
    never read)."""
    dq_layout: gl.constexpr = dq.type.layout
    BLOCK_M: gl.constexpr = dq.shape[0]
    HALF: gl.constexpr = dq.shape[1]
    rows = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, dq_layout))
    cols = half * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(0, dq_layout))
    if DETERMINISTIC:
        mbarrier.wait(turn, i & 1)
    gl.atomic_add(DQ_ACC + rows[:, None] * (2 * HALF) + cols[None, :], dq, sem="relaxed")
    if DETERMINISTIC:
        gl.thread_barrier()  # every thread's adds issued before the one arrival
        mbarrier.arrive(added)


@gluon.jit
def _step(C: gl.constexpr, i, grads, smem, bars, key_args, DQ_ACC, scales, NUM_STAGES: gl.constexpr,
          CAUSAL: gl.constexpr, DETERMINISTIC: gl.constexpr):
    """Consumer ``C``'s work on the i-th query block it visits: its dK, dV updated, its dQ half added."""
    dk, dv = grads
    q_smem, do_smem, k_smem, v_smem, kh_smem, lse_smem, delta_smem, ds_smem = smem
    kv_ready, ready, empty, ds_ready, turn, added = bars
    lo, seqlen_k, diag, first_key = key_args
    qk_scale, sm_scale = scales
    BLOCK_M: gl.constexpr = q_smem.shape[2]
    dtype: gl.constexpr = q_smem.dtype
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dk.type.layout, k_width=2)
    slot = i % NUM_STAGES
    start_m = lo + i * BLOCK_M

    wait_ready(ready, i, NUM_STAGES)
    s_tok, dp_tok, operands = _scores(C, i, slot, smem)
    k, v, q, do = operands
    s_t = warpgroup_mma_wait(1, deps=(s_tok, k, q))[0]  # dP^T still in flight across the exponentials
    p_t = _probabilities(s_t, start_m, first_key, qk_scale, diag, seqlen_k, CAUSAL)
    p_op = gl.convert_layout(p_t.to(dtype), op_layout)
    dv_tok = warpgroup_mma(p_op, do, dv, is_async=True)
    dp_t = warpgroup_mma_wait(1, deps=(dp_tok, v, do))[0]  # dV in flight across dS^T
    ds_t = (p_t * dp_t).to(dtype)
    ds_op = gl.convert_layout(ds_t, op_layout)
    dk_tok = warpgroup_mma(ds_op, q, dk, is_async=True)
    _hand_over_ds(C, ds_t, i % 2, ds_smem, ds_ready)
    dq_tok, dq_operands = _issue_dq(C, i, ds_smem, kh_smem, ds_ready)
    # dV and dK done (their register operands kept until here), the dQ products still in flight.
    dv, dk = warpgroup_mma_wait(2, deps=(dv_tok, dk_tok, p_op, ds_op, do, q))[:2]
    release(empty.index(slot))  # Q, dO, lse and delta read for the last time
    dq = warpgroup_mma_wait(0, deps=(dq_tok, ) + dq_operands)[0]
    _add_dq(dq * sm_scale, DQ_ACC, i, start_m, C, turn.index(C), added.index(C), DETERMINISTIC)
    return dk, dv


@gluon.jit
def _consumer(C: gl.constexpr, smem, bars, out_descs, DQ_ACC, sizes, dq_acc_rows, qk_scale, sm_scale,
              NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr, DETERMINISTIC: gl.constexpr):
    """Consumer ``C``: dK and dV of its 64 keys over the query blocks, its half of their dQ; then dK, dV out."""
    q_smem, do_smem, k_smem, v_smem, kh_smem, lse_smem, delta_smem, ds_smem = smem
    dk_desc, dv_desc = out_descs
    heads, seqlen_q, seqlen_k = sizes
    KEYS: gl.constexpr = k_smem.shape[2]
    HEAD_DIM: gl.constexpr = k_smem.shape[4]
    dkv_layout: gl.constexpr = mma_layout(HEAD_DIM)
    bh, b, h, key_block, start_n, lo, num_blocks = _work(sizes, q_smem.shape[2], KEYS, CAUSAL, DETERMINISTIC)
    first_key = start_n + C * KEYS
    dq_acc = DQ_ACC + bh.to(gl.int64) * dq_acc_rows * HEAD_DIM
    dk = gl.zeros([KEYS, HEAD_DIM], gl.float32, dkv_layout)
    dv = gl.zeros([KEYS, HEAD_DIM], gl.float32, dkv_layout)
    mbarrier.wait(bars[0], 0)  # K and V
    for i in range(num_blocks):
        dk, dv = _step(C, i, (dk, dv), smem, bars, (lo, seqlen_k, seqlen_k - seqlen_q, first_key), dq_acc,
                       (qk_scale, sm_scale), NUM_STAGES, CAUSAL, DETERMINISTIC)
    # Out through this consumer's own K and V tiles (only it reads them, and its last product is done):
    # keys past seqlen_k are not written.
    k_tile = k_smem.index(C)
    v_tile = v_smem.index(C)
    k_tile.reshape([KEYS, HEAD_DIM]).store((dk * sm_scale).to(k_smem.dtype))
    v_tile.reshape([KEYS, HEAD_DIM]).store(dv.to(v_smem.dtype))
    fence_async_shared()
    gl.thread_barrier()  # every warp's part is in shared memory before one thread starts the copies
    tma.async_copy_shared_to_global(dk_desc, [b, start_n + C * KEYS, h, 0], k_tile)
    tma.async_copy_shared_to_global(dv_desc, [b, start_n + C * KEYS, h, 0], v_tile)
    tma.store_wait(0)


@gluon.jit
def _consumer0(smem, bars, out_descs, DQ_ACC, sizes, dq_acc_rows, qk_scale, sm_scale, NUM_STAGES: gl.constexpr,
               CAUSAL: gl.constexpr, DETERMINISTIC: gl.constexpr):
    _consumer(0, smem, bars, out_descs, DQ_ACC, sizes, dq_acc_rows, qk_scale, sm_scale, NUM_STAGES, CAUSAL,
              DETERMINISTIC)


@gluon.jit
def _consumer1(smem, bars, out_descs, DQ_ACC, sizes, dq_acc_rows, qk_scale, sm_scale, NUM_STAGES: gl.constexpr,
               CAUSAL: gl.constexpr, DETERMINISTIC: gl.constexpr):
    _consumer(1, smem, bars, out_descs, DQ_ACC, sizes, dq_acc_rows, qk_scale, sm_scale, NUM_STAGES, CAUSAL,
              DETERMINISTIC)


@gluon.jit
def _wait_turn(lock, token):
    """Until the lock holds ``token``: the key block above this one has added its part."""
    turn = gl.atomic_add(lock, 0, sem="acquire")
    while turn != token:
        turn = gl.atomic_add(lock, 0, sem="acquire")


@gluon.jit
def _turn_keeper(bars, LOCKS, sizes, CAUSAL: gl.constexpr, DETERMINISTIC: gl.constexpr):
    """DETERMINISTIC: gives each consumer its turn to add its dQ half of a query block once the key block
    above this one (when it sees the query block) has added its own, and passes the turn on when the
    consumer's adds are issued.  A lock per query block and half holds the token (index + 1) of the key
    block that added last.  Spinning here keeps the poll's scalar broadcast and branches out of the
    consumers' registers."""
    turn = bars[4]
    added = bars[5]
    if DETERMINISTIC:
        heads, seqlen_q, seqlen_k = sizes
        bh, b, h, key_block, start_n, lo, num_blocks = _work(sizes, _BLOCK_M, _KEYS, CAUSAL, DETERMINISTIC)
        # The query blocks from which on the key block above this one adds first (none above the last).
        wait_from = seqlen_q
        if start_n + 2 * _KEYS < seqlen_k:
            wait_from = _first_query_block(start_n + 2 * _KEYS, seqlen_q, seqlen_k, _BLOCK_M, CAUSAL)
        locks = LOCKS + bh * gl.cdiv(seqlen_q, _BLOCK_M) * 2
        for i in range(num_blocks):
            start_m = lo + i * _BLOCK_M
            lock = locks + (start_m // _BLOCK_M) * 2
            for c in gl.static_range(2):
                if start_m >= wait_from:
                    _wait_turn(lock + c, key_block + 2)
                mbarrier.arrive(turn.index(c))
            for c in gl.static_range(2):
                # The consumer's threads issued their adds before its arrival (a CTA barrier): this release
                # orders them before the next key block's acquire.
                mbarrier.wait(added.index(c), i & 1)
                gl.atomic_xchg(lock + c, key_block + 1, sem="release")


@gluon.jit
def _first_query_block(start_n, seqlen_q, seqlen_k, BLOCK_M: gl.constexpr, CAUSAL: gl.constexpr):
    """The first row of the first query block with a row that sees key start_n (causal: query i sees key
    j iff j <= i + seqlen_k - seqlen_q); the key block starting there visits it and every later one."""
    lo = 0
    if CAUSAL:
        lo = (gl.minimum(gl.maximum(start_n - seqlen_k + seqlen_q, 0), seqlen_q) // BLOCK_M) * BLOCK_M
    return lo


@gluon.jit
def _work(sizes, BLOCK_M: gl.constexpr, KEYS: gl.constexpr, CAUSAL: gl.constexpr, DETERMINISTIC: gl.constexpr):
    """This program's (batch * heads + head, batch, head, key block, first key, first query row, query
    blocks).  The key blocks of one (batch, head) run in a row: the first first (causal: the most queries
    see them), but DETERMINISTIC the last first, the order of the dQ adds (a program then waits only for
    ones started before it, and each key block's first query blocks are ones the block above does not
    visit, so the programs run in step instead of waiting on each other).  Each partition computes these
    itself: values computed before the partitions start live in registers across the whole kernel."""
    heads, seqlen_q, seqlen_k = sizes
    num_n = gl.cdiv(seqlen_k, 2 * KEYS)
    pid = gl.program_id(0)
    bh = pid // num_n
    key_block = pid % num_n
    if DETERMINISTIC:
        key_block = num_n - 1 - key_block
    start_n = key_block * (2 * KEYS)
    lo = _first_query_block(start_n, seqlen_q, seqlen_k, BLOCK_M, CAUSAL)
    return bh, bh // heads, bh % heads, key_block, start_n, lo, gl.cdiv(seqlen_q - lo, BLOCK_M)


@gluon.jit
def _allocate(descs, NUM_STAGES: gl.constexpr):
    """The shared memory: the (Q, dO, lse, delta) ring, K, V and K's dQ tiles, two dS^T buffers per
    consumer."""
    q_desc, do_desc, k_desc, v_desc, kh_desc = descs
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[1]
    KEYS: gl.constexpr = k_desc.block_type.shape[1]
    rows_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([KEYS, BLOCK_M], q_desc.dtype)
    return (gl.allocate_shared_memory(q_desc.dtype, [NUM_STAGES] + q_desc.block_type.shape, q_desc.layout),
            gl.allocate_shared_memory(do_desc.dtype, [NUM_STAGES] + do_desc.block_type.shape, do_desc.layout),
            gl.allocate_shared_memory(k_desc.dtype, [2] + k_desc.block_type.shape, k_desc.layout),
            gl.allocate_shared_memory(v_desc.dtype, [2] + v_desc.block_type.shape, v_desc.layout),
            gl.allocate_shared_memory(kh_desc.dtype, [4] + kh_desc.block_type.shape, kh_desc.layout),
            gl.allocate_shared_memory(gl.float32, [NUM_STAGES, BLOCK_M], rows_layout),
            gl.allocate_shared_memory(gl.float32, [NUM_STAGES, BLOCK_M], rows_layout),
            gl.allocate_shared_memory(q_desc.dtype, [4, KEYS, BLOCK_M], ds_layout))


@gluon.jit
def bwd_kernel(
    q_desc, do_desc, k_desc, v_desc, kh_desc, dk_desc, dv_desc, LSE, DELTA, DQ_ACC, LOCKS,
    heads, seqlen_q, seqlen_k, dq_acc_rows, qk_scale, sm_scale,
    CAUSAL: gl.constexpr, DETERMINISTIC: gl.constexpr, NUM_STAGES: gl.constexpr,
):
    """dK and dV of one block of 2 * 64 keys of one (batch, head), and its part of dQ added into DQ_ACC
    (fp32 (batch * heads, dq_acc_rows, head_dim), zeroed); DETERMINISTIC in key-block order through
    LOCKS (int32 (batch * heads, cdiv(seqlen_q, 64), 2), zeroed)."""
    descs = (q_desc, do_desc, k_desc, v_desc, kh_desc)
    smem = _allocate(descs, NUM_STAGES)
    # kv_ready: the producer's TMA.  ready: its TMA plus its arrival after the lse/delta stores.  empty and
    # ds_ready: one arrival from each consumer.  turn (one per consumer): the turn keeper; added: that
    # consumer.
    bars = (barriers(1, 1).index(0), barriers(NUM_STAGES, 2), barriers(NUM_STAGES, 2), barriers(2, 2),
            barriers(2, 1), barriers(2, 1))
    sizes = (heads, seqlen_q, seqlen_k)
    gl.warp_specialize([
        (_consumer0, (smem, bars, (dk_desc, dv_desc), DQ_ACC, sizes, dq_acc_rows, qk_scale, sm_scale, NUM_STAGES,
                      CAUSAL, DETERMINISTIC)),
        (_consumer1, (smem, bars, (dk_desc, dv_desc), DQ_ACC, sizes, dq_acc_rows, qk_scale, sm_scale, NUM_STAGES,
                      CAUSAL, DETERMINISTIC)),
        (_producer, (descs, LSE, DELTA, smem, bars, sizes, sm_scale, NUM_STAGES, CAUSAL, DETERMINISTIC)),
        (_turn_keeper, (bars, LOCKS, sizes, CAUSAL, DETERMINISTIC)),
    ], [4, 1, 1], [CONSUMER_REGS, WORKER_REGS, WORKER_REGS])


# --------------------------------------------------------------------------- host
def _tensor_text(t) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


def _problem_qkv(q, k, v) -> str | None:
    """What keeps the kernel from taking q, k, v (its own head dims first: the forward's may differ)."""
    if isinstance(q, Tensor) and q.dim() == 4 and q.shape[3] not in HEAD_DIMS:
        return f"head_dim (q.shape[3]) must be one of {HEAD_DIMS}, got {q.shape[3]}"
    return _problem(q, k, v)


def _problem_rest(dout, q: Tensor, lse, delta) -> str | None:
    """What keeps the kernel from taking dout, lse and delta beside a 4-D q; the device is not checked, nor
    anything beside an empty q (its own problem)."""
    B, Sq, H, _ = q.shape
    if q.numel() == 0:
        return None
    if not isinstance(dout, Tensor) or dout.shape != q.shape or dout.dtype != q.dtype:
        return f"dout must be a {q.dtype} tensor of q's shape {tuple(q.shape)}, got {_tensor_text(dout)}"
    if not dispatch.tma_aligned(dout):
        return (f"dout must suit a TMA descriptor: unit last stride, 16-byte aligned base and other strides "
                f"multiples of 16 bytes, got strides {dout.stride()}")
    for name, t in (("lse", lse), ("delta", delta)):
        if not isinstance(t, Tensor) or t.dtype != torch.float32 or tuple(t.shape) != (B, H, Sq):
            return f"{name} must be a float32 tensor of shape ({B}, {H}, {Sq}), got {_tensor_text(t)}"
        if not t.is_contiguous():
            return f"{name} must be contiguous, got strides {t.stride()}"
    return None


def _problem_all(dout, q, k, v, lse, delta) -> str | None:
    """What keeps the kernel from taking these arguments, or None.  The devices come last, so every other
    check runs on any machine."""
    problem = _problem_rest(dout, q, lse, delta) if isinstance(q, Tensor) and q.dim() == 4 else None
    problem = problem or _problem_qkv(q, k, v)
    if problem is None and not dout.device == lse.device == delta.device == q.device:
        problem = (f"dout, lse and delta must be on q's device {q.device}, got {dout.device}, {lse.device}, "
                   f"{delta.device}")
    return problem


def _scale_ok(softmax_scale) -> bool:
    # The kernel divides lse by the scale.
    return (isinstance(softmax_scale, (int, float)) and not isinstance(softmax_scale, bool)
            and math.isfinite(softmax_scale) and softmax_scale > 0)


def supported(q: Tensor, k: Tensor, v: Tensor, key_padding_mask, dropout_p: float, dout: Tensor | None = None,
              softmax_scale: float | None = None) -> bool:
    """Whether ``attention_bwd`` takes this backward: no padding mask, no dropout, q, k, v as it needs them,
    and (those given) dout of q's shape and dtype that suits a TMA descriptor and a positive scale."""
    if key_padding_mask is not None or dropout_p != 0 or _problem_qkv(q, k, v) is not None:
        return False
    if dout is not None and not (isinstance(dout, Tensor) and dout.shape == q.shape and dout.dtype == q.dtype
                                 and dispatch.tma_aligned(dout)):
        return False
    return softmax_scale is None or _scale_ok(softmax_scale)


def _check_flags(causal, deterministic, softmax_scale) -> None:
    for name, flag in (("causal", causal), ("deterministic", deterministic)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float, got {type(softmax_scale).__name__}")
    if not _scale_ok(softmax_scale):
        raise ValueError(f"softmax_scale must be a finite float > 0, got {softmax_scale}")


def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor, causal: bool,
                  softmax_scale: float, deterministic: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) as ``attention._launch_bwd`` returns them, from the Gluon kernel, given the forward's lse
    and delta = rowsum(dO * O).  ``deterministic``: dQ's fp32 parts are added in key-block order (bitwise
    repeatable).  TypeError/ValueError naming what it cannot take, before any launch."""
    _check_flags(causal, deterministic, softmax_scale)
    problem = _problem_all(dout, q, k, v, lse, delta)
    if problem is not None:
        raise ValueError(f"attention_gluon_bwd.attention_bwd: {problem}")
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    dq = dispatch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = dispatch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = dispatch.empty(v.shape, dtype=v.dtype, device=v.device)
    # dQ's fp32 sum (times the scale), whole query blocks of rows, and one lock per query block and dQ half;
    # both zeroed.
    rows = triton.cdiv(Sq, BLOCK_M) * BLOCK_M
    dq_acc = torch.zeros((B * H, rows, D), dtype=torch.float32, device=q.device)
    locks = torch.zeros((B * H * triton.cdiv(Sq, BLOCK_M) * 2,), dtype=torch.int32, device=q.device)
    bwd_kernel[(triton.cdiv(Sk, BLOCK_N) * B * H,)](
        _descriptor(q, BLOCK_M), _descriptor(dout, BLOCK_M), _descriptor(k, KEYS_PER_CONSUMER),
        _descriptor(v, KEYS_PER_CONSUMER), _descriptor(k, KEYS_PER_CONSUMER, D // 2),
        _descriptor(dk, KEYS_PER_CONSUMER), _descriptor(dv, KEYS_PER_CONSUMER), lse, delta, dq_acc, locks,
        H, Sq, Sk, rows, float(softmax_scale) * LOG2E, float(softmax_scale),
        CAUSAL=causal, DETERMINISTIC=deterministic, NUM_STAGES=NUM_STAGES[D], num_warps=4,
    )
    dq.copy_(dq_acc.view(B, H, rows, D)[:, :, :Sq].transpose(1, 2))  # one pass: fp32 read, dq's dtype written
    return dq, dk, dv
