"""Attention forward for sm_90 in Gluon, FlashAttention-3's schedule (opt-in: ``attention.GLUON``).

Same semantics and outputs as ``attention._launch_fwd`` for what it takes (fp16/bf16, head_dim 64, 80
or 128, causal or not, no padding mask, no dropout): q, k, v (batch, seqlen, heads, head_dim) with unit
last stride; out in the input dtype; lse (batch, heads, seqlen_q) fp32, natural log; causal attention
bottom-right aligned (query i sees key j iff j <= i + seqlen_k - seqlen_q); a row that sees no key
gives out 0 and lse +inf.  Scores are scaled by ``softmax_scale * LOG2E`` and exponentiated with exp2.

Schedule, one program per tile of 128 query rows of one (batch, head), last query block first (the
longest causal ones start first, as in ``fwd_kernel``):

- a producer warp issues TMA loads: the two 64-row Q tiles once, then K and V of each key block into
  a ring of ``NUM_STAGES`` shared-memory slots, each slot guarded by a "ready" mbarrier (TMA bytes
  arrived) and an "empty" one (both consumers are done with it);
- two consumer warpgroups, each owning 64 query rows (its own Q tile) and its own accumulator.  They
  take turns issuing their matrix products (ping-pong, an mbarrier hand-off per turn), so one's
  softmax runs while the other's wgmma runs;
- within a consumer, key block j's Q K^T is issued asynchronously together with block j-1's P V, and
  the softmax of block j runs while P V is still in flight (``warpgroup_mma_wait``).

Out leaves by TMA store through each consumer's Q tile (persistent: tiles of its own), lse by a masked
store.

Head dims that are not a power of two are not padded: the head dim is split into a power-of-two main
chunk and a power-of-two tail (``head_chunks``: 80 = 64 + 16), each with its own TMA boxes and
shared-memory tiles; S = sum over the chunks of Q_c K_c^T (chained wgmmas), O_c += P V_c (one
accumulator per chunk), out stored per chunk.

``PERSISTENT = "on"``: one program per SM loops over the tiles (longest first within groups of
(batch, head) pairs whose K and V fit in L2), so the producer loads the next tile's Q, K and V while the
consumers finish the last one's out.

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

from opt_core.kernels import dispatch, head_dim_tiles
from opt_core.kernels.gluon_hopper import barriers, gl_dtype, mma_layout, release, wait_ready

DTYPES = (torch.float16, torch.bfloat16)
LOG2E = math.log2(math.e)
_LN2 = gl.constexpr(math.log(2.0))
ROWS_PER_CONSUMER = 64  # one wgmma's M: each consumer warpgroup owns a 64-row Q tile
ROWS_PER_PROGRAM = 2 * ROWS_PER_CONSUMER
_CONSUMER_ROWS = gl.constexpr(ROWS_PER_CONSUMER)  # the same, for the kernel
# Registers per thread of the worker partitions, the second consumer warpgroup and the producer warp
# (setmaxnreg; the compiler gives the first consumer, the default partition, the consumers' 240 too).
# The kernel launches 12 warps at 168 registers: the producer's warpgroup holds 3 idle warps.
CONSUMER_REGS = gl.constexpr(240)
PRODUCER_REGS = gl.constexpr(24)


# (BLOCK_N, NUM_STAGES) per head_dim: a stage holds K and V, 2 * BLOCK_N * head_dim * 2 bytes, beside the
# two Q tiles.  head_dim 128: 2 stages as FlashAttention-3 (164 KB of shared memory; 3 compile too, with
# 230 KB, 2.6 KB under the limit: a candidate for the GPU to measure).  head_dim 80: 3 stages as at 64
# (144 KB; 4 compile too, with 185 KB).  Persistent: out's own staging tiles on top (197 KB at 128).
CONFIGS = {64: (128, 3), 80: (128, 3), 128: (128, 2)}
HEAD_DIMS = tuple(CONFIGS)
# A chunk's width: the K of a wgmma step (16 for 16-bit types) at least, and a power of two (Gluon shapes).
MIN_CHUNK = head_dim_tiles.MIN_TILE
# Whether the kernel runs persistent: one program per SM looping over the tiles, so the producer loads the
# next tile's Q, K and V while the consumers finish the last one's out (FlashAttention-3's reason):
# "off" | "on".  Off until a GPU run has passed the gpu tests with it and measured it faster.
PERSISTENT = "off"
PERSISTENT_MODES = ("off", "on")
# The share of the L2 one group of (batch, head) pairs' K and V may fill in the persistent tile order (the
# rest for Q, out and the other groups' streams at a group boundary).
L2_SHARE = 0.5


# --------------------------------------------------------------------------- head-dim chunks
# A tile of head_dim columns lives as one shared-memory buffer per chunk (``head_chunks``): chunk c holds
# columns c * main .. c * main + width_c - 1, where main is the first chunk's width (a main chunk and at
# most one tail).  Every helper below takes the chunks as a tuple, so head_dim 64 and 128 (one chunk) and
# 80 (64 + 16) run the same code.
@gluon.constexpr_function
def _nbytes(descs):
    return sum(d.block_type.nbytes for d in descs)


@gluon.jit
def _allocate(descs, count: gl.constexpr):
    """``count`` tiles per chunk: one [count, 1, rows, 1, width] buffer per descriptor."""
    return [gl.allocate_shared_memory(d.dtype, [count] + d.block_type.shape, d.layout) for d in descs]


@gluon.jit
def _load(descs, coords, bar, tiles, i):
    """TMA loads of rows ``coords`` = (batch, first row, head) of every chunk into tile ``i``, all arriving
    on ``bar``."""
    mbarrier.expect(bar, _nbytes(descs))
    _copy(descs, coords, bar, tiles, i)


@gluon.jit
def _copy(descs, coords, bar, tiles, i):
    """``_load``'s copies, for a caller that makes one ``expect`` for several of them: chunk c's box at column
    c times the first chunk's width."""
    b, row, h = coords
    for c in gl.static_range(len(descs)):
        tma.async_copy_global_to_shared(descs[c], [b, row, h, c * descs[0].block_type.shape[3]], bar,
                                        tiles[c].index(i))


