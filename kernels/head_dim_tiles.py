"""The column tiles the attention kernels hold a head_dim wide row in, one rule for the Triton kernels
(``attention``) and the Gluon ones (``attention_gluon``, ``attention_gluon_bwd``)."""

from __future__ import annotations

import triton


def block_d(head_dim):
    """The power-of-two width (at least 16) of one tile over all head_dim columns: what the configs are
    chosen for (attention._table_key), and the tile of the kernels where head_dim does not split (head_tiles)."""
    return max(16, triton.next_power_of_2(head_dim))


MIN_TILE = 16  # the narrowest tile: K of one 16-bit mma / wgmma step


def head_tiles(head_dim: int) -> tuple[int, int]:
    """(BLOCK_D, HEAD_TAIL): the column tiles a head_dim wide row is held in.  Where head_dim is a power of
    two plus a power-of-two rest of at least MIN_TILE (80 = 64 + 16, 96 = 64 + 32), two tiles, columns
    [0, BLOCK_D) and [BLOCK_D, head_dim), and no product runs on padding; otherwise one tile of block_d
    columns, those past head_dim masked (111 on a 128-wide tile), and HEAD_TAIL 0."""
    main = 1 << (head_dim.bit_length() - 1)
    tail = head_dim - main
    if tail >= MIN_TILE and tail & (tail - 1) == 0:
        return main, tail
    return block_d(head_dim), 0
