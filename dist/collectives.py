"""Megatron's four tensor-parallel mappings and the data-parallel loss reduction, as autograd functions.

Each mapping is one explicit collective in the forward and its adjoint in the
backward, over a process group handed in (the mesh's "tp" or "dp" group):

=====================  ==========================  ==========================
function               forward                     backward
=====================  ==========================  ==========================
``copy_to_tp``         identity                    all-reduce (sum)
``reduce_from_tp``     all-reduce (sum)            identity
``gather_from_sp``     all-gather along dim 0      reduce-scatter along dim 0
``scatter_to_sp``      reduce-scatter along dim 0  all-gather along dim 0
``reduce_grad_of``     identity                    all-reduce (sum), in fp32
``global_mean_loss``   all-reduce(sum) / count     grad x dp / count
=====================  ==========================  ==========================

Sequence-parallel tensors are 2-D ``(tokens, features)`` with the tokens
(batch x sequence, row-major) split into equal contiguous blocks along dim 0,
so every collective works on contiguous dim-0 slices and never copies to
re-layout; callers pad the token count to a multiple of the group size.

Collectives are synchronous c10d calls on fresh buffers: an autograd input or
an upstream gradient can be aliased elsewhere (an expanded ``.sum()``
gradient, a tensor another node saved), so nothing is reduced in place.
"""

from __future__ import annotations

import torch
import torch.distributed as c10d
from torch.autograd import Function

# torch 2.13 renamed the single-tensor collectives; the GPU machine runs 2.11.
_all_gather_base = getattr(c10d, "all_gather_single", None) or c10d.all_gather_into_tensor
_reduce_scatter_base = getattr(c10d, "reduce_scatter_single", None) or c10d.reduce_scatter_tensor

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def all_reduce(x: torch.Tensor, group, op=c10d.ReduceOp.SUM) -> torch.Tensor:
    """A reduced copy of ``x`` (``x`` itself is left alone)."""
    out = torch.clone(x, memory_format=torch.contiguous_format)
    if c10d.get_world_size(group) > 1:
        c10d.all_reduce(out, op=op, group=group)
    return out


def all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """The group's ``x`` blocks stacked along dim 0 in rank order."""
    world = c10d.get_world_size(group)
    if world == 1:
        return x
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    _all_gather_base(out, x.contiguous(), group=group)
    return out


def reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    """Block ``rank`` (along dim 0) of the group's sum of ``x``."""
    world = c10d.get_world_size(group)
    if world == 1:
        return x
    if x.shape[0] % world:
        raise ValueError(f"reduce_scatter: dim 0 ({x.shape[0]}) must be a multiple of the group size ({world})")
    out = x.new_empty((x.shape[0] // world, *x.shape[1:]))
    _reduce_scatter_base(out, x.contiguous(), op=c10d.ReduceOp.SUM, group=group)
    return out


class _CopyToTP(Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad, ctx.group), None


class _ReduceFromTP(Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromSP(Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter(grad, ctx.group), None


class _ScatterToSP(Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.group), None


class _ReduceGradOf(Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        # Parameter gradients: sum the partials in fp32 and round once, as FSDP's
        # reduce_dtype does for the data-parallel reduction.
        if grad.dtype in _LOW_PRECISION:
            return all_reduce(grad.float(), ctx.group).to(grad.dtype), None
        return all_reduce(grad, ctx.group), None


class _GlobalMeanLoss(Function):
    @staticmethod
    def forward(ctx, local_sum, count, group):
        # count stays a tensor: no host sync in the forward.
        ctx.scale = c10d.get_world_size(group) / count
        return all_reduce(local_sum.detach(), group) / count

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None, None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Enter a tensor-parallel region with a replicated input: its gradient (partial on each rank) is summed."""
    return _CopyToTP.apply(x, group) if c10d.get_world_size(group) > 1 else x


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Leave a tensor-parallel region: sum the ranks' partial outputs."""
    return _ReduceFromTP.apply(x, group) if c10d.get_world_size(group) > 1 else x


def gather_from_sp(x: torch.Tensor, group) -> torch.Tensor:
    """Sequence-parallel block -> all tokens (dim 0); the backward reduce-scatters the partial gradient."""
    return _GatherFromSP.apply(x, group) if c10d.get_world_size(group) > 1 else x


def scatter_to_sp(x: torch.Tensor, group) -> torch.Tensor:
    """Partial outputs over all tokens -> this rank's block of their sum (dim 0)."""
    return _ScatterToSP.apply(x, group) if c10d.get_world_size(group) > 1 else x


def reduce_grad_of(param: torch.Tensor, group) -> torch.Tensor:
    """A replicated parameter used on this rank's tokens only: its gradient is summed over ``group``."""
    return _ReduceGradOf.apply(param, group) if c10d.get_world_size(group) > 1 else param


def global_mean_loss(local_sum: torch.Tensor, count: torch.Tensor, group) -> torch.Tensor:
    """(sum over ``group`` of ``local_sum``) / ``count``, the same value on every rank.

    ``count`` (a tensor, already summed over ``group``) is the number of terms.

    Each rank back-propagates only its own term, scaled by the group size:
    FSDP averages gradients over the data-parallel group, so the result is the
    gradient of the global mean, also when ranks hold different numbers of
    target tokens (padding, ignored labels).
    """
    return _GlobalMeanLoss.apply(local_sum, count.to(local_sum.dtype), group)