@gluon.jit
def _views(tiles, i):
    """Tile ``i`` of every chunk as a 2-D [rows, width] view."""
    return [t.index(i).reshape([t.shape[2], t.shape[4]]) for t in tiles]


@gluon.jit
def _transposed(views):
    return [t.permute((1, 0)) for t in views]


@gluon.jit
def _issue_qk(q, k_t, s_zero):
    """S = sum over the chunks of Q_c K_c^T: chained async wgmmas, the first from zero."""
    s = warpgroup_mma(q[0], k_t[0], s_zero, use_acc=False, is_async=True)
    for c in gl.static_range(1, len(q)):
        s = warpgroup_mma(q[c], k_t[c], s, is_async=True)
    return s


@gluon.jit
def _operands(p, acc):
    """P as the A operand of each chunk's P V (from registers, in that accumulator's operand layout)."""
    return [gl.convert_layout(p, gl.DotOperandLayout(operand_index=0, parent=a.type.layout, k_width=2)) for a in acc]


@gluon.jit
def _issue_pv(p_op, v, acc):
    """acc_c += A_c B_c for every chunk (the forward's O_c += P V_c; the backward's dV_c += P^T dO_c and
    dK_c += dS^T Q_c): one async wgmma each; their tokens."""
    tokens = ()
    for c in gl.static_range(len(acc)):
        tokens = tokens + (warpgroup_mma(p_op[c], v[c], acc[c], is_async=True),)
    return tokens


@gluon.jit
def _rescaled(acc, alpha):
    return [a * gl.convert_layout(alpha, gl.SliceLayout(1, a.type.layout))[:, None] for a in acc]


