"""Attention backward for sm_90 in Gluon, FlashAttention-3's five-product scheme (opt-in: ``attention.GLUON_BWD``).

Same semantics and gradients as ``attention._launch_bwd`` for what it takes (fp16/bf16, head_dim 64, 80 or
128, causal or not, no padding mask, no dropout, softmax_scale > 0): dout, q, k, v (batch, seqlen, heads,
head_dim) with unit last stride; lse (the forward's: natural log, +inf on rows that see no key) and
delta = rowsum(dO * O), both (batch, heads, seqlen_q) fp32, contiguous; causal attention bottom-right
aligned (query i sees key j iff j <= i + seqlen_k - seqlen_q).  head_dim 80 runs in chunks of 64 and 16
columns (``attention_gluon.head_chunks``), as the Gluon forward: every tile and accumulator a chunk, no
padding; 64 and 128 are one chunk.

Schedule, one program per 128 keys of one (batch, head):

- a producer warp loads K and V once by TMA (a 64-key tile per consumer), and K again in the columns of
  dQ each consumer computes (``dq_columns``), then for every 64-row query block that sees these keys Q
  and dO (TMA) and the rows' lse / scale and delta (plain loads, stored by the warp) into a ring of
  ``NUM_STAGES`` slots.  A slot's "ready" mbarrier completes on the TMA bytes plus the producer's second
  arrival after its lse/delta stores; its "empty" one on one arrival from each consumer;
- two consumer warpgroups, each owning 64 whole key rows and their fp32 dK and dV.  Per query block:
  S^T = K Q^T and dP^T = V dO^T (chains over the chunks), issued together with accumulators that start
  at -lse / scale and -delta (no row vector stays live); P^T = exp2(S^T * scale * log2 e), with dP^T in
  flight; dV += P^T dO (A from registers) in flight while dS^T = P^T dP^T is formed; dK += dS^T Q; dS^T
  into shared memory (two buffers: a consumer may write the next block's while the other still reads
  this one; a "ds_ready" mbarrier per buffer, one arrival from each consumer).  Then each consumer takes
  its columns of dQ = dS K over all 128 keys (two chained products, the transposed dS^T tiles as A:
  halves of a power-of-two head_dim, the chunks of 80) and adds them into an fp32 sum in global memory
  (atomics);
- ``deterministic``: a turn-keeper warp orders those adds: the key blocks add their parts of a query
  block's dQ columns from the last key block that sees it down (a lock per query block and consumer
  holds the token, index + 1, of the key block that added last; key block n waits for n + 2 where block
  n + 1 sees the query block, gives the consumer its turn by an mbarrier, and puts n + 1 when the
  consumer says its adds are issued).  Programs then start last key block first (not longest first), so
  a program waits only for ones started before it, and since a key block's first query blocks are ones
  the block above does not see, the programs run in step; the fp32 sums' order never depends on timing:
  bitwise repeatable.  ``deterministic=False`` adds in any order, longest key blocks first.

dK (times scale) and dV leave by TMA store through the consumer's own K and V tiles; dQ's parts are
added times scale, and the fp32 sum reaches dq's dtype and layout in one copy.  The interpreter cannot run
Gluon: the kernel is checked by the AOT compile (``aot_cases.attention_gluon_bwd_cases``) and by
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

from opt_core.kernels import dispatch
from opt_core.kernels.attention_gluon import (LOG2E, _allocate, _chunk_descriptors, _copy, _descriptor, _issue_pv,
                                              _nbytes, _operands, _problem, _transposed, _views, head_chunks)
from opt_core.kernels.gluon_hopper import barriers, mma_layout, release, wait_ready

HEAD_DIMS = (64, 80, 128)
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
# K's dQ tiles (3 * 128 * head_dim * 2 bytes) and the dS^T buffers (32 KB): 130 KB at 64, 152 KB at 80,
# 194 KB at 128.
NUM_STAGES = {64: 3, 80: 3, 128: 2}
# Whether dP^T's accumulator starts at -delta, as S^T's at -lse / scale (True), or at 0 with delta subtracted
# once the product is done, per head_dim.  Started at -delta it is a register copy that a wgmma takes while
# S^T is in flight, and ptxas then waits for S^T first (C7517: S^T and dP^T do not run together); started at
# 0, delta is 16 more registers live beside dV in flight, which at 128 spills 4-16 bytes (outside the loop).
DP_FROM_DELTA = {64: False, 80: False, 128: True}


@gluon.jit
def _load_keys(descs, k_tiles, v_tiles, kh_tiles, kv_ready, b, h, start_n):
    """K and V of the program's key block (tile c of each chunk: consumer c's 64 keys), and K again in the
    dQ products' tiles (``kh_tiles[C]``: the columns of dQ consumer C computes, tile c: consumer c's keys)."""
    k_descs, v_descs, kh_descs = descs[2:]
    KEYS: gl.constexpr = k_descs[0].block_type.shape[1]
    mbarrier.expect(kv_ready, 2 * (_nbytes(k_descs) + _nbytes(v_descs) + _nbytes(kh_descs)))
    for c in gl.static_range(2):
        coords = (b, start_n + c * KEYS, h)
        _copy(k_descs, coords, kv_ready, k_tiles, c)
        _copy(v_descs, coords, kv_ready, v_tiles, c)
        _copy(kh_descs, coords, kv_ready, kh_tiles, c)


@gluon.jit
def _producer(descs, LSE, DELTA, smem, bars, sizes, sm_scale, NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr,
              DETERMINISTIC: gl.constexpr):
    """K and V once, then Q, dO, lse / scale and delta of every query block into the ring."""
    q_descs, do_descs = descs[:2]
    q_tiles, do_tiles, k_tiles, v_tiles, kh_tiles, lse_smem, delta_smem, ds_smem = smem
    kv_ready, ready, empty, ds_ready, turn, added = bars
    BLOCK_M: gl.constexpr = q_descs[0].block_type.shape[1]
    KEYS: gl.constexpr = descs[2][0].block_type.shape[1]
    bh, b, h, key_block, start_n, lo, num_blocks = _work(sizes, BLOCK_M, KEYS, CAUSAL, DETERMINISTIC)
    row_base = bh.to(gl.int64) * sizes[1]
    seqlen_q = sizes[1]
    _load_keys(descs, k_tiles, v_tiles, kh_tiles, kv_ready, b, h, start_n)
    rows_layout: gl.constexpr = gl.BlockedLayout([BLOCK_M // 32], [32], [1], [0])
    offs = gl.arange(0, BLOCK_M, layout=rows_layout)
    for i in range(num_blocks):
        slot = i % NUM_STAGES
        start_m = lo + i * BLOCK_M
        # A fresh barrier counts as having completed the phase before its first: the first lap waits on
        # nothing.
        mbarrier.wait(empty.index(slot), ((i // NUM_STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(slot), _nbytes(q_descs) + _nbytes(do_descs))
        _copy(q_descs, (b, start_m, h), ready.index(slot), q_tiles, slot)
        _copy(do_descs, (b, start_m, h), ready.index(slot), do_tiles, slot)
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
def _chained(a, b, acc, USE_ACC: gl.constexpr = True):
    """acc (0 where not USE_ACC) + the sum over the head-dim chunks of a_c b_c: chained async wgmmas (one
    group each); the last one's token."""
    acc = warpgroup_mma(a[0], b[0], acc, use_acc=USE_ACC, is_async=True)
    for c in gl.static_range(1, len(a)):
        acc = warpgroup_mma(a[c], b[c], acc, is_async=True)
    return acc


