"""Building blocks the Gluon kernels for sm_90 share (``attention_gluon``, ``attention_gluon_bwd``,
``relu_mlp_gluon``): the wgmma accumulator layout of one warpgroup, mbarrier arrays, a ring slot's
wait and release, and the Gluon element type of a 16-bit torch dtype."""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier


@gluon.constexpr_function
def mma_layout(n):
    """wgmma accumulator layout of one warpgroup's [rows, n] tile (four warps stacked along the rows: 64
    rows an m64 product, 128 rows two)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])


@gluon.jit
def barriers(count: gl.constexpr, arrivals: gl.constexpr):
    """``count`` mbarriers in shared memory, each completing a phase on ``arrivals`` arrivals."""
    bars = gl.allocate_shared_memory(gl.int64, [count, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(count):
        mbarrier.init(bars.index(i), count=arrivals)
    return bars


@gluon.jit
def release(empty):
    """This warpgroup is done with a ring slot.  One thread arrives: every warp of the warpgroup must have
    passed its wgmma wait first (a warp's wait covers its own part of the product)."""
    gl.thread_barrier()
    mbarrier.arrive(empty)


@gluon.jit
def wait_ready(bar, n, NUM_STAGES: gl.constexpr):
    """Until the n-th fill of a ``NUM_STAGES``-slot ring (slot n % NUM_STAGES, lap n // NUM_STAGES) has
    arrived."""
    mbarrier.wait(bar.index(n % NUM_STAGES), (n // NUM_STAGES) & 1)


def gl_dtype(dtype: torch.dtype):
    """The Gluon element type of a 16-bit torch dtype (the kernels take fp16 and bf16 only)."""
    return gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
