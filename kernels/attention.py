"""Fused causal attention, forward and backward, in Triton (FlashAttention-2 style).

- Layout: q, k, v are (batch, seqlen, heads, head_dim), read through their strides (only the head_dim
  axis must be unit-stride).  Causal attention with seqlen_q != seqlen_k is bottom-right aligned: query
  i sees key j iff j <= i + seqlen_k - seqlen_q.  A row that sees no key outputs 0, its log-sum-exp is
  +inf and its gradients are 0.
- Forward: one program per (query block, batch*head), online softmax in the exp2 domain with fp32
  statistics; only O and the log-sum-exp are written.  Key blocks every row sees completely run without
  mask arithmetic, the blocks on the diagonal or the end of the keys with it, blocks above the diagonal
  never; where ptxas would then serialise the wgmmas (sm_90), one masked loop instead (split_masked).
  Programs walk query blocks last to first, the blocks of one head together (K/V stay in L2).
  On sm_90's TMA path the tuner may also pick a warp-specialised loop (a producer warpgroup, two
  consumer ones that overlap one's softmax with the other's products; switch ``WARP_SPECIALIZE``).
  Opt-in (switch ``GLUON``): FlashAttention-3's schedule in Gluon, ``kernels/attention_gluon.py``.
- Backward: bitwise repeatable.  A preprocess kernel writes delta = rowsum(dO * O); one kernel per key
  block accumulates dK and dV over the query blocks that see it (scores computed transposed), one per
  query block accumulates dQ (7 products, no atomics).  With ``FUSED_DQ`` (sm_90's TMA path, where its
  table has a shape) the dK/dV kernel adds dQ up itself in fp32 (5 products), in key-block order unless
  ``deterministic=False``.
- Head dims 1 to 256: a power of two plus a power-of-two rest of at least 16 (80 = 64 + 16) in two tiles
  (head_tiles; on sm_80's tensor cores only in tiles of 128 rows or more, split_min_rows), any other on
  one power-of-two tile of at least 16, the columns past head_dim masked.  fp16/bf16 on the tensor cores; fp32 with
  ``input_precision="ieee"``; fp64 runs ``kernels/reference.py``.
- Dropout: keep(b, h, i, j) = rand(seed, ((b*H + h)*Sq + i)*Sk + j) >= p, one counter-based Philox
  draw that the forward, both backward kernels and ``dropout_mask`` evaluate alike, so no mask is
  stored.  Seeds are never specialised.
- Offsets: batch/head bases and block starts are 64-bit scalars, tile offsets 32-bit; tile addresses
  are recomputed from the scalar each iteration (64-bit pointer tensors carried through a loop spill).
- Block sizes: per kernel a table of the shapes kept for each variant (plain, padding mask, dropout),
  checked by the AOT compile; the tuner keys on the power-of-two bucket of the longer sequence.
- TMA on sm_90: each kernel streams its loop operands through 4-D host descriptors, results bitwise
  those of the pointer path; sm_80 keeps the pointer kernels.  Switch ``TMA = "auto" | "on" | "off"``.
- NaN: as a FlashAttention kernel (see ``attention``'s docstring); rows that see no key stay 0.

The reasoning and measurements behind each point: ``docs/kernels.md``, section Attention.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import Tensor
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from opt_core.kernels import dispatch
from opt_core.kernels import native
from opt_core.kernels import reference
from opt_core.kernels import tuning
from opt_core.kernels.head_dim_tiles import MIN_TILE, block_d, head_tiles  # noqa: F401 (part of this module's API)
from opt_core.kernels.op_registry import Direction, register_op
from opt_core.kernels.validation import (SEED_LIMIT, check_dropout, check_float, check_same_device, check_seed,
                                         check_tensor)

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
LOG2E = math.log2(math.e)
# The same constants inside the kernels (a jit function reads only constexpr globals).
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(math.log(2.0))
DQ_ACC_ROW_BLOCK = 128  # >= every dK/dV BLOCK_M, a power of two as they are
_DQ_ACC_ROW_BLOCK = tl.constexpr(DQ_ACC_ROW_BLOCK)


# --------------------------------------------------------------------------- configs
# The variants a block shape is kept for.  Dropout comes with or without a padding mask; its Philox
# state (four 32-bit words per score element) takes the big tiles over the register file.
PLAIN, PADDING_MASK, DROPOUT = "plain", "padding_mask", "dropout"
EVERY_VARIANT = frozenset({PLAIN, PADDING_MASK, DROPOUT})
NO_DROPOUT = frozenset({PLAIN, PADDING_MASK})


@dataclasses.dataclass(frozen=True)
class _ShapeTable:
    """Per (head-dim tile, fp32 inputs): the block shapes (BLOCK_M, BLOCK_N, num_warps, num_stages) a
    kernel keeps, each with the variants it is kept for; ``both`` on the pointer and the TMA path,
    ``tma_only`` on the TMA path (sm_90) as well, ``specialized`` there too with the forward's
    warp-specialised loop.  Shapes come out as (BLOCK_M, BLOCK_N, num_warps, num_stages, specialised)."""

    both: dict
    tma_only: dict
    specialized: dict = dataclasses.field(default_factory=dict)

    def _tables(self, tma, specialize="auto"):
        plain = [(self.both, False), (self.tma_only, False)] if tma else [(self.both, False)]
        if not tma or specialize == "off":
            return plain
        return [(self.specialized, True)] + ([] if specialize == "on" else plain)

    def shapes(self):
        found = {shape + (ws,) for table, ws in self._tables(True) for row in table.values() for shape in row}
        return sorted(found, key=lambda shape: (not shape[-1], shape))

    def kept(self, key, variant, tma, specialize="auto"):
        """The shapes kept for ``variant`` at ``key``, in order: the warp-specialised ones as the table lists
        them, then the others sorted (the first is what a launch runs untuned, ``OPT_CORE_TUNING=first``);
        ``specialize`` "on" keeps only the warp-specialised ones where the table has some, "off" none."""
        def found(tables):
            rows = [(ws, shape) for table, ws in tables for shape, variants in table.get(key, {}).items()
                    if variant in variants]
            return [shape + (True,) for ws, shape in rows if ws] + sorted(shape + (False,) for ws, shape in rows
                                                                           if not ws)
        return found(self._tables(tma, specialize)) or found(self._tables(tma, "off"))


# BLOCK_M counts query rows and BLOCK_N key rows in every kernel.  Each (shape, variant) compiles at
# seqlen 8192 with no spills, shared memory within the limits and mma / wgmma present (the AOT check
# keeps it so: python -m opt_core.kernels.compile_check --filter attention).  A pointer-path shape
# compiles for sm_80 and sm_90 alike, so tiles only sm_90 holds are TMA-only: K/V tiles that arrive in
# shared memory by TMA need no registers for addresses or masks (the forward's 128x128 at head_dim 128:
# 210 registers, 230 KB of shared memory at 3 stages; through pointers it spills on sm_80).
#
# The forward holds a [BLOCK_M, BLOCK_D] fp32 accumulator and a [BLOCK_M, BLOCK_N] score tile; wgmma
# wants 64 rows per warpgroup, hence 8 warps with 128 query rows.  The dK/dV kernel holds two
# [BLOCK_N, BLOCK_D] accumulators, so its key block is the large one and the streamed query block
# small; the dQ kernel is the mirror image.  fp32 inputs multiply on the FMA units (exact fp32) with
# every operand in registers: small tiles only.
_FWD_SHAPES = _ShapeTable(
    both={
        (64, False): {(128, 64, 8, 3): EVERY_VARIANT, (128, 64, 8, 4): EVERY_VARIANT, (128, 128, 8, 3): {PLAIN},
                      (64, 64, 4, 3): EVERY_VARIANT},
        (128, False): {(128, 64, 8, 3): {PLAIN}, (128, 64, 8, 4): {PLAIN}, (128, 32, 8, 3): EVERY_VARIANT,
                       (64, 64, 8, 3): EVERY_VARIANT},
        (256, False): {(64, 32, 8, 3): EVERY_VARIANT},
        (64, True): {(32, 16, 4, 2): EVERY_VARIANT},
        (128, True): {(32, 16, 4, 2): EVERY_VARIANT},
        (256, True): {(32, 16, 8, 2): EVERY_VARIANT},
    },
    tma_only={
        (64, False): {(128, 128, 8, 3): {PADDING_MASK}, (128, 128, 8, 4): NO_DROPOUT},
        (128, False): {(128, 128, 8, 2): NO_DROPOUT, (128, 128, 8, 3): NO_DROPOUT},
    },
    # 4 warps: the compiler adds a producer warpgroup and splits the 128 rows over two consumer ones
    # (232 registers each, the producer 40).  128x128 with a mask or dropout fails the compiler's pass.
    specialized={
        (64, False): {(128, 128, 4, 3): {PLAIN}, (128, 64, 4, 3): EVERY_VARIANT},
        (128, False): {(128, 128, 4, 2): {PLAIN}, (128, 64, 4, 3): EVERY_VARIANT},
    },
)
_DKDV_SHAPES = _ShapeTable(
    both={
        (64, False): {(32, 128, 8, 2): EVERY_VARIANT, (64, 128, 8, 2): {PLAIN}, (32, 64, 4, 2): EVERY_VARIANT},
        (128, False): {(32, 64, 8, 2): EVERY_VARIANT, (64, 64, 8, 2): {PLAIN}, (32, 64, 8, 3): EVERY_VARIANT},
        # With dropout at 256 no 64-key block fits: 32 keys, mma.sync instead of wgmma.
        (256, False): {(16, 64, 8, 2): NO_DROPOUT, (16, 32, 8, 2): {DROPOUT}},
        (64, True): {(16, 32, 4, 2): EVERY_VARIANT},
        (128, True): {(16, 32, 8, 2): EVERY_VARIANT},
        (256, True): {(16, 32, 8, 2): EVERY_VARIANT},
    },
    tma_only={
        (64, False): {(64, 128, 8, 3): NO_DROPOUT, (32, 128, 8, 3): NO_DROPOUT},
        (128, False): {(32, 128, 8, 3): NO_DROPOUT, (64, 64, 8, 3): NO_DROPOUT},
    },
)
# The dK/dV kernel that also adds up dQ (FUSED_DQ): dS K is one more product per query block, its
# [BLOCK_M, BLOCK_D] fp32 tile one more accumulator, so the query block is 64 rows (one wgmma's M).  Only
# the TMA path has the registers: at head_dim 64 each warpgroup owns 64 whole key rows of a 128-key block;
# at 128 (and 80) only 64 keys fit (the warpgroups split the 64 queries of S^T and dP^T: m64n32), and
# neither the mask nor dropout does.  Where the table has no shape, dQ keeps its own kernel.
_DKDV_FUSED_DQ_SHAPES = _ShapeTable(
    both={},
    tma_only={
        # with dropout 2 stages: 3 spill 8 bytes
        (64, False): {(64, 128, 8, 3): NO_DROPOUT, (64, 128, 8, 2): {PLAIN, DROPOUT}, (64, 64, 4, 2): {PLAIN}},
        (128, False): {(64, 64, 8, 2): {PLAIN}},
    },
)
_DQ_SHAPES = _ShapeTable(
    both={
        (64, False): {(128, 32, 8, 2): EVERY_VARIANT, (128, 64, 8, 2): {PLAIN}},
        (128, False): {(128, 32, 8, 2): NO_DROPOUT, (64, 64, 8, 2): NO_DROPOUT, (64, 32, 4, 2): EVERY_VARIANT},
        (256, False): {(64, 32, 8, 2): EVERY_VARIANT},
        (64, True): {(64, 16, 4, 2): EVERY_VARIANT},
        (128, True): {(32, 16, 4, 2): EVERY_VARIANT},
        (256, True): {(32, 16, 4, 2): EVERY_VARIANT},
    },
    tma_only={
        (64, False): {(128, 64, 8, 3): NO_DROPOUT},
        (128, False): {(128, 64, 8, 2): NO_DROPOUT, (128, 64, 8, 3): NO_DROPOUT, (64, 64, 8, 3): NO_DROPOUT},
    },
)


def _pre_hook(names, rows, zeroed=()):
    """Autotune pre-hook: the TMA descriptors among ``names`` get this config's block, [1, rows, 1, width] of
    (batch, seqlen, heads, head_dim), width BLOCK_D, or HEAD_TAIL for the tail tiles' (names ending in
    _TAIL).  A launch builds them before the config is known (pointer launches pass tensors or None, which
    the hook leaves alone).  The buffers named in ``zeroed`` (the fused dQ's sum and locks, when present)
    start at 0 for every run, the tuner's timing runs included."""
    def hook(nargs):
        for name in names:
            if isinstance(nargs[name], TensorDescriptor):
                width = nargs["HEAD_TAIL"] if name.endswith("_TAIL") else nargs["BLOCK_D"]
                nargs[name].block_shape = [1, nargs[rows], 1, width]
        for name in zeroed:
            if nargs[name] is not None:
                nargs[name].zero_()
    return hook


# The operands each kernel streams through its loop, and the block that sizes their tile.
STREAMED = {"fwd": (("K", "V", "K_TAIL", "V_TAIL"), "BLOCK_N"), "dkdv": (("Q", "DO", "Q_TAIL", "DO_TAIL"), "BLOCK_M"),
            "dq": (("K", "V", "K_TAIL", "V_TAIL"), "BLOCK_N")}
# The buffers a kernel adds into (the dK/dV kernel's fused dQ).
_ADDED_INTO = {"dkdv": ("DQ_ACC", "LOCKS")}


def _config(kind, m, n, warps, stages, specialized=False):
    # Only the forward's warp-specialised shapes carry the flag: the others keep the kwargs (and so the
    # tuned-table entries) they had before it existed.
    kwargs = {"BLOCK_M": m, "BLOCK_N": n, **({"WARP_SPECIALIZE": True} if specialized else {})}
    return triton.Config(kwargs, num_warps=warps, num_stages=stages,
                         pre_hook=_pre_hook(*STREAMED[kind], _ADDED_INTO.get(kind, ())))


FWD_CONFIGS = [_config("fwd", *shape) for shape in _FWD_SHAPES.shapes()]
BWD_DKDV_CONFIGS = [_config("dkdv", *shape)
                    for shape in sorted(set(_DKDV_SHAPES.shapes()) | set(_DKDV_FUSED_DQ_SHAPES.shapes()))]
BWD_DQ_CONFIGS = [_config("dq", *shape) for shape in _DQ_SHAPES.shapes()]
# delta = rowsum(dO * O) reads two tiles: one shape per tile width.
BWD_PRE_CONFIGS = [triton.Config({"BLOCK_M": 64}, num_warps=4), triton.Config({"BLOCK_M": 32}, num_warps=4)]


def _variant(flags):
    return DROPOUT if flags.get("HAS_DROPOUT") else PADDING_MASK if flags.get("HAS_KPM") else PLAIN


def _table_key(flags):
    # Head dims up to 64 use the 64-wide tile's shapes (narrower tiles need fewer
    # registers); 80 (in a 64 and a 16-wide tile, head_tiles) and 111 use the 128-wide tile's,
    # 129 to 256 the 256-wide's.
    return max(64, block_d(flags["HEAD_DIM"])), flags.get("DOT_PRECISION") == "ieee"


def _configs_for(configs, table, flags):
    kept = table.kept(_table_key(flags), _variant(flags), tma=bool(flags.get("TMA")),
                      specialize=flags.get("SPECIALIZE", WARP_SPECIALIZE))
    # Nothing from the table in the list: a caller (the interpreter, a test)
    # passed its own configs; keep them.
    listed = {_shape(c): c for c in configs}
    return [listed[shape] for shape in kept if shape in listed] or configs


def _shape(c):
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, c.kwargs.get("WARP_SPECIALIZE", False)


def prune_fwd_configs(configs, nargs, **kwargs):
    return _configs_for(configs, _FWD_SHAPES, kwargs)


def prune_bwd_dkdv_configs(configs, nargs, **kwargs):
    return _configs_for(configs, _DKDV_FUSED_DQ_SHAPES if kwargs.get("FUSED_DQ") else _DKDV_SHAPES, kwargs)


def prune_bwd_dq_configs(configs, nargs, **kwargs):
    return _configs_for(configs, _DQ_SHAPES, kwargs)


def prune_bwd_pre_configs(configs, nargs, **kwargs):
    block_m = 64 if kwargs["BLOCK_D"] <= 128 else 32
    return [c for c in configs if c.kwargs["BLOCK_M"] == block_m] or configs


# Under the interpreter the autotuner would time every config in numpy.  One
# config per kernel is all a CPU test needs: query and key blocks differ (code
# that mixes them up fails), and sequences of 128-200 span several blocks of
# each, so the diagonal and the tails are exercised.  Interpreter time grows
# with the number of blocks, not their size, so they are production-sized;
# tests swap in smaller ones where they need more blocks.
_INTERPRETER_CONFIGS = {
    "fwd": [_config("fwd", 64, 32, 4, 1)],
    "dkdv": [_config("dkdv", 32, 64, 4, 1)],
    "dq": [_config("dq", 64, 32, 4, 1)],
    "pre": [triton.Config({"BLOCK_M": 64}, num_warps=4)],
}


def _for_launch(configs, kind):
    if dispatch.INTERPRET:
        return _INTERPRETER_CONFIGS[kind]
    return configs


# --------------------------------------------------------------------------- shared device code
@triton.constexpr_function
def config_head_tiles(block_d, head_tail, rows, split_min_rows, tma):
    """(TILE_D, TILE_TAIL) a config's tile of ``rows`` rows (BLOCK_M, the dK/dV kernel's BLOCK_N) holds the
    head dim in, from the launch's split (head_tiles: BLOCK_D, HEAD_TAIL) and SPLIT_MIN_ROWS
    (split_min_rows): the split, or below SPLIT_MIN_ROWS rows the padded tile, twice BLOCK_D, and no tail."""
    if not head_tail or rows >= split_min_rows:
        return block_d, head_tail
    if tma:
        raise ValueError("a padded head-dim tile cannot take TMA: the pre-hook sizes its boxes by BLOCK_D, HEAD_TAIL")
    return 2 * block_d, 0


@triton.jit
def _tile_mask(row_ok, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Mask of a tile of the columns ``offs_d`` (up to BLOCK_D): the rows that exist and, where the tile
    ends past head_dim, the columns that do."""
    if HEAD_DIM >= BLOCK_D:
        mask = row_ok[:, None]
    else:
        mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    return mask


@triton.jit
def _survives_dropout(seed, counter, dropout_p):
    # The one definition of the dropout keep-mask (see dropout_mask()).
    return tl.rand(seed, counter) >= dropout_p


@triton.jit
def _clamp(x, lo, hi):
    # Scalars; written with branches because the interpreter's tl.minimum of two
    # scalars is unreliable.
    if x < lo:
        x = lo
    if x > hi:
        x = hi
    return x


@triton.jit
def _query_block_key_ranges(start_m, seqlen_q, seqlen_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr):
    """Key ranges of the query block starting at ``start_m``: [0, full) needs no
    mask (every row sees every key of those blocks), [full, hi) is masked, keys
    from hi on are seen by no row and never visited."""
    if CAUSAL:
        diag = seqlen_k - seqlen_q
        # keys every row of the block sees: j <= start_m + diag
        full = _clamp(start_m + diag + 1, 0, seqlen_k)
        # keys some row sees: j <= start_m + BLOCK_M - 1 + diag (rows past seqlen_q
        # do not change this: the last real row already sees up to seqlen_k - 1)
        hi = _clamp(start_m + BLOCK_M + diag, 0, seqlen_k)
    else:
        full = seqlen_k
        hi = seqlen_k
    full = (full // BLOCK_N) * BLOCK_N
    return full, hi


@triton.jit
def _tile_offsets(row_stride, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_TAIL: tl.constexpr):
    """32-bit offsets, from a block's first row (rows ``row_stride`` apart), of its [ROWS, BLOCK_D] tile and,
    with HEAD_TAIL, of its [ROWS, HEAD_TAIL] tail at the columns BLOCK_D on (else the tile's stand in)."""
    rows_offs = tl.arange(0, ROWS)[:, None] * row_stride
    main = rows_offs + tl.arange(0, BLOCK_D)[None, :]
    tail = main
    if HEAD_TAIL:
        tail = rows_offs + (BLOCK_D + tl.arange(0, HEAD_TAIL))[None, :]
    return main, tail


# In the loops below, tile addresses are a 64-bit scalar base (the block's start
# times the stride) plus loop-invariant 32-bit offsets, and loads are written
# out rather than called through a helper:
# - loop-carried [BLOCK, BLOCK_D] pointer tensors hold 64-bit values in
#   registers across iterations; sm_80 spilled with them at 128x64 tiles;
# - every nested jit call makes the interpreter re-patch triton.language,
#   which costs more than the numpy work of a small tile.
# The loops take what they read in tuples: ``keys`` = (K, V, KPM, stride_ks, stride_vs, stride_mn, b32,
# h32, seqlen_k, diag) in the forward and dQ kernels (K and V: descriptors read at (b32, start_n, h32, 0)
# with TMA, else pointers already at this (batch, head)), ``dropout`` = (the Philox counters of the
# rows' key 0, dropout_p[, dropout_scale], seed).  They hold runtime values only: Triton turns the
# constexprs of a tuple assigned to a variable into tensors, so flags are passed by keyword instead.


@triton.jit
def _query_block_program(seqlen_q, heads, BLOCK_M: tl.constexpr):
    """(bh, start_m, b, h) of this program in the forward and dQ grids: one flat grid (no 65535 limit on
    batch * heads), consecutive programs share a head, last query block first.  b and h are int32 (TMA
    coordinates); callers widen them for pointer offsets."""
    num_m = tl.cdiv(seqlen_q, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // num_m
    start_m = (num_m - 1 - pid % num_m) * BLOCK_M
    return bh, start_m, bh // heads, bh % heads


@triton.jit
def _row_block_program(seqlen_q, heads, BLOCK_M: tl.constexpr):
    """(bh, start_m, b, h) of this program in the row-wise passes (delta, the fused dQ's store): query
    blocks in order, b and h int64 for pointer offsets."""
    num_m = tl.cdiv(seqlen_q, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // num_m
    return bh, (pid % num_m) * BLOCK_M, (bh // heads).to(tl.int64), (bh % heads).to(tl.int64)


# --------------------------------------------------------------------------- forward
@triton.jit
def _online_softmax(s, m_i, l_i):
    """One key block's online-softmax step over the (log2-scaled, masked) scores ``s``: (p, the new row
    maxima, l_i rescaled to them, the factor alpha that rescales the accumulators to them)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with no visible key so far keeps m = -inf; subtracting 0 instead
    # keeps exp2 at 0 rather than exp2(-inf + inf) = NaN.
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_sub)
    p = tl.math.exp2(s - m_sub[:, None])
    return p, m_new, l_i * alpha + tl.sum(p, 1), alpha


@triton.jit
def _key_tiles(X, X_T, block_offset, offs, t_offs, start_n, col_ok, b32, h32, MASKED: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_TAIL: tl.constexpr,
               TMA: tl.constexpr):
    """(x, x_t): the key block from ``start_n`` on of K or V, zeros past seqlen_k (``col_ok``) and
    head_dim.  With TMA, X and X_T are its descriptor and its tail's; else X is the (batch, head) base,
    ``block_offset`` the block's first element and offs, t_offs ``_tile_offsets``'.  With HEAD_TAIL x_t
    holds the columns BLOCK_D on, else x stands in.  Unmasked blocks (not MASKED) of a head_dim that
    fills BLOCK_D load without a mask."""
    if TMA:  # rows past seqlen_k and columns past head_dim arrive as zeros
        x = X.load([b32, start_n, h32, 0]).reshape(BLOCK_N, BLOCK_D)
        x_t = x
        if HEAD_TAIL:
            x_t = X_T.load([b32, start_n, h32, 0]).reshape(BLOCK_N, HEAD_TAIL)
    elif MASKED or HEAD_DIM < BLOCK_D:
        mask = col_ok[:, None] & (tl.arange(0, BLOCK_D) < HEAD_DIM)[None, :]
        x = tl.load(X + block_offset + offs, mask=mask, other=0.0)
        x_t = x
        if HEAD_TAIL:
            x_t = tl.load(X + block_offset + t_offs, mask=col_ok[:, None], other=0.0)
    else:
        x = tl.load(X + block_offset + offs)
        x_t = x
        if HEAD_TAIL:
            x_t = tl.load(X + block_offset + t_offs)
    return x, x_t


@triton.jit
def _scores(q, q_t, k, k_t, qk_scale, rows, cols, col_ok, diag, kpm, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
            HAS_KPM: tl.constexpr, HEAD_TAIL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The scaled scores q·kᵀ (with HEAD_TAIL plus q_t·k_tᵀ) of the query rows ``rows`` against the keys
    ``cols``, -inf where a key is hidden: with MASKED past seqlen_k (not ``col_ok``) and, CAUSAL, past
    the row's diagonal (``diag`` = seqlen_k - seqlen_q); with HAS_KPM where the padding mask holds 0
    (``kpm``: this batch's mask, its stride, the block's first key n64 and offs_n)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if HEAD_TAIL:
        s = tl.dot(q_t, tl.trans(k_t), s, input_precision=DOT_PRECISION)
    s = s * qk_scale
    if MASKED:
        visible = col_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + diag)
        # replace, not add: a NaN score of a hidden key must not leak
        s = tl.where(visible, s, float("-inf"))
    if HAS_KPM:
        KPM, stride_mn, n64, offs_n = kpm
        real = tl.load(KPM + n64 * stride_mn + offs_n * stride_mn, mask=col_ok, other=0) != 0
        s = tl.where(real[None, :], s, float("-inf"))
    return s


@triton.jit
def _fwd_blocks(
    state, q, q_t, rows, keys, tails, dropout, lo, hi, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_TAIL: tl.constexpr, TMA: tl.constexpr,
):
    """Online-softmax update of state = (acc, acc_t, l_i, m_i) of the query rows ``rows`` over the key
    blocks [lo, hi).  With HEAD_TAIL (see head_tiles) q_t, acc_t and the K/V tiles ``_t`` hold the
    columns BLOCK_D on (``tails``: K's and V's tail descriptors with TMA), else they are stand-ins."""
    acc, acc_t, l_i, m_i = state
    K, V, KPM, stride_ks, stride_vs, stride_mn, b32, h32, seqlen_k, diag = keys
    K_T, V_T = tails
    drop_rows, dropout_p, seed = dropout
    offs_n = tl.arange(0, BLOCK_N)
    k_offs, kt_offs = _tile_offsets(stride_ks, ROWS=BLOCK_N, BLOCK_D=BLOCK_D, HEAD_TAIL=HEAD_TAIL)
    v_offs, vt_offs = _tile_offsets(stride_vs, ROWS=BLOCK_N, BLOCK_D=BLOCK_D, HEAD_TAIL=HEAD_TAIL)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < seqlen_k
        n64 = tl.cast(start_n, tl.int64)
        k, k_t = _key_tiles(K, K_T, n64 * stride_ks, k_offs, kt_offs, start_n, col_ok, b32, h32, MASKED=MASKED,
                            HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, HEAD_TAIL=HEAD_TAIL, TMA=TMA)
        s = _scores(q, q_t, k, k_t, qk_scale, rows, cols, col_ok, diag, (KPM, stride_mn, n64, offs_n),
                    MASKED=MASKED, CAUSAL=CAUSAL, HAS_KPM=HAS_KPM, HEAD_TAIL=HEAD_TAIL, DOT_PRECISION=DOT_PRECISION)
        p, m_new, l_i, alpha = _online_softmax(s, m_i, l_i)
        acc = acc * alpha[:, None]
        if HEAD_TAIL:
            acc_t = acc_t * alpha[:, None]
        if HAS_DROPOUT:
            p = tl.where(_survives_dropout(seed, drop_rows[:, None] + cols[None, :], dropout_p), p, 0.0)
        v, v_t = _key_tiles(V, V_T, n64 * stride_vs, v_offs, vt_offs, start_n, col_ok, b32, h32, MASKED=MASKED,
                            HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, HEAD_TAIL=HEAD_TAIL, TMA=TMA)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        if HEAD_TAIL:
            acc_t = tl.dot(p.to(v.dtype), v_t, acc_t, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, acc_t, l_i, m_i


@triton.jit
def _fwd_blocks_specialized(
    state, q, q_t, last_key, keys, tails, dropout, hi, qk_scale,
    HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_TAIL: tl.constexpr,
):
    """``_fwd_blocks`` over [0, hi) as sm_90's warp specialisation takes it: a producer warpgroup streams
    K/V by TMA, the compiler splits the 128 query rows over two consumer warpgroups with barriers of
    their own, so one's softmax overlaps the other's products.  Every block is masked against
    ``last_key`` (per row, the last key it sees): the pass rejects the unmasked/masked loop pair and a
    branch in the loop alike, and one compare per score is all the mask costs."""
    acc, acc_t, l_i, m_i = state
    K, V, KPM, stride_ks, stride_vs, stride_mn, b32, h32, seqlen_k, diag = keys
    K_T, V_T = tails
    drop_rows, dropout_p, seed = dropout
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=True):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k = K.load([b32, start_n, h32, 0]).reshape(BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k))
        if HEAD_TAIL:
            k_t = K_T.load([b32, start_n, h32, 0]).reshape(BLOCK_N, HEAD_TAIL)
            s = tl.dot(q_t, tl.trans(k_t), s)
        s = s * qk_scale
        s = tl.where(cols[None, :] <= last_key[:, None], s, float("-inf"))
        if HAS_KPM:
            real = tl.load(KPM + start_n.to(tl.int64) * stride_mn + offs_n * stride_mn, mask=cols < seqlen_k,
                           other=0) != 0
            s = tl.where(real[None, :], s, float("-inf"))
        p, m_new, l_i, alpha = _online_softmax(s, m_i, l_i)
        acc = acc * alpha[:, None]
        if HEAD_TAIL:
            acc_t = acc_t * alpha[:, None]
        if HAS_DROPOUT:
            p = tl.where(_survives_dropout(seed, drop_rows[:, None] + cols[None, :], dropout_p), p, 0.0)
        v = V.load([b32, start_n, h32, 0]).reshape(BLOCK_N, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc)
        if HEAD_TAIL:
            v_t = V_T.load([b32, start_n, h32, 0]).reshape(BLOCK_N, HEAD_TAIL)
            acc_t = tl.dot(p.to(v.dtype), v_t, acc_t)
        m_i = m_new
    return acc, acc_t, l_i, m_i


@triton.jit
def _load_row_tiles(base, start, seqlen, row_stride, row_ok, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr,
                    BLOCK_D: tl.constexpr, HEAD_TAIL: tl.constexpr, BY_TMA: tl.constexpr):
    """(x, x_t): the ROWS rows from ``start`` on of a (seqlen, head_dim) matrix at ``base`` (one (batch,
    head) of q, k, v or dO), its first BLOCK_D columns and, with HEAD_TAIL, the rest (x_t; else x stands
    in), zeros past seqlen (rows ``row_ok``) and head_dim.  BY_TMA through descriptors built on the device:
    the warp-specialised forward splits q's rows over its consumer warpgroups only when q arrives so."""
    offs_r = tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    first = base + start.to(tl.int64) * row_stride
    rows_offs = offs_r[:, None] * row_stride
    if BY_TMA:
        x = tl.make_tensor_descriptor(base, shape=[seqlen, HEAD_DIM], strides=[row_stride, 1],
                                      block_shape=[ROWS, BLOCK_D]).load([start, 0])
    else:
        x = tl.load(first + rows_offs + offs_d[None, :], mask=_tile_mask(row_ok, offs_d, HEAD_DIM=HEAD_DIM,
                                                                          BLOCK_D=BLOCK_D), other=0.0)
    x_t = x
    if HEAD_TAIL:
        if BY_TMA:
            x_t = tl.make_tensor_descriptor(base + BLOCK_D, shape=[seqlen, HEAD_TAIL], strides=[row_stride, 1],
                                            block_shape=[ROWS, HEAD_TAIL]).load([start, 0])
        else:
            x_t = tl.load(first + rows_offs + (BLOCK_D + tl.arange(0, HEAD_TAIL))[None, :], mask=row_ok[:, None],
                          other=0.0)
    return x, x_t


@triton.jit
def _store_rows(ptr, x, x_t, row_ok, row_stride, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                HEAD_TAIL: tl.constexpr):
    """Store the rows ``row_ok`` of x (the first BLOCK_D columns) and, with HEAD_TAIL, x_t (the rest) at
    ``ptr`` (the block's first row), converted to ptr's dtype; ``row_stride`` between rows."""
    offs_r = tl.arange(0, x.shape[0])
    offs_d = tl.arange(0, BLOCK_D)
    rows_offs = offs_r[:, None] * row_stride
    tl.store(ptr + rows_offs + offs_d[None, :], x.to(ptr.dtype.element_ty),
             mask=_tile_mask(row_ok, offs_d, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D))
    if HEAD_TAIL:
        tl.store(ptr + rows_offs + (BLOCK_D + tl.arange(0, HEAD_TAIL))[None, :], x_t.to(ptr.dtype.element_ty),
                 mask=row_ok[:, None])


@triton.jit
def _normalized(acc, l_safe, sees_no_key, dropout_scale, HAS_DROPOUT: tl.constexpr):
    """The output rows acc / l (times the dropout scale), 0 where the row sees no key even if a shared
    tile held 0 * NaN."""
    out = acc / l_safe[:, None]
    if HAS_DROPOUT:
        out = out * dropout_scale
    return tl.where(sees_no_key[:, None], 0.0, out)


@triton.jit(do_not_specialize=["seed"])
def fwd_kernel(
    Q, K, V, K_TAIL, V_TAIL, KPM, O, LSE,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh, stride_mb, stride_mn,
    heads, seqlen_q, seqlen_k, seqlen_bucket, qk_scale, dropout_p, dropout_scale, seed,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_TAIL: tl.constexpr, SPLIT_MIN_ROWS: tl.constexpr, TMA: tl.constexpr, SPLIT_MASKED: tl.constexpr,
    SPECIALIZE: tl.constexpr, WARP_SPECIALIZE: tl.constexpr = False,
):
    # seqlen_bucket and SPECIALIZE (which loops the tuner may pick) only key the autotuner;
    # WARP_SPECIALIZE (a config's) picks the loop, SPLIT_MASKED (see split_masked) how today's loop runs.
    # K_TAIL, V_TAIL: with TMA and HEAD_TAIL, the descriptors of K's and V's columns BLOCK_D on.
    TILES: tl.constexpr = config_head_tiles(BLOCK_D, HEAD_TAIL, BLOCK_M, SPLIT_MIN_ROWS, TMA)
    TILE_D: tl.constexpr = TILES[0]
    TILE_TAIL: tl.constexpr = TILES[1]
    bh, start_m, b32, h32 = _query_block_program(seqlen_q, heads, BLOCK_M=BLOCK_M)
    b = b32.to(tl.int64)
    h = h32.to(tl.int64)
    if not TMA:
        K += b * stride_kb + h * stride_kh
        V += b * stride_vb + h * stride_vh
    KPM += b * stride_mb

    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < seqlen_q
    q, q_t = _load_row_tiles(Q + b * stride_qb + h * stride_qh, start_m, seqlen_q, stride_qs, row_ok,
                               HEAD_DIM=HEAD_DIM, ROWS=BLOCK_M, BLOCK_D=TILE_D, HEAD_TAIL=TILE_TAIL,
                               BY_TMA=WARP_SPECIALIZE)
    drop_rows = (bh.to(tl.int64) * seqlen_q + rows) * seqlen_k

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, TILE_D], dtype=tl.float32)
    acc_t = acc
    if TILE_TAIL:
        acc_t = tl.zeros([BLOCK_M, TILE_TAIL], dtype=tl.float32)
    full, hi = _query_block_key_ranges(start_m, seqlen_q, seqlen_k, CAUSAL=CAUSAL, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    diag = seqlen_k - seqlen_q
    keys = (K, V, KPM, stride_ks, stride_vs, stride_mn, b32, h32, seqlen_k, diag)
    tails = (K_TAIL, V_TAIL)
    dropout = (drop_rows, dropout_p, seed)
    state = (acc, acc_t, l_i, m_i)
    if WARP_SPECIALIZE:
        last_key = tl.full([BLOCK_M], seqlen_k - 1, dtype=tl.int32)
        if CAUSAL:
            last_key = tl.minimum(rows + diag, last_key)
        acc, acc_t, l_i, m_i = _fwd_blocks_specialized(state, q, q_t, last_key, keys, tails, dropout, hi, qk_scale,
                                                       HAS_KPM=HAS_KPM, HAS_DROPOUT=HAS_DROPOUT, BLOCK_N=BLOCK_N,
                                                       BLOCK_D=TILE_D, HEAD_TAIL=TILE_TAIL)
    else:
        if SPLIT_MASKED:  # first the key blocks every row sees in full, without the mask's arithmetic
            state = _fwd_blocks(state, q, q_t, rows, keys, tails, dropout, 0, full, qk_scale, MASKED=False,
                                CAUSAL=CAUSAL, HAS_KPM=HAS_KPM, HAS_DROPOUT=HAS_DROPOUT, HEAD_DIM=HEAD_DIM,
                                DOT_PRECISION=DOT_PRECISION, BLOCK_N=BLOCK_N, BLOCK_D=TILE_D, HEAD_TAIL=TILE_TAIL,
                                TMA=TMA)
        else:
            full = 0
        acc, acc_t, l_i, m_i = _fwd_blocks(state, q, q_t, rows, keys, tails, dropout, full, hi, qk_scale,
                                           MASKED=True, CAUSAL=CAUSAL, HAS_KPM=HAS_KPM, HAS_DROPOUT=HAS_DROPOUT,
                                           HEAD_DIM=HEAD_DIM, DOT_PRECISION=DOT_PRECISION, BLOCK_N=BLOCK_N,
                                           BLOCK_D=TILE_D, HEAD_TAIL=TILE_TAIL, TMA=TMA)

    sees_no_key = l_i == 0.0
    l_safe = tl.where(sees_no_key, 1.0, l_i)
    lse = tl.where(sees_no_key, float("inf"), (m_i + tl.math.log2(l_safe)) * _LN2)
    tl.store(LSE + bh.to(tl.int64) * seqlen_q + rows, lse, mask=row_ok)
    out = _normalized(acc, l_safe, sees_no_key, dropout_scale, HAS_DROPOUT=HAS_DROPOUT)
    out_t = out
    if TILE_TAIL:
        out_t = _normalized(acc_t, l_safe, sees_no_key, dropout_scale, HAS_DROPOUT=HAS_DROPOUT)
    _store_rows(O + b * stride_ob + h * stride_oh + start_m.to(tl.int64) * stride_os, out, out_t, row_ok, stride_os,
                HEAD_DIM=HEAD_DIM, BLOCK_D=TILE_D, HEAD_TAIL=TILE_TAIL)


# --------------------------------------------------------------------------- backward
@triton.jit
def bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh,
    heads, seqlen_q,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh, start_m, b, h = _row_block_program(seqlen_q, heads, BLOCK_M=BLOCK_M)
    m64 = start_m.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m
    row_ok = rows < seqlen_q
    tile_mask = _tile_mask(row_ok, offs_d, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    o = tl.load(O + b * stride_ob + h * stride_oh + m64 * stride_os + offs_m[:, None] * stride_os + offs_d[None, :],
                mask=tile_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + m64 * stride_dos + offs_m[:, None] * stride_dos
                 + offs_d[None, :], mask=tile_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * seqlen_q + rows, delta, mask=row_ok)


# The fused dQ's order (DETERMINISTIC): dQ's parts of a query block are added from the highest key block
# that visits it down.  Its lock holds the token (index + 1) of the key block that added last; a key block
# waits for the token of the one above it, adds, and puts its own.  Key-block programs start highest
# first, so a program only waits for programs that started before it (no deadlock), and the order of the
# fp32 sums never depends on timing (bitwise repeatable).


@triton.jit
def _take_turn(lock, token, wait, pass_previous):
    """Before a query block's part of dQ: wait (``wait``) for the key block above this one to have added its
    part (``lock`` holds its token, token + 1), and pass the previous query block's turn on
    (``pass_previous``; its lock is ``lock - 1``).  Triton hands a scalar atomic's result to every thread
    through shared memory and a CTA barrier, so every thread's adds of the previous query block are issued
    before thread 0's release (an explicit barrier here costs the kernel registers it does not have)."""
    turn = tl.atomic_add(lock, 0, sem="acquire")
    if wait:
        while turn != token + 1:
            turn = tl.atomic_add(lock, 0, sem="acquire")
    if pass_previous:
        tl.atomic_xchg(lock - 1, token, sem="release")


@triton.jit
def _pass_turn(lock, token):
    """After the last query block of a loop: every thread's adds issued, then the turn passes on."""
    tl.debug_barrier()
    tl.atomic_xchg(lock, token, sem="release")


@triton.jit
def _add_dq_part(dq_rows, ds_t, k, k_t, DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_TAIL: tl.constexpr):
    """Add dS K (and with HEAD_TAIL dS K_t) of one query block into the fused dQ's fp32 sum at ``dq_rows``
    (the block's first row).  DQ_ACC has whole blocks of rows and BLOCK_D + HEAD_TAIL columns
    (dq_acc_width): no mask (rows past seqlen_q and columns past head_dim add zeros that are never read)."""
    offs_m = tl.arange(0, ds_t.shape[1])
    offs_d = tl.arange(0, BLOCK_D)
    row_offs = offs_m[:, None] * (BLOCK_D + HEAD_TAIL)
    tl.atomic_add(dq_rows + row_offs + offs_d[None, :], tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION),
                  sem="relaxed")
    if HEAD_TAIL:
        tl.atomic_add(dq_rows + row_offs + (BLOCK_D + tl.arange(0, HEAD_TAIL))[None, :],
                      tl.dot(tl.trans(ds_t), k_t, input_precision=DOT_PRECISION), sem="relaxed")


@triton.jit
def _dkdv_blocks(
    grads, key_block, queries, tails, dropout, dq_sum, lo, hi, qk_scale,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_TAIL: tl.constexpr, TMA: tl.constexpr, FUSED_DQ: tl.constexpr, DETERMINISTIC: tl.constexpr,
):
    """Accumulate grads = (dK, dV, their tails) of key_block = (k, k_t, v, v_t, key_real, cols) over the
    query blocks [lo, hi); tails (``_t``; ``tails``: Q's and dO's tail descriptors) as in ``_fwd_blocks``.
    queries = (Q, DO, LSE, DELTA, stride_qs, stride_dos, b32, h32, seqlen_q, seqlen_k, diag): Q and dO are
    descriptors with TMA.  With FUSED_DQ, dS K of each query block is added into dQ's fp32 sum too,
    DETERMINISTIC in turn: dq_sum = (DQ_ACC and LOCKS of this (batch, head), this key block's token, the
    first query row the key block above it visits)."""
    dk, dk_t, dv, dv_t = grads
    k, k_t, v, v_t, key_real, cols = key_block
    Q, DO, LSE, DELTA, stride_qs, stride_dos, b32, h32, seqlen_q, seqlen_k, diag = queries
    Q_T, DO_T = tails
    drop_base, dropout_p, dropout_scale, seed = dropout
    DQ_ACC, LOCKS, token, wait_from = dq_sum
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_offs, qt_offs = _tile_offsets(stride_qs, ROWS=BLOCK_M, BLOCK_D=BLOCK_D, HEAD_TAIL=HEAD_TAIL)
    do_offs, dot_offs = _tile_offsets(stride_dos, ROWS=BLOCK_M, BLOCK_D=BLOCK_D, HEAD_TAIL=HEAD_TAIL)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < seqlen_q
        m64 = tl.cast(start_m, tl.int64)
        if FUSED_DQ and DETERMINISTIC:
            _take_turn(LOCKS + start_m // BLOCK_M, token, start_m >= wait_from, start_m != lo)
        if TMA:
            q = Q.load([b32, start_m, h32, 0]).reshape(BLOCK_M, BLOCK_D)
            do = DO.load([b32, start_m, h32, 0]).reshape(BLOCK_M, BLOCK_D)
            if HEAD_TAIL:
                q_t = Q_T.load([b32, start_m, h32, 0]).reshape(BLOCK_M, HEAD_TAIL)
                do_t = DO_T.load([b32, start_m, h32, 0]).reshape(BLOCK_M, HEAD_TAIL)
        else:
            qd_mask = _tile_mask(row_ok, offs_d, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
            q = tl.load(Q + m64 * stride_qs + q_offs, mask=qd_mask, other=0.0)
            do = tl.load(DO + m64 * stride_dos + do_offs, mask=qd_mask, other=0.0)
            if HEAD_TAIL:
                q_t = tl.load(Q + m64 * stride_qs + qt_offs, mask=row_ok[:, None], other=0.0)
                do_t = tl.load(DO + m64 * stride_dos + dot_offs, mask=row_ok[:, None], other=0.0)
        # Rows past seqlen_q load q = dO = 0 and delta = 0, so they add nothing;
        # lse = +inf makes their P 0 as well rather than exp2(0 - 0) = 1.
        lse2 = tl.load(LSE + rows, mask=row_ok, other=float("inf")) * _LOG2E
        delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
        if HEAD_TAIL:
            s_t = tl.dot(k_t, tl.trans(q_t), s_t, input_precision=DOT_PRECISION)
        s_t = s_t * qk_scale
        if CAUSAL:
            s_t = tl.where(cols[:, None] <= rows[None, :] + diag, s_t, float("-inf"))
        if HAS_KPM:
            s_t = tl.where(key_real[:, None], s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - lse2[None, :])
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if HEAD_TAIL:
            dp_t = tl.dot(v_t, tl.trans(do_t), dp_t, input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            kept_t = _survives_dropout(seed, drop_base + (rows.to(tl.int64) * seqlen_k)[None, :] + cols[:, None],
                                       dropout_p)
            pd_t = tl.where(kept_t, p_t * dropout_scale, 0.0).to(do.dtype)
            dp_t = tl.where(kept_t, dp_t * dropout_scale, 0.0)
        else:
            pd_t = p_t.to(do.dtype)
        dv = tl.dot(pd_t, do, dv, input_precision=DOT_PRECISION)
        if HEAD_TAIL:
            dv_t = tl.dot(pd_t, do_t, dv_t, input_precision=DOT_PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = tl.dot(ds_t, q, dk, input_precision=DOT_PRECISION)
        if HEAD_TAIL:
            dk_t = tl.dot(ds_t, q_t, dk_t, input_precision=DOT_PRECISION)
        if FUSED_DQ:
            _add_dq_part(DQ_ACC + m64 * (BLOCK_D + HEAD_TAIL), ds_t, k, k_t, DOT_PRECISION=DOT_PRECISION,
                         BLOCK_D=BLOCK_D, HEAD_TAIL=HEAD_TAIL)
    if FUSED_DQ and DETERMINISTIC:
        if hi > lo:
            _pass_turn(LOCKS + tl.cdiv(hi, BLOCK_M) - 1, token)
    return dk, dk_t, dv, dv_t


@triton.jit
def _dkdv_loops(
    grads, key_block, queries, tails, dropout, dq_sum, lo, start_n, qk_scale,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_TAIL: tl.constexpr, TMA: tl.constexpr, SPLIT_MASKED: tl.constexpr, FUSED_DQ: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
):
    """(dK, dV) and their tails of the key block starting at ``start_n`` over every query block from ``lo``
    on.  Causal with SPLIT_MASKED (sm_80): the blocks crossing the diagonal in a masked loop, the rest in
    one without the mask's arithmetic, as the forward.  Otherwise (sm_90) one loop, the causal mask on
    every tile (a no-op past the diagonal): see split_masked."""
    seqlen_q, diag = queries[8], queries[10]
    if not (SPLIT_MASKED and CAUSAL):
        lo_unmasked = lo
    else:  # from `mid` on, every row sees the whole key block
        mid = _clamp(start_n + BLOCK_N - 1 - diag, lo, seqlen_q)
        lo_unmasked = lo + tl.cdiv(mid - lo, BLOCK_M) * BLOCK_M
        grads = _dkdv_blocks(grads, key_block, queries, tails, dropout, dq_sum, lo, lo_unmasked, qk_scale,
                             CAUSAL=True, HAS_KPM=HAS_KPM, HAS_DROPOUT=HAS_DROPOUT, HEAD_DIM=HEAD_DIM,
                             DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, HEAD_TAIL=HEAD_TAIL,
                             TMA=TMA, FUSED_DQ=FUSED_DQ, DETERMINISTIC=DETERMINISTIC)
    return _dkdv_blocks(grads, key_block, queries, tails, dropout, dq_sum, lo_unmasked, seqlen_q, qk_scale,
                        CAUSAL=CAUSAL and not SPLIT_MASKED, HAS_KPM=HAS_KPM, HAS_DROPOUT=HAS_DROPOUT, HEAD_DIM=HEAD_DIM,
                        DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, HEAD_TAIL=HEAD_TAIL, TMA=TMA,
                        FUSED_DQ=FUSED_DQ, DETERMINISTIC=DETERMINISTIC)


@triton.jit
def _dq_acc_rows(seqlen_q):
    """Rows per (batch, head) of the fused dQ's fp32 sum, (batch * heads, rows, dq_acc_width): seqlen_q rounded
    up to DQ_ACC_ROW_BLOCK, a whole number of any BLOCK_M, so its tiles need no mask."""
    return tl.cdiv(seqlen_q, _DQ_ACC_ROW_BLOCK) * _DQ_ACC_ROW_BLOCK


@triton.jit
def _first_query_row(start_n, seqlen_q, diag, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """The first query block (its first row) that sees a key of the block starting at ``start_n``
    (causal: query i sees key j iff i >= j - diag); the dK/dV loop visits it and every later one."""
    if CAUSAL:
        lo = _clamp(start_n - diag, 0, seqlen_q)
        lo = (lo // BLOCK_M) * BLOCK_M
    else:
        lo = 0
    return lo


@triton.jit
def _dq_sum_of(DQ_ACC, LOCKS, bh, n_idx, seqlen_q, seqlen_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, ACC_WIDTH: tl.constexpr):
    """The fused dQ's ``dq_sum`` for key block ``n_idx`` of (batch, head) ``bh``: its DQ_ACC and LOCKS, its
    token, and the first query row the key block above it (the one before it in the order) visits, from
    which on it waits for that one's part."""
    wait_from = seqlen_q
    if (n_idx + 1) * BLOCK_N < seqlen_k:
        wait_from = _first_query_row((n_idx + 1) * BLOCK_N, seqlen_q, seqlen_k - seqlen_q, CAUSAL=CAUSAL,
                                     BLOCK_M=BLOCK_M)
    dq_acc = DQ_ACC + bh.to(tl.int64) * _dq_acc_rows(seqlen_q) * ACC_WIDTH
    return dq_acc, LOCKS + bh * tl.cdiv(seqlen_q, BLOCK_M), n_idx + 1, wait_from


@triton.jit(do_not_specialize=["seed"])
def bwd_dkdv_kernel(
    Q, K, V, Q_TAIL, DO_TAIL, KPM, DO, LSE, DELTA, DK, DV, DQ_ACC, LOCKS,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    stride_mb, stride_mn,
    heads, seqlen_q, seqlen_k, seqlen_bucket, sm_scale, qk_scale, dropout_p, dropout_scale, seed,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_TAIL: tl.constexpr, SPLIT_MIN_ROWS: tl.constexpr, TMA: tl.constexpr, SPLIT_MASKED: tl.constexpr,
    FUSED_DQ: tl.constexpr, DETERMINISTIC: tl.constexpr,
):
    """dK and dV of one key block; with FUSED_DQ also its part of dQ, added into DQ_ACC (fp32, zeroed, see
    _dq_acc_rows), with DETERMINISTIC in key-block order through LOCKS (one int32 per (batch, head) and
    query block of BLOCK_M rows, zeroed).  Head-dim tiles as in the forward (Q_TAIL, DO_TAIL: with TMA
    and HEAD_TAIL, the descriptors of Q's and dO's columns BLOCK_D on)."""
    TILES: tl.constexpr = config_head_tiles(BLOCK_D, HEAD_TAIL, BLOCK_N, SPLIT_MIN_ROWS, TMA)
    TILE_D: tl.constexpr = TILES[0]
    TILE_TAIL: tl.constexpr = TILES[1]
    num_n = tl.cdiv(seqlen_k, BLOCK_N)
    pid = tl.program_id(0)
    bh = pid // num_n
    if FUSED_DQ and DETERMINISTIC:
        # dQ's parts are added from the last key block down, and a program waits only for programs that
        # started before it: the last key blocks start first.
        n_idx = num_n - 1 - pid % num_n
    else:
        # Causal: the first key blocks are seen by the most queries; they start first.
        n_idx = pid % num_n
    start_n = n_idx * BLOCK_N
    b32 = bh // heads
    h32 = bh % heads
    b = b32.to(tl.int64)
    h = h32.to(tl.int64)
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < seqlen_k
    k, k_t = _load_row_tiles(K + b * stride_kb + h * stride_kh, start_n, seqlen_k, stride_ks, col_ok,
                               HEAD_DIM=HEAD_DIM, ROWS=BLOCK_N, BLOCK_D=TILE_D, HEAD_TAIL=TILE_TAIL, BY_TMA=False)
    v, v_t = _load_row_tiles(V + b * stride_vb + h * stride_vh, start_n, seqlen_k, stride_vs, col_ok,
                               HEAD_DIM=HEAD_DIM, ROWS=BLOCK_N, BLOCK_D=TILE_D, HEAD_TAIL=TILE_TAIL, BY_TMA=False)
    if HAS_KPM:
        key_real = tl.load(KPM + b * stride_mb + cols * stride_mn, mask=col_ok, other=0) != 0
    else:
        key_real = col_ok

    diag = seqlen_k - seqlen_q
    # Rows before `lo` see none of this block (no visit); `_dkdv_loops` finds the ones that see all of it.
    lo = _first_query_row(start_n, seqlen_q, diag, CAUSAL=CAUSAL, BLOCK_M=BLOCK_M)
    dq_sum = (DQ_ACC, LOCKS, seqlen_q, seqlen_q)
    if FUSED_DQ:
        dq_sum = _dq_sum_of(DQ_ACC, LOCKS, bh, n_idx, seqlen_q, seqlen_k, CAUSAL=CAUSAL, BLOCK_M=BLOCK_M,
                            BLOCK_N=BLOCK_N, ACC_WIDTH=TILE_D + TILE_TAIL)

    dk = tl.zeros([BLOCK_N, TILE_D], dtype=tl.float32)
    dk_t = dk
    if TILE_TAIL:
        dk_t = tl.zeros([BLOCK_N, TILE_TAIL], dtype=tl.float32)
    if not TMA:
        Q += b * stride_qb + h * stride_qh
        DO += b * stride_dob + h * stride_doh
    LSE += bh.to(tl.int64) * seqlen_q
    DELTA += bh.to(tl.int64) * seqlen_q
    key_block = (k, k_t, v, v_t, key_real, cols)
    queries = (Q, DO, LSE, DELTA, stride_qs, stride_dos, b32, h32, seqlen_q, seqlen_k, diag)
    dropout = (bh.to(tl.int64) * seqlen_q * seqlen_k, dropout_p, dropout_scale, seed)
    dk, dk_t, dv, dv_t = _dkdv_loops((dk, dk_t, dk, dk_t), key_block, queries, (Q_TAIL, DO_TAIL), dropout, dq_sum,
                                     lo, start_n, qk_scale, CAUSAL=CAUSAL, HAS_KPM=HAS_KPM, HAS_DROPOUT=HAS_DROPOUT,
                                     HEAD_DIM=HEAD_DIM, DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                     BLOCK_D=TILE_D, HEAD_TAIL=TILE_TAIL, TMA=TMA, SPLIT_MASKED=SPLIT_MASKED,
                                     FUSED_DQ=FUSED_DQ, DETERMINISTIC=DETERMINISTIC)

    n64 = start_n.to(tl.int64)
    _store_rows(DK + b * stride_dkb + h * stride_dkh + n64 * stride_dks, dk * sm_scale, dk_t * sm_scale, col_ok,
                stride_dks, HEAD_DIM=HEAD_DIM, BLOCK_D=TILE_D, HEAD_TAIL=TILE_TAIL)
    _store_rows(DV + b * stride_dvb + h * stride_dvh + n64 * stride_dvs, dv, dv_t, col_ok, stride_dvs,
                HEAD_DIM=HEAD_DIM, BLOCK_D=TILE_D, HEAD_TAIL=TILE_TAIL)


@triton.jit
def _dq_blocks(
    grads, query_block, keys, tails, dropout, lo, hi, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_TAIL: tl.constexpr, TMA: tl.constexpr,
):
    """Accumulate grads = (dQ, its tail) of query_block = (q, q_t, do, do_t, lse2, delta, rows) over the key
    blocks [lo, hi); the tails (``_t``, ``tails``: K's and V's tail descriptors) as in ``_fwd_blocks``."""
    dq, dq_t = grads
    q, q_t, do, do_t, lse2, delta, rows = query_block
    K, V, KPM, stride_ks, stride_vs, stride_mn, b32, h32, seqlen_k, diag = keys
    K_T, V_T = tails
    drop_rows, dropout_p, dropout_scale, seed = dropout
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_offs, kt_offs = _tile_offsets(stride_ks, ROWS=BLOCK_N, BLOCK_D=BLOCK_D, HEAD_TAIL=HEAD_TAIL)
    v_offs, vt_offs = _tile_offsets(stride_vs, ROWS=BLOCK_N, BLOCK_D=BLOCK_D, HEAD_TAIL=HEAD_TAIL)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < seqlen_k
        n64 = tl.cast(start_n, tl.int64)
        # Both main tiles before both tails, unlike _key_tiles: at head_dim 80 the order k, k_t, v, v_t
        # changes sm_90's registers by -18 to +4 and wants a GPU A/B before it replaces this one.
        k_t = None  # read only with HEAD_TAIL
        if TMA:
            k = K.load([b32, start_n, h32, 0]).reshape(BLOCK_N, BLOCK_D)
            v = V.load([b32, start_n, h32, 0]).reshape(BLOCK_N, BLOCK_D)
            if HEAD_TAIL:
                k_t = K_T.load([b32, start_n, h32, 0]).reshape(BLOCK_N, HEAD_TAIL)
                v_t = V_T.load([b32, start_n, h32, 0]).reshape(BLOCK_N, HEAD_TAIL)
        elif MASKED or HEAD_DIM < BLOCK_D:
            kv_mask = col_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
            k = tl.load(K + n64 * stride_ks + k_offs, mask=kv_mask, other=0.0)
            v = tl.load(V + n64 * stride_vs + v_offs, mask=kv_mask, other=0.0)
            if HEAD_TAIL:
                k_t = tl.load(K + n64 * stride_ks + kt_offs, mask=col_ok[:, None], other=0.0)
                v_t = tl.load(V + n64 * stride_vs + vt_offs, mask=col_ok[:, None], other=0.0)
        else:
            k = tl.load(K + n64 * stride_ks + k_offs)
            v = tl.load(V + n64 * stride_vs + v_offs)
            if HEAD_TAIL:
                k_t = tl.load(K + n64 * stride_ks + kt_offs)
                v_t = tl.load(V + n64 * stride_vs + vt_offs)
        s = _scores(q, q_t, k, k_t, qk_scale, rows, cols, col_ok, diag, (KPM, stride_mn, n64, offs_n),
                    MASKED=MASKED, CAUSAL=CAUSAL, HAS_KPM=HAS_KPM, HEAD_TAIL=HEAD_TAIL, DOT_PRECISION=DOT_PRECISION)
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HEAD_TAIL:
            dp = tl.dot(do_t, tl.trans(v_t), dp, input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            kept = _survives_dropout(seed, drop_rows[:, None] + cols[None, :], dropout_p)
            dp = tl.where(kept, dp * dropout_scale, 0.0)
        ds = (p * (dp - delta[:, None])).to(k.dtype)
        dq = tl.dot(ds, k, dq, input_precision=DOT_PRECISION)
        if HEAD_TAIL:
            dq_t = tl.dot(ds, k_t, dq_t, input_precision=DOT_PRECISION)
    return dq, dq_t


@triton.jit(do_not_specialize=["seed"])
def bwd_dq_kernel(
    Q, K, V, K_TAIL, V_TAIL, KPM, DO, LSE, DELTA, DQ,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dqb, stride_dqs, stride_dqh, stride_mb, stride_mn,
    heads, seqlen_q, seqlen_k, seqlen_bucket, sm_scale, qk_scale, dropout_p, dropout_scale, seed,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_TAIL: tl.constexpr, SPLIT_MIN_ROWS: tl.constexpr, TMA: tl.constexpr, SPLIT_MASKED: tl.constexpr,
):
    # Grid, order, loops and head-dim tiles as in the forward.
    TILES: tl.constexpr = config_head_tiles(BLOCK_D, HEAD_TAIL, BLOCK_M, SPLIT_MIN_ROWS, TMA)
    TILE_D: tl.constexpr = TILES[0]
    TILE_TAIL: tl.constexpr = TILES[1]
    bh, start_m, b32, h32 = _query_block_program(seqlen_q, heads, BLOCK_M=BLOCK_M)
    b = b32.to(tl.int64)
    h = h32.to(tl.int64)
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < seqlen_q
    q, q_t = _load_row_tiles(Q + b * stride_qb + h * stride_qh, start_m, seqlen_q, stride_qs, row_ok,
                               HEAD_DIM=HEAD_DIM, ROWS=BLOCK_M, BLOCK_D=TILE_D, HEAD_TAIL=TILE_TAIL, BY_TMA=False)
    do, do_t = _load_row_tiles(DO + b * stride_dob + h * stride_doh, start_m, seqlen_q, stride_dos, row_ok,
                                 HEAD_DIM=HEAD_DIM, ROWS=BLOCK_M, BLOCK_D=TILE_D, HEAD_TAIL=TILE_TAIL,
                                 BY_TMA=False)
    row_base = bh.to(tl.int64) * seqlen_q + rows
    lse2 = tl.load(LSE + row_base, mask=row_ok, other=float("inf")) * _LOG2E
    delta = tl.load(DELTA + row_base, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, TILE_D], dtype=tl.float32)
    dq_t = dq
    if TILE_TAIL:
        dq_t = tl.zeros([BLOCK_M, TILE_TAIL], dtype=tl.float32)
    full, hi = _query_block_key_ranges(start_m, seqlen_q, seqlen_k, CAUSAL=CAUSAL, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    if not TMA:
        K += b * stride_kb + h * stride_kh
        V += b * stride_vb + h * stride_vh
    KPM += b * stride_mb
    query_block = (q, q_t, do, do_t, lse2, delta, rows)
    keys = (K, V, KPM, stride_ks, stride_vs, stride_mn, b32, h32, seqlen_k, seqlen_k - seqlen_q)
    tails = (K_TAIL, V_TAIL)
    dropout = (row_base * seqlen_k, dropout_p, dropout_scale, seed)
    grads = (dq, dq_t)
    if SPLIT_MASKED:
        grads = _dq_blocks(grads, query_block, keys, tails, dropout, 0, full, qk_scale, MASKED=False, CAUSAL=CAUSAL,
                           HAS_KPM=HAS_KPM, HAS_DROPOUT=HAS_DROPOUT, HEAD_DIM=HEAD_DIM, DOT_PRECISION=DOT_PRECISION,
                           BLOCK_N=BLOCK_N, BLOCK_D=TILE_D, HEAD_TAIL=TILE_TAIL, TMA=TMA)
    else:
        full = 0
    dq, dq_t = _dq_blocks(grads, query_block, keys, tails, dropout, full, hi, qk_scale, MASKED=True, CAUSAL=CAUSAL,
                          HAS_KPM=HAS_KPM, HAS_DROPOUT=HAS_DROPOUT, HEAD_DIM=HEAD_DIM, DOT_PRECISION=DOT_PRECISION,
                          BLOCK_N=BLOCK_N, BLOCK_D=TILE_D, HEAD_TAIL=TILE_TAIL, TMA=TMA)
    _store_rows(DQ + b * stride_dqb + h * stride_dqh + start_m.to(tl.int64) * stride_dqs, dq * sm_scale,
                dq_t * sm_scale, row_ok, stride_dqs, HEAD_DIM=HEAD_DIM, BLOCK_D=TILE_D, HEAD_TAIL=TILE_TAIL)


@triton.jit
def bwd_dq_store_kernel(
    DQ_ACC, DQ, stride_dqb, stride_dqs, stride_dqh, heads, seqlen_q, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC_WIDTH: tl.constexpr,
):
    """dQ = sm_scale * the fp32 sum the dK/dV kernel added up (FUSED_DQ), in dQ's dtype and layout: one
    block_d wide tile of DQ_ACC's rows of ACC_WIDTH (dq_acc_width) columns."""
    bh, start_m, b, h = _row_block_program(seqlen_q, heads, BLOCK_M=BLOCK_M)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m
    tile_mask = _tile_mask(rows < seqlen_q, offs_d, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    acc = tl.load(DQ_ACC + (bh.to(tl.int64) * _dq_acc_rows(seqlen_q) + rows)[:, None] * ACC_WIDTH + offs_d[None, :],
                  mask=tile_mask)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows.to(tl.int64)[:, None] * stride_dqs + offs_d[None, :],
             (acc * sm_scale).to(DQ.dtype.element_ty), mask=tile_mask)


# --------------------------------------------------------------------------- dropout mask
@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(OUT, seqlen_q, seqlen_k, dropout_p, seed, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(0)  # axis 0: no 65535 limit on batch * heads
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    counter = ((bh.to(tl.int64) * seqlen_q + rows) * seqlen_k)[:, None] + cols[None, :]
    kept = _survives_dropout(seed, counter, dropout_p)
    tl.store(OUT + counter, kept.to(tl.int8), mask=(rows < seqlen_q)[:, None] & (cols < seqlen_k)[None, :])


_fwd = tuning.autotune(
    _for_launch(FWD_CONFIGS, "fwd"),
    key=["HEAD_DIM", "CAUSAL", "HAS_KPM", "HAS_DROPOUT", "TMA", "SPECIALIZE", "seqlen_bucket"],
    buckets=["seqlen_bucket"],
    prune_configs_by={"early_config_prune": prune_fwd_configs},
)(fwd_kernel)
_bwd_pre = tuning.autotune(
    _for_launch(BWD_PRE_CONFIGS, "pre"), key=["HEAD_DIM"],
    prune_configs_by={"early_config_prune": prune_bwd_pre_configs},
)(bwd_preprocess_kernel)
_bwd_dkdv = tuning.autotune(
    _for_launch(BWD_DKDV_CONFIGS, "dkdv"),
    key=["HEAD_DIM", "CAUSAL", "HAS_KPM", "HAS_DROPOUT", "TMA", "FUSED_DQ", "DETERMINISTIC", "seqlen_bucket"],
    buckets=["seqlen_bucket"],
    prune_configs_by={"early_config_prune": prune_bwd_dkdv_configs},
)(bwd_dkdv_kernel)
_bwd_dq = tuning.autotune(
    _for_launch(BWD_DQ_CONFIGS, "dq"),
    key=["HEAD_DIM", "CAUSAL", "HAS_KPM", "HAS_DROPOUT", "TMA", "seqlen_bucket"],
    buckets=["seqlen_bucket"],
    prune_configs_by={"early_config_prune": prune_bwd_dq_configs},
)(bwd_dq_kernel)


# --------------------------------------------------------------------------- launchers
def _unit_last(t):
    # The kernels address head_dim with unit stride (vector loads); any other
    # layout of that axis, e.g. the stride-0 gradient of a .sum(), is copied once.
    return t if t.stride(-1) == 1 else t.contiguous()


def dot_precision(dtype):
    # fp32 inputs: exact fp32 products, not TF32 (Triton's default on a GPU).
    return "ieee" if dtype == torch.float32 else None


def dq_acc_width(head_dim: int) -> int:
    """Columns of the fused dQ's fp32 sum per row: head_dim where the kernels split it (head_tiles), else
    the one tile's block_d."""
    return sum(head_tiles(head_dim))


def _seqlen_bucket(seqlen_q, seqlen_k):
    return triton.next_power_of_2(max(seqlen_q, seqlen_k, 1))


def _padding_mask_args(key_padding_mask, q):
    # Without a mask the pointer is never read; q stands in so the signature is fixed.
    if key_padding_mask is None:
        return q, 0, 0
    m = key_padding_mask.view(torch.uint8)
    return m, m.stride(0), m.stride(1)


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


# Where the loops stream their operands through TMA descriptors instead of pointer loads
# ("auto" | "on" | "off", see dispatch.tma_enabled).
TMA = "auto"


def _tma_usable(*tensors) -> bool:
    """True when the streamed operands go through TMA: the switch allows it on this device and dtype, and
    each has the layout a (batch, seqlen, heads, head_dim) descriptor needs."""
    return (dispatch.tma_enabled(TMA, tensors[0], "opt_core.kernels.attention.TMA")
            and all(dispatch.tma_aligned(t) for t in tensors))


def split_masked(kind: str, tma: bool, wgmma: bool) -> bool:
    """SPLIT_MASKED of the ``kind`` kernel ("fwd", "dkdv", "dq"): whether the blocks the causal diagonal
    or the end of the sequence crosses run in a masked loop of their own and the rest in one without the
    mask's arithmetic (True), or every block in one masked loop (False).  The split saves that arithmetic
    on most tiles, but where the products are wgmmas (``wgmma``: fp16/bf16 on sm_90) ptxas serialises
    every wgmma of the kernel when fp32 accumulators pass from one loop into the next (C7515) everywhere
    but in the forward and dQ kernels on the TMA path, and that costs more."""
    if tma:  # sm_90 only
        return kind != "dkdv"
    return not wgmma


def uses_wgmma(dtype: torch.dtype, arch: int) -> bool:
    """Whether the kernels' products in ``dtype`` on sm_``arch`` are wgmmas: fp16/bf16 on sm_90 (fp32 runs
    on the FMA units, sm_80 has mma.sync)."""
    return dtype in dispatch.TMA_DTYPES and arch == 90


def split_min_rows(dtype: torch.dtype, arch: Optional[int]) -> int:
    """SPLIT_MIN_ROWS of a launch in ``dtype`` on sm_``arch`` (None: no GPU, the interpreter): the fewest rows
    (BLOCK_M, the dK/dV kernel's BLOCK_N) a config's tile needs to hold a head dim that splits (head_tiles)
    in two tiles; a smaller tile keeps the padded one.  0 but on sm_80's tensor cores (mma.sync), 128:
    there Triton lays a chain of products whose output is as tall as wide by rows over the warps
    (warpsPerCTA [8, 1]), so below 16 rows a warp the tile is held twice over.  At 80 = 64 + 16 with the
    split, the dK/dV kernel's 64x64 at 8 warps went from 193 registers to 255 and a spill, and the dQ
    kernel's 64x32 at 4 warps (16 rows a warp) spilled with dropout; the 128-row tiles of the forward
    and dQ kernels have 0-57 fewer registers (216 -> 195 at the forward's 128x64), 37% less shared memory
    and 37% fewer products (docs/kernels.md, Head dims)."""
    return 128 if dtype in dispatch.TMA_DTYPES and arch is not None and arch < 90 else 0


def _arch(x: Tensor) -> Optional[int]:
    """The compute capability of ``x``'s GPU as sm_ counts it (90), None off a GPU."""
    if x.device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(x.device)
    return 10 * major + minor


def _wgmma(x: Tensor) -> bool:
    """``uses_wgmma`` for ``x``'s dtype on its GPU (False off a GPU)."""
    arch = _arch(x)
    return arch is not None and uses_wgmma(x.dtype, arch)


def _descriptor(t):
    # A 4-D (batch, seqlen, heads, head_dim) descriptor; the autotune pre-hook sets its block for the
    # chosen config.  Out-of-range rows and head_dim columns read as zeros, as the masked loads do.
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 1, 1])


def _streamed(a: Tensor, b: Tensor, tma: bool, tile: int, tail: int) -> tuple:
    """A kernel's streamed operands (a, b, a's tail, b's tail): with TMA descriptors, the tails' over the
    columns ``tile`` on (None where ``tail`` is 0); through pointers the tensors, the kernel addresses the
    tails from them (None)."""
    if not tma:
        return a, b, None, None
    main = _descriptor(a), _descriptor(b)
    if not tail:
        return *main, None, None
    return *main, _descriptor(a[..., tile:]), _descriptor(b[..., tile:])


# Whether the forward's tuner may pick the warp-specialised loop on sm_90's TMA path: "auto" beside
# today's loop, "on" instead of it where a shape has one (GPU tests, A/B), "off" never.
WARP_SPECIALIZE = "auto"
SPECIALIZE_MODES = ("auto", "on", "off")


def _specialize_mode(q: Tensor, tma: bool) -> str:
    """The forward's SPECIALIZE flag: the switch, where the TMA path runs and q suits the descriptor the
    specialised loop loads it through ("off" elsewhere); on a GPU it also installs the scratch allocator
    that descriptor needs."""
    if WARP_SPECIALIZE not in SPECIALIZE_MODES:
        raise ValueError(f"opt_core.kernels.attention.WARP_SPECIALIZE must be one of {SPECIALIZE_MODES}, "
                         f"got {WARP_SPECIALIZE!r}")
    if not (tma and dispatch.tma_aligned(q)):
        return "off"
    if q.device.type == "cuda":
        _install_scratch_allocator()
    return WARP_SPECIALIZE


def _scratch(size: int, alignment: int, stream: Optional[int]) -> Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _install_scratch_allocator() -> None:
    """Descriptors built on the device (the specialised loop's q) live in global scratch memory that
    Triton allocates at launch through ``triton.set_allocator``: torch's allocator, unless the caller
    installed one (Triton keeps it per context)."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


# Whether the forward goes to the Gluon kernel (kernels/attention_gluon.py: FlashAttention-3's schedule on
# sm_90, fp16/bf16, head_dim 64, 80 (in chunks of 64 + 16, not padded) or 128, no padding mask or dropout)
# where it takes the launch: "off" | "on".  Off until a GPU run has passed its gpu tests and measured it
# faster.
GLUON = "off"
GLUON_MODES = ("off", "on")


def _gluon_takes(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], dropout_p: float) -> bool:
    """Whether this forward goes to the Gluon kernel: the switch is on, the tensors are CUDA ones and the
    kernel supports them."""
    if GLUON not in GLUON_MODES:
        raise ValueError(f"opt_core.kernels.attention.GLUON must be one of {GLUON_MODES}, got {GLUON!r}")
    if GLUON == "off" or not (q.is_cuda and k.is_cuda and v.is_cuda):
        return False
    from opt_core.kernels import attention_gluon  # here: a Triton without Gluon's Hopper modules still imports us

    return attention_gluon.supported(q, k, v, key_padding_mask, dropout_p)


# Where the backward goes to the Gluon kernel (kernels/attention_gluon_bwd.py: FlashAttention-3's five products
# on sm_90, fp16/bf16, head_dim 64, 80 or 128, no padding mask or dropout) where it takes the launch: "off" | "on"
# (GLUON_MODES).  Off until a GPU run has passed its gpu tests and measured it faster.
GLUON_BWD = "off"


def _gluon_bwd_takes(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, key_padding_mask: Optional[Tensor],
                     dropout_p: float, softmax_scale: float) -> bool:
    """Whether this backward goes to the Gluon kernel: the switch is on, the tensors are CUDA ones and the
    kernel supports them."""
    if GLUON_BWD not in GLUON_MODES:
        raise ValueError(f"opt_core.kernels.attention.GLUON_BWD must be one of {GLUON_MODES}, got {GLUON_BWD!r}")
    if GLUON_BWD == "off" or not all(t.is_cuda for t in (dout, q, k, v, lse)) or not lse.is_contiguous():
        return False
    from opt_core.kernels import attention_gluon_bwd  # here: a Triton without Gluon's Hopper modules still imports us

    return attention_gluon_bwd.supported(q, k, v, key_padding_mask, dropout_p, dout, softmax_scale)


# Where dQ comes from: False, its own kernel (Q K^T and dO V^T recomputed: 7 products); True, the dK/dV
# kernel adds it up (5 products) where its table has a shape (sm_90's TMA path; see _DKDV_FUSED_DQ_SHAPES),
# its own kernel elsewhere.
FUSED_DQ = False
DQ_STORE_ROWS = 64  # rows per program of the fused dQ's store (a [64, <=128] fp32 tile)


def fused_dq_shapes(head_dim: int, variant: str) -> list:
    """The dK/dV shapes with the fused dQ sm_90's TMA path keeps for 16-bit inputs at ``head_dim``."""
    return _DKDV_FUSED_DQ_SHAPES.kept(_table_key(dict(HEAD_DIM=head_dim)), variant, tma=True)


def _fused_dq(q: Tensor, flags: dict, tma: bool) -> bool:
    """Whether the dK/dV kernel adds up dQ for this launch: the switch is on and the fused table keeps a
    shape for its head-dim tile, variant and path (the interpreter, which runs any shape: fp16/bf16 up to
    head_dim 128)."""
    if not isinstance(FUSED_DQ, bool):
        raise TypeError(f"opt_core.kernels.attention.FUSED_DQ must be a bool, got {FUSED_DQ!r}")
    if not FUSED_DQ or q.dtype not in dispatch.TMA_DTYPES or block_d(flags["HEAD_DIM"]) > 128:
        return False
    if flags["SPLIT_MIN_ROWS"]:  # mma.sync (no TMA): DQ_ACC's columns are the split tiles', dq_acc_width
        return False
    return dispatch.INTERPRET or bool(_DKDV_FUSED_DQ_SHAPES.kept(_table_key(flags), _variant(flags), tma))


def _dropout_args(dropout_p, seed):
    """(dropout_p, dropout_scale, seed) as the kernels take them."""
    if dropout_p > 0:
        return dropout_p, 1.0 / (1.0 - dropout_p), seed
    return 0.0, 1.0, 0


def _launch_fwd(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], causal: bool,
                softmax_scale: float, dropout_p: float, seed: int,
                deterministic: bool = True) -> tuple[Tensor, Tensor]:
    """(out, lse): out (batch, seqlen_q, heads, head_dim); lse (batch, heads, seqlen_q) fp32, natural log,
    +inf on rows that see no key.  ``deterministic`` is the backward's (saved for it)."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    if _gluon_takes(q, k, v, key_padding_mask, dropout_p):
        from opt_core.kernels import attention_gluon

        return attention_gluon.attention_fwd(q, k, v, causal, softmax_scale)
    out = dispatch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)
    lse = dispatch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    if B * H * Sq == 0:
        return out, lse
    mask, stride_mb, stride_mn = _padding_mask_args(key_padding_mask, q)
    dropout_p, dropout_scale, seed = _dropout_args(dropout_p, seed)
    tma = _tma_usable(k, v)
    tile, tail = head_tiles(D)
    _fwd[lambda meta: (triton.cdiv(Sq, meta["BLOCK_M"]) * B * H,)](
        q, *_streamed(k, v, tma, tile, tail), mask, out, lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), stride_mb, stride_mn,
        H, Sq, Sk, _seqlen_bucket(Sq, Sk), softmax_scale * LOG2E, dropout_p, dropout_scale, seed,
        HEAD_DIM=D, CAUSAL=causal, HAS_KPM=key_padding_mask is not None, HAS_DROPOUT=dropout_p > 0,
        DOT_PRECISION=dot_precision(q.dtype), BLOCK_D=tile, HEAD_TAIL=tail,
        SPLIT_MIN_ROWS=split_min_rows(q.dtype, _arch(q)), TMA=tma, SPLIT_MASKED=split_masked("fwd", tma, _wgmma(q)),
        SPECIALIZE=_specialize_mode(q, tma),
    )
    return out, lse


def _launch_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                key_padding_mask: Optional[Tensor], causal: bool, softmax_scale: float, dropout_p: float,
                seed: int, deterministic: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv); bitwise repeatable but with FUSED_DQ and not ``deterministic`` (then dQ's fp32 parts
    are added in whatever order the key blocks finish)."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    dout, q, k, v, out = (_unit_last(t) for t in (dout, q, k, v, out))
    dq = dispatch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = dispatch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = dispatch.empty(v.shape, dtype=v.dtype, device=v.device)
    if B * H == 0:
        return dq, dk, dv
    if Sq == 0 or Sk == 0:  # nothing attends: every gradient is 0
        return dq.zero_(), dk.zero_(), dv.zero_()
    flags = dict(
        HEAD_DIM=D, CAUSAL=causal, HAS_KPM=key_padding_mask is not None, HAS_DROPOUT=dropout_p > 0,
        DOT_PRECISION=dot_precision(q.dtype), SPLIT_MIN_ROWS=split_min_rows(q.dtype, _arch(q)),
    )
    delta = dispatch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    _bwd_pre[lambda meta: (triton.cdiv(Sq, meta["BLOCK_M"]) * B * H,)](
        out, dout, delta, *_strides(out), *_strides(dout), H, Sq, HEAD_DIM=D, BLOCK_D=block_d(D),
    )
    if _gluon_bwd_takes(dout, q, k, v, lse, key_padding_mask, dropout_p, softmax_scale):
        from opt_core.kernels import attention_gluon_bwd

        return attention_gluon_bwd.attention_bwd(dout, q, k, v, lse, delta, causal, softmax_scale, deterministic)
    mask, stride_mb, stride_mn = _padding_mask_args(key_padding_mask, q)
    common = (H, Sq, Sk, _seqlen_bucket(Sq, Sk), softmax_scale, softmax_scale * LOG2E,
              *_dropout_args(dropout_p, seed))
    tma = _tma_usable(q, dout)  # the dK/dV kernel streams Q and dO
    fused = _fused_dq(q, flags, tma)
    # The fp32 sum of dQ and one lock per query block of the smallest BLOCK_M a dot allows (16), for any
    # config; the config's pre-hook zeroes both before each run.
    rows = triton.cdiv(Sq, DQ_ACC_ROW_BLOCK) * DQ_ACC_ROW_BLOCK
    tile, tail = head_tiles(D)
    acc_width = tile + tail  # columns of the fused dQ's sum, dq_acc_width (TMA only: never a padded tile)
    dq_acc = torch.empty((B * H, rows, acc_width), dtype=torch.float32, device=q.device) if fused else None
    locks = torch.empty((B * H * triton.cdiv(Sq, 16),), dtype=torch.int32, device=q.device) if fused else None
    q_in, dout_in, q_tail, dout_tail = _streamed(q, dout, tma, tile, tail)
    _bwd_dkdv[lambda meta: (triton.cdiv(Sk, meta["BLOCK_N"]) * B * H,)](
        q_in, k, v, q_tail, dout_tail, mask, dout_in, lse, delta, dk, dv, dq_acc, locks,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dk), *_strides(dv),
        stride_mb, stride_mn, *common, **flags, BLOCK_D=tile, HEAD_TAIL=tail, TMA=tma,
        SPLIT_MASKED=split_masked("dkdv", tma, _wgmma(q)),
        FUSED_DQ=fused, DETERMINISTIC=deterministic,
    )
    if fused:
        bwd_dq_store_kernel[(triton.cdiv(Sq, DQ_STORE_ROWS) * B * H,)](
            dq_acc, dq, *_strides(dq), H, Sq, softmax_scale, HEAD_DIM=D, BLOCK_M=DQ_STORE_ROWS, BLOCK_D=block_d(D),
            ACC_WIDTH=acc_width,
        )
        return dq, dk, dv
    tma = _tma_usable(k, v)  # the dQ kernel streams K and V
    _bwd_dq[lambda meta: (triton.cdiv(Sq, meta["BLOCK_M"]) * B * H,)](
        q, *_streamed(k, v, tma, tile, tail), mask, dout, lse, delta, dq,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dq),
        stride_mb, stride_mn, *common, **flags, BLOCK_D=tile, HEAD_TAIL=tail, TMA=tma,
        SPLIT_MASKED=split_masked("dq", tma, _wgmma(q)),
    )
    return dq, dk, dv


def _launch_dropout_mask(seed, dropout_p, batch, heads, seqlen_q, seqlen_k, device):
    keep = dispatch.empty((batch, heads, seqlen_q, seqlen_k), dtype=torch.int8, device=device)
    if keep.numel() == 0:
        return keep.bool()
    block = 32
    _dropout_mask_kernel[(batch * heads, triton.cdiv(seqlen_q, block), triton.cdiv(seqlen_k, block))](
        keep, seqlen_q, seqlen_k, dropout_p, seed, BLOCK_M=block, BLOCK_N=block,
    )
    return keep.bool()


# --------------------------------------------------------------------------- reference path
def _reference_dropout_mask(seed, dropout_p, batch, heads, seqlen_q, seqlen_k, device):
    # Where no kernel runs there is no Philox stream to match: the mask comes from
    # a torch.Generator seeded with `seed` (reproducible, but a different mask
    # from the kernels' for the same seed).
    g = torch.Generator().manual_seed(seed)
    return (torch.rand((batch, heads, seqlen_q, seqlen_k), generator=g) >= dropout_p).to(device)


def _reference_mask_for(q, k, dropout_p, seed):
    if dropout_p == 0:
        return None
    B, Sq, H, _ = q.shape
    return _reference_dropout_mask(seed, dropout_p, B, H, Sq, k.shape[1], q.device)


def _reference_fwd(q, k, v, key_padding_mask, causal, softmax_scale, dropout_p, seed, deterministic=True):
    keep = _reference_mask_for(q, k, dropout_p, seed)
    out = reference.attention(q, k, v, causal, softmax_scale, key_padding_mask, keep, dropout_p)
    lse = reference.attention_lse(q, k, causal, softmax_scale, key_padding_mask)
    return out.contiguous(), lse.float().contiguous()


def _reference_bwd(dout, q, k, v, out, lse, key_padding_mask, causal, softmax_scale, dropout_p, seed,
                   deterministic=True):
    # Differentiates the reference forward again: the saved out and lse go unread.
    keep = _reference_mask_for(q, k, dropout_p, seed)

    def fn(q_, k_, v_):
        return reference.attention(q_, k_, v_, causal, softmax_scale, key_padding_mask, keep, dropout_p)

    dq, dk, dv = dispatch.reference_vjp(fn, (q, k, v), dout)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


# --------------------------------------------------------------------------- torch.library ops
def _fwd_fake(q, k, v, key_padding_mask, causal, softmax_scale, dropout_p, seed, deterministic=True):
    B, Sq, H, D = q.shape
    return q.new_empty((B, Sq, H, D)), q.new_empty((B, H, Sq), dtype=torch.float32)


def _bwd_fake(dout, q, k, v, out, lse, key_padding_mask, causal, softmax_scale, dropout_p, seed, deterministic=True):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, *args = inputs  # causal, softmax_scale, dropout_p, seed, deterministic
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
    ctx.args = tuple(args)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = torch.ops.opt_core.attention_bwd(dout, q, k, v, out, lse, key_padding_mask, *ctx.args)
    return (dq, dk, dv) + (None,) * (1 + len(ctx.args))


register_op("attention", dtypes=KERNEL_DTYPES, setup_context=_setup_context, gradients=_backward,
            forward=Direction(_launch_fwd, _reference_fwd, _fwd_fake, chosen_by="q"),
            backward=Direction(_launch_bwd, _reference_bwd, _bwd_fake, chosen_by="q"))


# --------------------------------------------------------------------------- public API
def _check_qkv(q, k, v):
    """q, k, v are 4-D tensors of q's dtype, k and v (batch, seqlen_k, heads, head_dim) with q's batch,
    heads and head_dim, and head_dim is one the kernels take."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dimensions (batch, seqlen, heads, head_dim), got shape {tuple(t.shape)}"
            )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
    B, _, H, D = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, H, D):
        raise ValueError(
            f"k must have shape (batch, seqlen_k, heads, head_dim) = ({B}, seqlen_k, {H}, {D}) to match q, "
            f"got {tuple(k.shape)}"
        )
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim (q.shape[3]) must be between 1 and {MAX_HEAD_DIM}, got {D}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    deterministic: bool = True,
) -> torch.Tensor:
    """softmax(q k^T * softmax_scale, masked) v for each batch and head.

    q: (batch, seqlen_q, heads, head_dim); k, v: (batch, seqlen_k, heads,
    head_dim); same dtype and device.  Any strides (only a non-unit head_dim
    stride costs a copy).  Returns (batch, seqlen_q, heads, head_dim).

    - ``causal``: query i sees key j iff j <= i + seqlen_k - seqlen_q (aligned at
      the bottom-right, as FlashAttention >= 2.1).
    - ``softmax_scale``: default ``head_dim ** -0.5``.
    - ``key_padding_mask``: bool (batch, seqlen_k), True where the key is real.
      A query that sees no key (every key padded, or causal with seqlen_q >
      seqlen_k) outputs exactly 0 and gets 0 gradients.  With left padding and
      causal, the padded queries see only padded keys, so they output 0; with
      right padding they attend to the real keys before them.
    - ``dropout_p``: attention dropout on the probabilities, kept ones scaled
      by 1/(1-p).  The mask is a counter-based Philox draw from ``seed`` and each
      element's index (see ``dropout_mask``), regenerated in the backward, never
      stored.  Without ``seed`` one is drawn from torch's CPU generator, so
      ``torch.manual_seed`` reproduces a run.  (Drawing it is a ``.item()``: under
      ``torch.compile`` pass ``seed`` or expect a graph break when dropout_p > 0.)
    - ``deterministic``: True keeps the backward bitwise repeatable; False lets
      ``FUSED_DQ``'s dK/dV kernel add dQ's fp32 parts in any order (elsewhere
      the backward has no atomics and the flag changes nothing).

    fp16/bf16 run the Triton kernels with fp32 accumulation and softmax
    statistics; fp32 runs them with exact (not TF32) fp32 products; fp64 runs
    ``opt_core.kernels.reference.attention``.  CPU tensors without the interpreter
    run ``kernels/native.py`` (SDPA, plain autograd; dropout there is torch's own,
    ``seed`` unused).
    head_dim may be 1 to 256 (tiles are padded to a power of two).

    NaN: a NaN in q row i gives a NaN output row i; a NaN in k or v at key j
    gives NaN in every row that sees key j.  A NaN in v may also reach other
    rows of the same (batch, head) that share a tile with key j (0 * NaN).
    PyTorch's math SDPA differs in two ways: a NaN in k or v reaches every row
    of the (batch, head), seen or not, and a row that sees no key becomes NaN
    if its q is NaN; here such a row stays 0.
    """
    softmax_scale, dropout_p = _checked_arguments(q, k, v, causal, softmax_scale, key_padding_mask, dropout_p, seed,
                                                  deterministic)
    if dispatch.use_native(q, KERNEL_DTYPES):
        return native.attention(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                key_padding_mask=key_padding_mask, dropout_p=dropout_p)
    if dropout_p == 0.0:
        seed = 0
    elif seed is None:
        seed = int(torch.randint(0, SEED_LIMIT - 1, (1,)).item())

    out, _ = torch.ops.opt_core.attention_fwd(q, k, v, key_padding_mask, causal, softmax_scale, dropout_p, seed,
                                              deterministic)
    return out


def _checked_arguments(q, k, v, causal, softmax_scale, key_padding_mask, dropout_p, seed,
                       deterministic) -> tuple[float, float]:
    """``attention``'s arguments checked (errors naming the argument); (softmax_scale, dropout_p) as floats,
    the scale's default resolved."""
    _check_qkv(q, k, v)
    check_same_device("q", q, k=k, v=v, key_padding_mask=key_padding_mask)
    B, _, _, D = q.shape
    Sk = k.shape[1]
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    softmax_scale = check_float("softmax_scale", D ** -0.5 if softmax_scale is None else softmax_scale,
                                min_value=0.0)
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, dtypes=(torch.bool,))
        if tuple(key_padding_mask.shape) != (B, Sk):
            raise ValueError(
                f"key_padding_mask must have shape (batch, seqlen_k) = ({B}, {Sk}), "
                f"got {tuple(key_padding_mask.shape)}"
            )
    dropout_p = check_dropout("dropout_p", dropout_p)
    if seed is not None:
        check_seed("seed", seed)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    return softmax_scale, dropout_p


def dropout_mask(
    seed: int,
    dropout_p: float,
    batch: int,
    heads: int,
    seqlen_q: int,
    seqlen_k: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """The keep-mask (bool, (batch, heads, seqlen_q, seqlen_k)) that ``attention``
    applies with this ``seed`` and ``dropout_p`` to inputs of ``dtype`` on
    ``device``: the kernels' Philox draw where the kernels run, the reference
    path's generator elsewhere.  For tests; attention itself never builds it."""
    check_seed("seed", seed)
    dropout_p = check_dropout("dropout_p", dropout_p)
    for name, n in (("batch", batch), ("heads", heads), ("seqlen_q", seqlen_q), ("seqlen_k", seqlen_k)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    device = torch.device(device)
    probe = torch.empty(0, dtype=dtype, device=device)
    if dispatch.use_triton(probe, KERNEL_DTYPES):
        with dispatch.device_guard(probe):
            return _launch_dropout_mask(seed, dropout_p, batch, heads, seqlen_q, seqlen_k, device)
    return _reference_dropout_mask(seed, dropout_p, batch, heads, seqlen_q, seqlen_k, device)