@gluon.jit
def _scores(C: gl.constexpr, i, slot, smem, DP_FROM_DELTA: gl.constexpr):
    """Issues consumer C's S^T = K Q^T - lse / scale and dP^T = V dO^T (- delta where ``DP_FROM_DELTA``),
    each a chain over the head-dim chunks (the accumulators start at the shifts, so no row vector stays live
    across the products: registers); their tokens and operands (per chunk)."""
    q_tiles, do_tiles, k_tiles, v_tiles, kh_tiles, lse_smem, delta_smem, ds_smem = smem
    KEYS: gl.constexpr = k_tiles[0].shape[2]
    BLOCK_M: gl.constexpr = q_tiles[0].shape[2]
    s_layout: gl.constexpr = mma_layout(BLOCK_M)
    mine = _unhoisted(C, i)
    k = _views(k_tiles, mine)
    v = _views(v_tiles, mine)
    q = _views(q_tiles, slot)
    do = _views(do_tiles, slot)
    zero = gl.zeros([KEYS, BLOCK_M], gl.float32, s_layout)
    s_init = zero - lse_smem.index(slot).load(gl.SliceLayout(0, s_layout))[None, :]
    s_tok = _chained(k, _transposed(q), s_init)
    if DP_FROM_DELTA:
        dp_tok = _chained(v, _transposed(do), zero - delta_smem.index(slot).load(gl.SliceLayout(0, s_layout))[None, :])
    else:
        dp_tok = _chained(v, _transposed(do), zero, False)
    return s_tok, dp_tok, (k, v, q, do)