# --------------------------------------------------------------------------- tiles
@gluon.jit
def _tile(t, schedule, head_group, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """(b, h, start_m, num_blocks) of tile ``t``: ROWS_PER_PROGRAM query rows of one (batch, head) and the
    key blocks they see.  ``schedule`` = (query blocks per (batch, head), heads, seqlen_q, seqlen_k).

    Tiles go by groups of ``head_group`` (batch, head) pairs (whose K and V stay in L2 together); within
    a group the last query block first (the longest causal ones start first), the group's pairs
    fastest.  head_group 1: one (batch, head) after the other."""
    num_m, heads, seqlen_q, seqlen_k = schedule
    ROWS: gl.constexpr = 2 * _CONSUMER_ROWS
    group_tiles = head_group * num_m
    r = t % group_tiles
    bh = t // group_tiles * head_group + r % head_group
    start_m = (num_m - 1 - r // head_group) * ROWS
    hi = seqlen_k
    if CAUSAL:  # keys some row of the tile sees: j <= start_m + ROWS - 1 + seqlen_k - seqlen_q
        hi = gl.minimum(gl.maximum(start_m + ROWS + seqlen_k - seqlen_q, 0), seqlen_k)
    return bh // heads, bh % heads, start_m, gl.cdiv(hi, BLOCK_N)


# --------------------------------------------------------------------------- partitions
# Each partition runs its part of every tile of the program: one tile, or (PERSISTENT) tiles
# program_id, program_id + num_programs, ... of ``_tile``'s order.  The barriers' phases carry over from
# tile to tile: ``done`` counts what came before (tiles, key blocks, and for a consumer its turns).
@gluon.jit
def _produce_tile(descs, smem, bars, tile, done, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
                  PERSISTENT: gl.constexpr):
    """Loads the tile's two Q tiles, then K and V of every key block into the ring."""
    q_descs, k_descs, v_descs = descs
    q_tiles, k_tiles, v_tiles = smem
    q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn = bars
    b, h, start_m, num_blocks = tile
    tiles_done, blocks_done = done
    for consumer in gl.static_range(2):
        if PERSISTENT:  # the consumer's last tile is done with its Q tile
            mbarrier.wait(q_empty.index(consumer), (tiles_done & 1) ^ 1)
        _load(q_descs, (b, start_m + consumer * _CONSUMER_ROWS, h), q_ready.index(consumer), q_tiles, consumer)
    for j in range(num_blocks):
        n = blocks_done + j
        slot = n % NUM_STAGES
        # A fresh barrier counts as having completed the phase before its first: the first lap
        # waits on nothing.
        empty_phase = ((n // NUM_STAGES) & 1) ^ 1
        mbarrier.wait(k_empty.index(slot), empty_phase)
        _load(k_descs, (b, j * BLOCK_N, h), k_ready.index(slot), k_tiles, slot)
        mbarrier.wait(v_empty.index(slot), empty_phase)
        _load(v_descs, (b, j * BLOCK_N, h), v_ready.index(slot), v_tiles, slot)
    return tiles_done + 1, blocks_done + num_blocks


@gluon.jit
def _producer(descs, smem, bars, schedule, head_group, num_tiles, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
              CAUSAL: gl.constexpr, PERSISTENT: gl.constexpr):
    if PERSISTENT:
        done = (0, 0)
        for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            done = _produce_tile(descs, smem, bars, _tile(t, schedule, head_group, BLOCK_N, CAUSAL), done,
                                 BLOCK_N, NUM_STAGES, PERSISTENT)
    else:
        _produce_tile(descs, smem, bars, _tile(gl.program_id(0), schedule, 1, BLOCK_N, CAUSAL), (0, 0), BLOCK_N,
                      NUM_STAGES, PERSISTENT)


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
def _release_q(q_empty, C: gl.constexpr, PERSISTENT: gl.constexpr):
    """Persistent: consumer ``C``'s products that read its Q tile are done; the producer may load the next
    tile's (out leaves through its own tiles)."""
    if PERSISTENT:
        release(q_empty.index(C))


@gluon.jit
def _consume(C: gl.constexpr, smem, bars, num_blocks, keys, qk_scale, done, BLOCK_N: gl.constexpr,
             NUM_STAGES: gl.constexpr, PERSISTENT: gl.constexpr):
    """Consumer ``C``'s pass over the tile's key blocks: (acc, l_i, m_i) of its 64 rows, acc one
    accumulator per head-dim chunk.

    Each consumer issues its products in turns 0 .. num_blocks (turn j: Q K_j^T and P_{j-1} V_{j-1});
    a turn starts when the other consumer has issued its previous one (``turn`` barriers), so the
    tensor cores run one consumer's products while the other does its softmax."""
    q_tiles, k_tiles, v_tiles = smem[:3]
    q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn = bars
    tiles_done, n, turns_done = done  # n: the ring position of the tile's first key block
    BLOCK_M: gl.constexpr = _CONSUMER_ROWS
    s_layout: gl.constexpr = mma_layout(BLOCK_N)
    dtype: gl.constexpr = q_tiles[0].dtype
    mine = turn.index(C)
    theirs = turn.index(1 - C)
    mbarrier.wait(q_ready.index(C), tiles_done & 1)
    q = _views(q_tiles, C)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    acc = [gl.zeros([BLOCK_M, gl.constexpr(t.shape[4])], gl.float32, mma_layout(t.shape[4])) for t in q_tiles]
    if num_blocks > 0:
        mbarrier.wait(mine, turns_done & 1)
        wait_ready(k_ready, n, NUM_STAGES)
        k = _transposed(_views(k_tiles, n % NUM_STAGES))
        s0_tok = _issue_qk(q, k, s_zero)
        mbarrier.arrive(theirs)
        s0 = warpgroup_mma_wait(0, deps=(s0_tok, ) + q + k)[0]
        release(k_empty.index(n % NUM_STAGES))
        p, m_i, l_i = _softmax_step(s0, m_i, l_i, 0, keys, qk_scale, BLOCK_N)[:3]  # no O to rescale yet
        p_op = _operands(p.to(dtype), acc)  # carried in 16 bits
        for j in range(1, num_blocks):
            mbarrier.wait(mine, (turns_done + j) & 1)
            wait_ready(k_ready, n + j, NUM_STAGES)
            k = _transposed(_views(k_tiles, (n + j) % NUM_STAGES))
            s_tok = _issue_qk(q, k, s_zero)
            wait_ready(v_ready, n + j - 1, NUM_STAGES)
            v = _views(v_tiles, (n + j - 1) % NUM_STAGES)
            acc_tok = _issue_pv(p_op, v, acc)
            mbarrier.arrive(theirs)
            # Q K_j^T done (every chunk's), P_{j-1} V_{j-1} (one product per chunk) still in flight
            # across this block's softmax.
            s = warpgroup_mma_wait(len(acc), deps=(s_tok, ) + q + k)[0]
            release(k_empty.index((n + j) % NUM_STAGES))
            p, m_new, l_i, alpha = _softmax_step(s, m_i, l_i, j * BLOCK_N, keys, qk_scale, BLOCK_N)
            acc = warpgroup_mma_wait(0, deps=acc_tok + p_op + v)[:len(acc)]
            release(v_empty.index((n + j - 1) % NUM_STAGES))
            acc = _rescaled(acc, alpha)
            p_op = _operands(p.to(dtype), acc)
            m_i = m_new
        _release_q(q_empty, C, PERSISTENT)
        mbarrier.wait(mine, (turns_done + num_blocks) & 1)
        wait_ready(v_ready, n + num_blocks - 1, NUM_STAGES)
        v = _views(v_tiles, (n + num_blocks - 1) % NUM_STAGES)
        acc_tok = _issue_pv(p_op, v, acc)
        mbarrier.arrive(theirs)
        acc = warpgroup_mma_wait(0, deps=acc_tok + p_op + v)[:len(acc)]
        release(v_empty.index((n + num_blocks - 1) % NUM_STAGES))
    else:
        _release_q(q_empty, C, PERSISTENT)
    return acc, l_i, m_i


@gluon.jit
def _store_out(acc, l_safe, sees_no_key, tiles, o_descs, coords):
    """Out = acc / l per chunk (0 where the row sees no key), by TMA from ``tiles`` (this consumer's
    staging tiles): rows past seqlen_q are not written."""
    b, first_row, h = coords
    for c in gl.static_range(len(acc)):
        out = acc[c] / gl.convert_layout(l_safe, gl.SliceLayout(1, acc[c].type.layout))[:, None]
        out = gl.where(gl.convert_layout(sees_no_key, gl.SliceLayout(1, acc[c].type.layout))[:, None], 0.0, out)
        tiles[c].store(out.to(tiles[c].dtype))
    fence_async_shared()
    gl.thread_barrier()  # every warp's part is in shared memory before one thread starts the copies
    for c in gl.static_range(len(acc)):
        tma.async_copy_shared_to_global(o_descs[c], [b, first_row, h, c * o_descs[0].block_type.shape[3]],
                                        tiles[c])


@gluon.jit
def _consume_tile(C: gl.constexpr, smem, bars, o_descs, LSE, tile, schedule, done, qk_scale,
                  BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr, PERSISTENT: gl.constexpr):
    """Consumer ``C``'s part of one tile: its pass over the key blocks, then its 64 rows of out and lse."""
    b, h, start_m, num_blocks = tile
    heads, seqlen_q, seqlen_k = schedule[1:]
    BLOCK_M: gl.constexpr = _CONSUMER_ROWS
    s_layout: gl.constexpr = mma_layout(BLOCK_N)
    first_row = start_m + C * BLOCK_M
    rows = first_row + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    last_key = gl.full([BLOCK_M], seqlen_k - 1, gl.int32, gl.SliceLayout(1, s_layout))
    least_last_key = seqlen_k - 1
    if CAUSAL:  # rows see more keys further down: the first row sees the fewest
        last_key = gl.minimum(rows + (seqlen_k - seqlen_q), last_key)
        least_last_key = gl.minimum(first_row + (seqlen_k - seqlen_q), least_last_key)
    acc, l_i, m_i = _consume(C, smem, bars, num_blocks, (last_key, least_last_key), qk_scale, done, BLOCK_N,
                             NUM_STAGES, PERSISTENT)

    sees_no_key = l_i == 0.0  # 0 out, even if a shared tile held 0 * NaN
    l_safe = gl.where(sees_no_key, 1.0, l_i)
    lse = gl.where(sees_no_key, float("inf"), (m_i + gl.log2(l_safe)) * _LN2)
    gl.store(LSE + (b * heads + h).to(gl.int64) * seqlen_q + rows, lse, mask=rows < seqlen_q)
    if PERSISTENT:  # the staging tiles' last copies (one thread's) have read them
        tma.store_wait(0)
        gl.thread_barrier()
    _store_out(acc, l_safe, sees_no_key, _views(smem[3], C), o_descs, (b, first_row, h))
    tiles_done, blocks_done, turns_done = done
    # turns: one per key block and a last one for the last P V, none for a tile that sees no key
    return tiles_done + 1, blocks_done + num_blocks, turns_done + num_blocks + gl.minimum(num_blocks, 1)


@gluon.jit
def _consumer(C: gl.constexpr, smem, bars, o_descs, LSE, schedule, head_group, num_tiles, qk_scale,
              BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr, PERSISTENT: gl.constexpr):
    if PERSISTENT:
        done = (0, 0, 0)
        for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            done = _consume_tile(C, smem, bars, o_descs, LSE, _tile(t, schedule, head_group, BLOCK_N, CAUSAL),
                                 schedule, done, qk_scale, BLOCK_N, NUM_STAGES, CAUSAL, PERSISTENT)
    else:
        _consume_tile(C, smem, bars, o_descs, LSE, _tile(gl.program_id(0), schedule, 1, BLOCK_N, CAUSAL), schedule,
                      (0, 0, 0), qk_scale, BLOCK_N, NUM_STAGES, CAUSAL, PERSISTENT)
    tma.store_wait(0)


@gluon.jit
def _consumer0(smem, bars, o_descs, LSE, schedule, head_group, num_tiles, qk_scale, BLOCK_N: gl.constexpr,
               NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr, PERSISTENT: gl.constexpr):
    _consumer(0, smem, bars, o_descs, LSE, schedule, head_group, num_tiles, qk_scale, BLOCK_N, NUM_STAGES, CAUSAL,
              PERSISTENT)


@gluon.jit
def _consumer1(smem, bars, o_descs, LSE, schedule, head_group, num_tiles, qk_scale, BLOCK_N: gl.constexpr,
               NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr, PERSISTENT: gl.constexpr):
    _consumer(1, smem, bars, o_descs, LSE, schedule, head_group, num_tiles, qk_scale, BLOCK_N, NUM_STAGES, CAUSAL,
              PERSISTENT)


@gluon.jit
def fwd_kernel(
    q_desc, k_desc, v_desc, o_desc, q_tail_desc, k_tail_desc, v_tail_desc, o_tail_desc, LSE, batch, heads,
    seqlen_q, seqlen_k, qk_scale, head_group, CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr,
    NUM_STAGES: gl.constexpr, PERSISTENT: gl.constexpr,
):
    """``*_desc``: the main head-dim chunk of q, k, v, out; ``*_tail_desc``: the tail chunk's, or None where
    head_dim is a power of two (``head_chunks``).  One program per tile, or (PERSISTENT) a loop over
    tiles, grouped by ``head_group`` (batch, head) pairs (``_tile``; 1 when not persistent)."""
    num_m = gl.cdiv(seqlen_q, 2 * _CONSUMER_ROWS)
    q_descs, k_descs, v_descs, o_descs = (q_desc, ), (k_desc, ), (v_desc, ), (o_desc, )
    if q_tail_desc is not None:
        q_descs, k_descs, v_descs, o_descs = ((q_desc, q_tail_desc), (k_desc, k_tail_desc), (v_desc, v_tail_desc),
                                              (o_desc, o_tail_desc))
    q_tiles = _allocate(q_descs, 2)
    k_tiles = _allocate(k_descs, NUM_STAGES)
    v_tiles = _allocate(v_descs, NUM_STAGES)
    o_tiles = q_tiles  # out leaves through the Q tiles, once their last product is done
    if PERSISTENT:  # its own: the next tile's Q arrives while this one's out leaves
        o_tiles = _allocate(o_descs, 2)
    # (q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn): one arrival from the producer's TMA (plus
    # its bytes) fills a slot; one from each consumer empties a K or V slot, its own a Q tile.
    bars = (barriers(2, 1), barriers(2, 1), barriers(NUM_STAGES, 1), barriers(NUM_STAGES, 2),
            barriers(NUM_STAGES, 1), barriers(NUM_STAGES, 2), barriers(2, 1))
    mbarrier.arrive(bars[6].index(0))  # consumer 0 takes the first turn

    schedule = (num_m, heads, seqlen_q, seqlen_k)
    num_tiles = num_m * batch * heads
    # Constexprs go in the tuples literally: a tuple assigned to a variable turns them into tensors.
    gl.warp_specialize([
        (_consumer0, ((q_tiles, k_tiles, v_tiles, o_tiles), bars, o_descs, LSE, schedule, head_group, num_tiles,
                      qk_scale, BLOCK_N, NUM_STAGES, CAUSAL, PERSISTENT)),
        (_consumer1, ((q_tiles, k_tiles, v_tiles, o_tiles), bars, o_descs, LSE, schedule, head_group, num_tiles,
                      qk_scale, BLOCK_N, NUM_STAGES, CAUSAL, PERSISTENT)),
        (_producer, ((q_descs, k_descs, v_descs), (q_tiles, k_tiles, v_tiles), bars, schedule, head_group, num_tiles,
                     BLOCK_N, NUM_STAGES, CAUSAL, PERSISTENT)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


# --------------------------------------------------------------------------- host
def smem_layout(dtype: torch.dtype, rows: int, head_dim: int):
    """Shared-memory layout of a [1, rows, 1, head_dim] tile of (batch, seqlen, heads, head_dim) (head_dim: the
    width of one head-dim chunk, ``head_chunks``): what the TMA writes and the wgmma reads."""
    return gl.NVMMASharedLayout.get_default_for([1, rows, 1, head_dim], gl_dtype(dtype))


def head_chunks(head_dim: int) -> tuple[int, ...]:
    """The power-of-two column chunks the kernel splits head_dim into, so no tile is padded: the Triton
    kernels' two tiles (``head_dim_tiles.head_tiles``: the largest power of two <= head_dim, then the rest if
    any, a power of two >= ``MIN_CHUNK``), 64 -> (64,), 80 -> (64, 16), 128 -> (128,).  ValueError for a
    head_dim that does not split so (those kernels pad it instead)."""
    if not isinstance(head_dim, int) or head_dim < MIN_CHUNK:
        raise ValueError(f"head_dim must be an int >= {MIN_CHUNK}, got {head_dim!r}")
    main, tail = head_dim_tiles.head_tiles(head_dim)
    if main + tail != head_dim:
        raise ValueError(f"head_dim {head_dim} is not a power of two plus a power of two >= {MIN_CHUNK}")
    return (main, tail) if tail else (main,)


def _descriptor(t: Tensor, rows: int, width: int | None = None) -> TensorDescriptor:
    """[1, rows, 1, width] boxes of t (width: all of head_dim by default).  Out-of-range rows (past seqlen)
    arrive as zeros."""
    width = t.shape[3] if width is None else width
    block = [1, rows, 1, width]
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, smem_layout(t.dtype, rows, width))


def _chunk_descriptors(t: Tensor, rows: int) -> tuple[TensorDescriptor, TensorDescriptor | None]:
    """(main, tail) descriptors of t's head-dim chunks (``head_chunks``), tail None where there is none; the
    kernel places chunk c at column c * main."""
    descs = [_descriptor(t, rows, width) for width in head_chunks(t.shape[3])]
    return descs[0], (descs[1] if len(descs) > 1 else None)


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


def head_group(batch_heads: int, kv_bytes_per_head: int, l2_bytes: int) -> int:
    """(batch, head) pairs per group of the persistent tile order (``_tile``): as many as keep their K and V
    within ``L2_SHARE`` of the L2, at least 1, and a divisor of batch_heads so that every group is whole."""
    group = max(1, min(batch_heads, int(l2_bytes * L2_SHARE) // kv_bytes_per_head))
    while batch_heads % group:
        group -= 1
    return group


def _persistent() -> bool:
    if PERSISTENT not in PERSISTENT_MODES:
        raise ValueError(f"opt_core.kernels.attention_gluon.PERSISTENT must be one of {PERSISTENT_MODES}, "
                         f"got {PERSISTENT!r}")
    return PERSISTENT == "on"


def supported(q: Tensor, k: Tensor, v: Tensor, key_padding_mask, dropout_p: float) -> bool:
    """Whether ``attention_fwd`` takes this forward: no padding mask, no dropout, and q, k, v as it needs them."""
    return key_padding_mask is None and dropout_p == 0 and _problem(q, k, v) is None


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, softmax_scale: float) -> tuple[Tensor, Tensor]:
    """(out, lse) as ``attention._launch_fwd`` returns them, from the Gluon kernel; ValueError naming what it
    cannot take (or naming ``PERSISTENT`` if it is not one of its modes)."""
    persistent = _persistent()
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
    tiles = triton.cdiv(Sq, ROWS_PER_PROGRAM) * B * H
    group = 1
    if persistent:
        l2_bytes = torch.cuda.get_device_properties(q.device).L2_cache_size
        group = head_group(B * H, 2 * Sk * D * q.element_size(), l2_bytes)
    grid = (min(tiles, dispatch.num_sms(q.device)) if persistent else tiles,)
    (q_main, q_tail), (o_main, o_tail) = (_chunk_descriptors(t, ROWS_PER_CONSUMER) for t in (q, out))
    (k_main, k_tail), (v_main, v_tail) = (_chunk_descriptors(t, block_n) for t in (k, v))
    fwd_kernel[grid](
        q_main, k_main, v_main, o_main, q_tail, k_tail, v_tail, o_tail, lse, B, H, Sq, Sk,
        float(softmax_scale) * LOG2E, group, CAUSAL=causal, BLOCK_N=block_n, NUM_STAGES=num_stages,
        PERSISTENT=persistent, num_warps=4,
    )
    return out, lse
