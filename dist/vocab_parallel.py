"""Vocabulary-parallel embedding lookup and cross entropy (Megatron's, as OPT trained with).

The token embedding (tied to the LM head) is split by rows over the tensor
parallel group: rank ``r`` holds vocabulary ids ``[r * V/tp, (r + 1) * V/tp)``.

- Lookup: each rank embeds the ids in its range and writes zeros elsewhere;
  the sum over ranks (an all-reduce, or a reduce-scatter to sequence shards,
  done by the caller) is the full embedding.
- Cross entropy over logits that stay split by vocabulary: the row maximum,
  the sum of exponentials and the target's logit are each reduced over the
  group (a MAX, then one SUM of two numbers per token); the logits are never
  gathered, and the backward, ``softmax - one_hot`` on the local slice, needs
  no communication at all.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as c10d
import torch.nn.functional as F
from torch.autograd import Function


def vocab_range(vocab_size: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of the vocabulary rows rank ``rank`` of ``world`` holds (``vocab_size % world == 0``)."""
    if vocab_size % world:
        raise ValueError(f"vocab_size ({vocab_size}) must be divisible by the tensor-parallel size ({world})")
    per = vocab_size // world
    return rank * per, (rank + 1) * per


def vocab_parallel_embedding(ids: torch.Tensor, weight: torch.Tensor, vocab_start: int,
                             padding_idx: Optional[int] = None) -> torch.Tensor:
    """This rank's partial embedding of ``ids``: rows of ``weight`` (ids ``vocab_start ...``) or zeros.

    ``padding_idx`` is the global id whose row gets no gradient from the
    lookup (``nn.Embedding``'s ``padding_idx``); it applies on the rank that
    holds it.  The caller sums the partials over the group.
    """
    vocab_end = vocab_start + weight.shape[0]
    outside = (ids < vocab_start) | (ids >= vocab_end)
    local = (ids - vocab_start).masked_fill(outside, 0)
    local_pad = padding_idx - vocab_start if padding_idx is not None and vocab_start <= padding_idx < vocab_end \
        else None
    out = F.embedding(local, weight, padding_idx=local_pad)
    # masked_fill's backward zeros these rows' gradient, so row 0 of the shard
    # (where outside ids were pointed) only learns from its own tokens.
    return out.masked_fill(outside.unsqueeze(-1), 0.0)


class _VocabParallelCrossEntropy(Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, group, ignore_index):
        v_local = logits.shape[-1]
        x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()  # fp16/bf16: fp32 math
        # The row maximum is a constant shift for the softmax: no gradient flows through it.
        row_max = x.max(dim=-1).values
        if c10d.get_world_size(group) > 1:
            c10d.all_reduce(row_max, op=c10d.ReduceOp.MAX, group=group)
        shifted = x - row_max.unsqueeze(-1)

        valid = target != ignore_index
        local_target = target - vocab_start
        mine = valid & (local_target >= 0) & (local_target < v_local)
        index = local_target.masked_fill(~mine, 0)
        target_logit = shifted.gather(-1, index.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)
        exp = shifted.exp()
        # One SUM for both per-token numbers: the target's logit (found on one rank) and sum(exp).
        reduced = torch.stack([target_logit, exp.sum(dim=-1)])
        if c10d.get_world_size(group) > 1:
            c10d.all_reduce(reduced, group=group)
        target_logit, sum_exp = reduced
        loss = (torch.log(sum_exp) - target_logit).masked_fill(~valid, 0.0)

        exp.div_(sum_exp.unsqueeze(-1))  # the softmax, saved for the backward in the buffer exp had
        ctx.save_for_backward(exp, index, mine, valid)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, index, mine, valid = ctx.saved_tensors
        # d loss_i / d logit_ij = softmax_ij - [j == target_i], on the local slice.  Out of place:
        # the saved softmax stays valid for a second backward (retain_graph=True).
        scale = grad_loss.to(softmax.dtype) * valid
        grad = softmax * scale.unsqueeze(-1)
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, index] -= scale * mine
        return grad.to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_start: int, group,
                                 ignore_index: int = -100, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Per-token cross entropy (fp32, fp64 for fp64 logits; 0 where ``target == ignore_index``) from
    vocabulary-split logits.

    ``logits`` ``(tokens, V/tp)``: this rank's vocabulary slice starting at
    ``vocab_start``; ``target`` ``(tokens,)`` global ids, the same on every rank
    of ``group``.  Equals ``F.cross_entropy(full_logits, target,
    reduction="none")`` without ever forming ``full_logits``.  With
    ``vocab_size``, a target outside ``[0, vocab_size)`` (other than
    ``ignore_index``) fails a device-side check instead of giving a loss
    computed without its logit.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (tokens, vocab_slice), got shape {tuple(logits.shape)}")
    if target.shape != logits.shape[:1]:
        raise ValueError(f"target must have shape {tuple(logits.shape[:1])}, got {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be int64 or int32 token ids, got {target.dtype}")
    if vocab_size is not None:
        ok = (target == ignore_index) | ((target >= 0) & (target < vocab_size))
        torch._assert_async(ok.all(), f"cross entropy target out of range [0, {vocab_size})")
    return _VocabParallelCrossEntropy.apply(logits, target.long(), vocab_start, group, ignore_index)