@gluon.jit
def _hand_over_ds(C: gl.constexpr, ds_t, buf, ds_smem, ds_ready):
    """This consumer's dS^T into its buffer; the other consumer's dQ products read it."""
    ds_smem.index(2 * buf + C).store(ds_t)
    fence_async_shared()  # the generic-proxy stores before the wgmmas' (async proxy) reads
    gl.thread_barrier()
    mbarrier.arrive(ds_ready.index(buf))


@gluon.jit
def _issue_dq(C: gl.constexpr, i, ds_smem, kh_tiles, ds_ready):
    """dQ's columns of consumer C (``kh_tiles[C]``'s) = dS K over all 128 keys, once both dS^T of query
    block i are in: two chained products with the transposed dS^T tiles as A.  Its token and operands."""
    KEYS: gl.constexpr = kh_tiles[C].shape[2]
    WIDTH: gl.constexpr = kh_tiles[C].shape[4]
    BLOCK_M: gl.constexpr = ds_smem.shape[2]
    buf = i % 2
    mbarrier.wait(ds_ready.index(buf), (i // 2) & 1)
    ds0 = ds_smem.index(2 * buf).permute((1, 0))
    ds1 = ds_smem.index(2 * buf + 1).permute((1, 0))
    kh0 = kh_tiles[C].index(_unhoisted(0, i)).reshape([KEYS, WIDTH])
    kh1 = kh_tiles[C].index(_unhoisted(1, i)).reshape([KEYS, WIDTH])
    dq_tok = warpgroup_mma(ds0, kh0, gl.zeros([BLOCK_M, WIDTH], gl.float32, mma_layout(WIDTH)), use_acc=False,
                           is_async=True)
    dq_tok = warpgroup_mma(ds1, kh1, dq_tok, is_async=True)
    return dq_tok, (ds0, ds1, kh0, kh1)


@gluon.jit
def _add_dq(dq, DQ_ACC, i, start_m, first_col: gl.constexpr, HEAD_DIM: gl.constexpr, turn, added,
            DETERMINISTIC: gl.constexpr):
    """Adds this consumer's columns (from ``first_col``) of a query block's dQ (already times the scale) into
    the fp32 sum; DETERMINISTIC when the turn keeper says the key block above this one has added its own,
    telling it when these are issued.  DQ_ACC has whole query blocks of rows: no mask (rows past seqlen_q
    add zeros that are never read)."""
    dq_layout: gl.constexpr = dq.type.layout
    BLOCK_M: gl.constexpr = dq.shape[0]
    WIDTH: gl.constexpr = dq.shape[1]
    rows = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, dq_layout))
    cols = first_col + gl.arange(0, WIDTH, layout=gl.SliceLayout(0, dq_layout))
    if DETERMINISTIC:
        mbarrier.wait(turn, i & 1)
    gl.atomic_add(DQ_ACC + rows[:, None] * HEAD_DIM + cols[None, :], dq, sem="relaxed")
    if DETERMINISTIC:
        gl.thread_barrier()  # every thread's adds issued before the one arrival
        mbarrier.arrive(added)


@gluon.jit
def _step(C: gl.constexpr, i, grads, smem, bars, key_args, DQ_ACC, scales, flags):
    """Consumer ``C``'s work on the i-th query block it visits: its dK, dV (one accumulator per head-dim
    chunk) updated, its columns of dQ added."""
    dk, dv = grads
    q_tiles, do_tiles, k_tiles, v_tiles, kh_tiles, lse_smem, delta_smem, ds_smem = smem
    kv_ready, ready, empty, ds_ready, turn, added = bars
    lo, seqlen_k, diag, first_key = key_args
    qk_scale, sm_scale = scales
    BLOCK_M: gl.constexpr = q_tiles[0].shape[2]
    dtype: gl.constexpr = q_tiles[0].dtype
    NUM_STAGES: gl.constexpr = flags[0]
    CAUSAL: gl.constexpr = flags[1]
    DETERMINISTIC: gl.constexpr = flags[2]
    DP_FROM_DELTA: gl.constexpr = flags[3]
    CHUNKS: gl.constexpr = len(dk)
    slot = i % NUM_STAGES
    start_m = lo + i * BLOCK_M

    wait_ready(ready, i, NUM_STAGES)
    s_tok, dp_tok, operands = _scores(C, i, slot, smem, DP_FROM_DELTA)
    k, v, q, do = operands
    # dP^T (a product per chunk) still in flight across the exponentials
    s_t = warpgroup_mma_wait(CHUNKS, deps=(s_tok, ) + k + q)[0]
    p_t = _probabilities(s_t, start_m, first_key, qk_scale, diag, seqlen_k, CAUSAL)
    p_op = _operands(p_t.to(dtype), dv)
    dv_tok = _issue_pv(p_op, do, dv)  # dV_c += P^T dO_c
    dp_t = warpgroup_mma_wait(CHUNKS, deps=(dp_tok, ) + v + do)[0]  # dV in flight across dS^T
    if not DP_FROM_DELTA:
        dp_t = dp_t - delta_smem.index(slot).load(gl.SliceLayout(0, dp_t.type.layout))[None, :]
    ds_t = (p_t * dp_t).to(dtype)
    ds_op = _operands(ds_t, dk)
    dk_tok = _issue_pv(ds_op, q, dk)  # dK_c += dS^T Q_c
    _hand_over_ds(C, ds_t, i % 2, ds_smem, ds_ready)
    dq_tok, dq_operands = _issue_dq(C, i, ds_smem, kh_tiles, ds_ready)
    # dV and dK done (their register operands kept until here), the dQ products still in flight.
    grads = warpgroup_mma_wait(2, deps=dv_tok + dk_tok + p_op + ds_op + do + q)
    release(empty.index(slot))  # Q, dO, lse and delta read for the last time
    dq = warpgroup_mma_wait(0, deps=(dq_tok, ) + dq_operands)[0]
    FIRST_COL: gl.constexpr = C * kh_tiles[0].shape[4]  # consumer 0's columns first
    HEAD_DIM: gl.constexpr = kh_tiles[0].shape[4] + kh_tiles[1].shape[4]
    _add_dq(dq * sm_scale, DQ_ACC, i, start_m, FIRST_COL, HEAD_DIM, turn.index(C), added.index(C), DETERMINISTIC)
    return grads[CHUNKS:2 * CHUNKS], grads[:CHUNKS]


@gluon.jit
def _consumer(C: gl.constexpr, smem, bars, out_descs, DQ_ACC, sizes, dq_acc_rows, qk_scale, sm_scale,
              NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr, DETERMINISTIC: gl.constexpr,
              DP_FROM_DELTA: gl.constexpr):
    """Consumer ``C``: dK and dV of its 64 keys over the query blocks, its columns of their dQ; then dK, dV
    out."""
    q_tiles, do_tiles, k_tiles, v_tiles = smem[:4]
    dk_descs, dv_descs = out_descs
    heads, seqlen_q, seqlen_k = sizes
    KEYS: gl.constexpr = k_tiles[0].shape[2]
    MAIN: gl.constexpr = k_tiles[0].shape[4]
    kh_tiles = smem[4]
    HEAD_DIM: gl.constexpr = kh_tiles[0].shape[4] + kh_tiles[1].shape[4]  # the two consumers' dQ columns
    bh, b, h, key_block, start_n, lo, num_blocks = _work(sizes, q_tiles[0].shape[2], KEYS, CAUSAL, DETERMINISTIC)
    first_key = start_n + C * KEYS
    dq_acc = DQ_ACC + bh.to(gl.int64) * dq_acc_rows * HEAD_DIM
    dk = [gl.zeros([KEYS, gl.constexpr(t.shape[4])], gl.float32, mma_layout(t.shape[4])) for t in k_tiles]
    dv = [gl.zeros([KEYS, gl.constexpr(t.shape[4])], gl.float32, mma_layout(t.shape[4])) for t in v_tiles]
    mbarrier.wait(bars[0], 0)  # K and V
    for i in range(num_blocks):
        dk, dv = _step(C, i, (dk, dv), smem, bars, (lo, seqlen_k, seqlen_k - seqlen_q, first_key), dq_acc,
                       (qk_scale, sm_scale), (NUM_STAGES, CAUSAL, DETERMINISTIC, DP_FROM_DELTA))
    # Out through this consumer's own K and V tiles (only it reads them, and its last product is done):
    # keys past seqlen_k are not written.
    k_out = _views(k_tiles, C)
    v_out = _views(v_tiles, C)
    for c in gl.static_range(len(dk)):
        k_out[c].store((dk[c] * sm_scale).to(k_tiles[c].dtype))
        v_out[c].store(dv[c].to(v_tiles[c].dtype))
    fence_async_shared()
    gl.thread_barrier()  # every warp's part is in shared memory before one thread starts the copies
    for c in gl.static_range(len(dk)):
        tma.async_copy_shared_to_global(dk_descs[c], [b, first_key, h, c * MAIN], k_tiles[c].index(C))
        tma.async_copy_shared_to_global(dv_descs[c], [b, first_key, h, c * MAIN], v_tiles[c].index(C))
    tma.store_wait(0)


@gluon.jit
def _consumer0(smem, bars, out_descs, DQ_ACC, sizes, dq_acc_rows, qk_scale, sm_scale, NUM_STAGES: gl.constexpr,
               CAUSAL: gl.constexpr, DETERMINISTIC: gl.constexpr, DP_FROM_DELTA: gl.constexpr):
    _consumer(0, smem, bars, out_descs, DQ_ACC, sizes, dq_acc_rows, qk_scale, sm_scale, NUM_STAGES, CAUSAL,
              DETERMINISTIC, DP_FROM_DELTA)


@gluon.jit
def _consumer1(smem, bars, out_descs, DQ_ACC, sizes, dq_acc_rows, qk_scale, sm_scale, NUM_STAGES: gl.constexpr,
               CAUSAL: gl.constexpr, DETERMINISTIC: gl.constexpr, DP_FROM_DELTA: gl.constexpr):
    _consumer(1, smem, bars, out_descs, DQ_ACC, sizes, dq_acc_rows, qk_scale, sm_scale, NUM_STAGES, CAUSAL,
              DETERMINISTIC, DP_FROM_DELTA)


@gluon.jit
def _wait_turn(lock, token):
    """Until the lock holds ``token``: the key block above this one has added its part."""
    turn = gl.atomic_add(lock, 0, sem="acquire")
    while turn != token:
        turn = gl.atomic_add(lock, 0, sem="acquire")


@gluon.jit
def _turn_keeper(bars, LOCKS, sizes, CAUSAL: gl.constexpr, DETERMINISTIC: gl.constexpr):
    """DETERMINISTIC: gives each consumer its turn to add its dQ columns of a query block once the key block
    above this one (when it sees the query block) has added its own, and passes the turn on when the
    consumer's adds are issued.  A lock per query block and consumer holds the token (index + 1) of the key
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
def _shared_memory(descs, NUM_STAGES: gl.constexpr):
    """The shared memory: the (Q, dO, lse, delta) ring, K, V and K's dQ tiles (a buffer per head-dim chunk,
    or per consumer's dQ columns), two dS^T buffers per consumer."""
    q_descs, do_descs, k_descs, v_descs, kh_descs = descs
    BLOCK_M: gl.constexpr = q_descs[0].block_type.shape[1]
    KEYS: gl.constexpr = k_descs[0].block_type.shape[1]
    dtype: gl.constexpr = q_descs[0].dtype
    rows_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([KEYS, BLOCK_M], dtype)
    return (_allocate(q_descs, NUM_STAGES), _allocate(do_descs, NUM_STAGES), _allocate(k_descs, 2),
            _allocate(v_descs, 2), _allocate(kh_descs, 2),
            gl.allocate_shared_memory(gl.float32, [NUM_STAGES, BLOCK_M], rows_layout),
            gl.allocate_shared_memory(gl.float32, [NUM_STAGES, BLOCK_M], rows_layout),
            gl.allocate_shared_memory(dtype, [4, KEYS, BLOCK_M], ds_layout))


@gluon.jit
def bwd_kernel(
    q_desc, do_desc, k_desc, v_desc, kh_desc, dk_desc, dv_desc,
    q_tail_desc, do_tail_desc, k_tail_desc, v_tail_desc, dk_tail_desc, dv_tail_desc,
    LSE, DELTA, DQ_ACC, LOCKS, heads, seqlen_q, seqlen_k, dq_acc_rows, qk_scale, sm_scale,
    CAUSAL: gl.constexpr, DETERMINISTIC: gl.constexpr, NUM_STAGES: gl.constexpr, DP_FROM_DELTA: gl.constexpr,
):
    """dK and dV of one block of 2 * 64 keys of one (batch, head), and its part of dQ added into DQ_ACC
    (fp32 (batch * heads, dq_acc_rows, head_dim), zeroed); DETERMINISTIC in key-block order through
    LOCKS (int32 (batch * heads, cdiv(seqlen_q, 64), 2), zeroed).  ``*_desc``: the main head-dim chunk
    of each tensor; ``*_tail_desc``: the tail chunk's, or None where head_dim is a power of two
    (``attention_gluon.head_chunks``).  ``kh_desc``: K in [64 keys, head_dim / 2] boxes where head_dim is a
    power of two (consumer C computes dQ's half C), None where it is chunked (consumer C computes dQ's
    chunk C, from K's chunk tiles loaded again).  ``DP_FROM_DELTA``: dP^T's accumulator starts at -delta
    (``DP_FROM_DELTA[head_dim]``; a kernel argument, so the compile cache keys on it)."""
    q_descs, do_descs, k_descs, v_descs, dk_descs, dv_descs = ((q_desc, ), (do_desc, ), (k_desc, ), (v_desc, ),
                                                                (dk_desc, ), (dv_desc, ))
    kh_descs = (kh_desc, kh_desc)
    if q_tail_desc is not None:
        q_descs, do_descs, k_descs, v_descs, dk_descs, dv_descs = (
            (q_desc, q_tail_desc), (do_desc, do_tail_desc), (k_desc, k_tail_desc), (v_desc, v_tail_desc),
            (dk_desc, dk_tail_desc), (dv_desc, dv_tail_desc))
        kh_descs = k_descs
    descs = (q_descs, do_descs, k_descs, v_descs, kh_descs)
    smem = _shared_memory(descs, NUM_STAGES)
    # kv_ready: the producer's TMA.  ready: its TMA plus its arrival after the lse/delta stores.  empty and
    # ds_ready: one arrival from each consumer.  turn (one per consumer): the turn keeper; added: that
    # consumer.
    bars = (barriers(1, 1).index(0), barriers(NUM_STAGES, 2), barriers(NUM_STAGES, 2), barriers(2, 2),
            barriers(2, 1), barriers(2, 1))
    sizes = (heads, seqlen_q, seqlen_k)
    gl.warp_specialize([
        (_consumer0, (smem, bars, (dk_descs, dv_descs), DQ_ACC, sizes, dq_acc_rows, qk_scale, sm_scale, NUM_STAGES,
                      CAUSAL, DETERMINISTIC, DP_FROM_DELTA)),
        (_consumer1, (smem, bars, (dk_descs, dv_descs), DQ_ACC, sizes, dq_acc_rows, qk_scale, sm_scale, NUM_STAGES,
                      CAUSAL, DETERMINISTIC, DP_FROM_DELTA)),
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


def dq_columns(head_dim: int) -> tuple[int, int]:
    """The widths of the columns of dQ that consumers 0 and 1 compute: halves of a power-of-two head_dim
    (from K loaded again in halves), else its two chunks (``head_chunks``, 80 -> 64 + 16: from K's chunk
    tiles loaded again; consumer 0 then does four times the dQ work of consumer 1)."""
    chunks = head_chunks(head_dim)
    return chunks if len(chunks) == 2 else (head_dim // 2, head_dim // 2)


def descriptors(tensors: dict[str, Tensor]) -> dict[str, object]:
    """The kernel's descriptor arguments for ``tensors`` (q, do, k, v, dk, dv): each one's main and tail
    head-dim chunks (``*_desc``, ``*_tail_desc``: None without a tail), and ``kh_desc``, K in boxes of
    consumer 0's dQ columns where head_dim is a power of two (None where it is chunked)."""
    args = {}
    for name, t in tensors.items():
        rows = BLOCK_M if name in ("q", "do") else KEYS_PER_CONSUMER
        args[f"{name}_desc"], args[f"{name}_tail_desc"] = _chunk_descriptors(t, rows)
    k = tensors["k"]
    args["kh_desc"] = (None if args["k_tail_desc"] is not None
                       else _descriptor(k, KEYS_PER_CONSUMER, dq_columns(k.shape[3])[0]))
    return args


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
    # dQ's fp32 sum (times the scale), whole query blocks of rows, and one lock per query block and consumer;
    # both zeroed.
    rows = triton.cdiv(Sq, BLOCK_M) * BLOCK_M
    dq_acc = torch.zeros((B * H, rows, D), dtype=torch.float32, device=q.device)
    locks = torch.zeros((B * H * triton.cdiv(Sq, BLOCK_M) * 2,), dtype=torch.int32, device=q.device)
    bwd_kernel[(triton.cdiv(Sk, BLOCK_N) * B * H,)](
        **descriptors(dict(q=q, do=dout, k=k, v=v, dk=dk, dv=dv)), LSE=lse, DELTA=delta, DQ_ACC=dq_acc,
        LOCKS=locks, heads=H, seqlen_q=Sq, seqlen_k=Sk, dq_acc_rows=rows, qk_scale=float(softmax_scale) * LOG2E,
        sm_scale=float(softmax_scale),
        CAUSAL=causal, DETERMINISTIC=deterministic, NUM_STAGES=NUM_STAGES[D], DP_FROM_DELTA=DP_FROM_DELTA[D],
        num_warps=4,
    )
    dq.copy_(dq_acc.view(B, H, rows, D)[:, :, :Sq].transpose(1, 2))  # one pass: fp32 read, dq's dtype written
    return dq, dk, dv
