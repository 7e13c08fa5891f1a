"""The native path: each op as plain PyTorch with plain autograd, where no Triton kernel runs.

A CPU run without ``TRITON_INTERPRET`` takes this path (``dispatch.use_native`` decides), so the
tiny CPU demo trains on PyTorch's own fast operators instead of the float64 oracle in
``kernels/reference.py``: no custom op, no recomputed forward in the backward, no Philox bits.

- attention: ``F.scaled_dot_product_attention`` with ``is_causal`` when the causal mask is the
  square one and nothing is padded (the CPU's flash kernel), else with a boolean mask built from
  causal (bottom-right aligned, as the kernels) and the key padding, on SDPA's math backend (the
  flash kernel's masked backward measured up to 4x plain PyTorch's error, over the numerics rule).
  A query row that sees no key gets 0 (gradient 0), as the kernels give: SDPA would give NaN or
  garbage there, so such rows are let see every key and then replaced by 0 with ``torch.where``.
- layer_norm: ``F.layer_norm`` of ``x + residual`` (h rounded to x's dtype, as the kernels); width 1
  directly (y = bias), as ``F.layer_norm``'s backward rounds the exactly-zero dx and dw to 1e-5 there.
- relu_mlp: ``F.linear``, ReLU, ``F.linear``, ``dropout``, the residual added last.  Out of place:
  an in-place op on a linear's (viewed) output costs autograd a CopySlices copy in the backward.
- dropout: the keep-mask from 15 random bits per element (lanes of ``random_`` on int64: a sixth of
  ``bernoulli_``'s time on the CPU; the realised p within 2**-16 of p), kept values scaled by ``1 / (1 - p)``;
  ``F.dropout`` on a GPU (one fused kernel) and under ``torch.compile`` (Dynamo does not trace
  ``random_``; Inductor fuses dropout), so compiled and eager runs draw different masks.
- linear_cross_entropy: the LM head and the mean cross entropy in chunks of rows, the gradients computed
  in the forward while each chunk's logits are in cache; the (tokens, vocab) logits never exist.

Dropout draws from torch's generator (``random_`` here, SDPA's ``dropout_p`` in attention), so
``torch.manual_seed`` reproduces a run and a saved RNG state resumes it; the ops' ``seed`` argument
(the kernels' Philox key) is not used here.  Everything runs in the input dtype; fp16/bf16
reductions accumulate in fp32 inside PyTorch's CPU kernels.  Nothing reads device data on the host:
attention, layer_norm and relu_mlp compile with ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import contextlib
import math

from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, softmax_scale: float,
              key_padding_mask: Optional[torch.Tensor], dropout_p: float) -> torch.Tensor:
    """(batch, seqlen_q, heads, head_dim) attention output; arguments as ``kernels.attention.attention``
    after its checks (``softmax_scale`` resolved, ``key_padding_mask`` bool or None)."""
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    if causal and seqlen_q == 1:
        causal = False  # bottom-right aligned, the one query sees every key
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if seqlen_k == 0:
        # No key at all: zeros, with zero gradients (where() passes none to q).
        return torch.where(torch.zeros((), dtype=torch.bool, device=q.device), q, 0.0)
    if key_padding_mask is None and (not causal or seqlen_q == seqlen_k):
        out = F.scaled_dot_product_attention(qt, kt, vt, dropout_p=dropout_p, is_causal=causal, scale=softmax_scale)
        return out.transpose(1, 2)
    visible = _visible_keys(q.device, seqlen_q, seqlen_k, causal, key_padding_mask)
    sees_a_key = visible.any(dim=-1, keepdim=True)
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=visible | ~sees_a_key, dropout_p=dropout_p,
                                             scale=softmax_scale)
    return torch.where(sees_a_key, out, 0.0).transpose(1, 2)


def _visible_keys(device: torch.device, seqlen_q: int, seqlen_k: int, causal: bool,
                  key_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Bool (batch or 1, 1, seqlen_q, seqlen_k): True where query i may see key j."""
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if causal:  # query i sees key j iff j <= i + seqlen_k - seqlen_q
        visible = visible.tril(seqlen_k - seqlen_q)
    visible = visible[None, None]
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    return visible


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
               residual: Optional[torch.Tensor]):
    """``layer_norm(x)``, or ``(layer_norm(x + residual), x + residual)`` with a residual."""
    h = x if residual is None else x + residual
    if h.shape[-1] == 1:  # h - mean(h) is 0: y is the bias (NaN and inf still propagate through h - h)
        y = (h - h) * (weight if weight is not None else 1.0) + (bias if bias is not None else 0.0)
    else:
        y = F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
    return y if residual is None else (y, h)


def relu_mlp(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor], fc2_weight: torch.Tensor,
             fc2_bias: Optional[torch.Tensor], *, residual: Optional[torch.Tensor], dropout_p: float) -> torch.Tensor:
    """``residual + dropout(fc2(relu(fc1(x))))``; ``dropout_p`` is 0 outside training."""
    with _scope("opt_core::relu_mlp_native"):
        out = F.linear(torch.relu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)
        out = dropout(out, dropout_p)
        return out if residual is None else out + residual


def _scope(name: str):
    """A profiler range naming the op (``bench.profile`` reads it: its two linears are the MLP's GEMMs,
    not "other GEMMs", and their backward nodes follow them there); nothing under ``torch.compile``."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else torch.profiler.record_function(name)


# The keep-mask's random numbers: 15-bit lanes of 63-bit draws.  ``random_`` on int64 fills [0, 2**63) from
# one generator call per word, so four int16 lanes per word cost about 0.4x of ``random_`` on int32 per
# element; each lane's low 15 bits are uniform (the top lane's sign bit is always 0, so it is masked off).
_RANDOM_BITS = 15
_LANE_MASK = (1 << _RANDOM_BITS) - 1


def _random_lanes(shape, device) -> torch.Tensor:
    """Uniform integers in [0, 2**15), int16, of ``shape``, from torch's generator."""
    n = math.prod(shape)
    words = torch.empty(((n + 3) // 4,), dtype=torch.int64, device=device).random_()
    return words.view(torch.int16)[:n].view(shape) & _LANE_MASK


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """``x`` with each element zeroed with probability ``p`` (to 2**-16) and the rest scaled by
    ``1 / (1 - p)``; ``x`` itself for ``p == 0``."""
    if p == 0.0:
        return x
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.dropout(x, p, training=True)  # CUDA's is one fused kernel
    # Dropped below round(p * 2**15): the realised p is within 2**-16 of p; kept values are scaled by
    # 1 / (1 - p), as F.dropout scales them (the expectation is then x to 2**-16 / (1 - p)).
    keep = _random_lanes(x.shape, x.device) >= round(p * 2**_RANDOM_BITS)
    # bool -> x.dtype through uint8 (the same bytes): torch's bool conversions and bool * float are
    # scalar loops on the CPU, 5x and 30x this.
    return x * keep.view(torch.uint8).to(x.dtype).mul_(1.0 / (1.0 - p))


# Logits per chunk in linear_cross_entropy: on the CPU about 8 MiB of fp32, which stay in cache (measured
# best of 64 ... 2048 rows at vocabulary 4096); elsewhere 512 MiB, few enough chunks to keep a GPU busy.
CPU_CHUNK_LOGITS = 2**21
GPU_CHUNK_LOGITS = 2**27


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         ignore_index: int = -100) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight).float(), target, ignore_index=ignore_index)`` (the mean
    over the targets that are not ``ignore_index``; NaN when there are none, as torch's) without the
    (tokens, vocab) logits: hidden (tokens, d), weight (vocab, d) of hidden's dtype, target (tokens,) int64."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (tokens, d) and weight (vocab, d) must share d, got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if target.shape != hidden.shape[:1]:
        raise ValueError(f"target must have shape ({hidden.shape[0]},), got {tuple(target.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, target, ignore_index)
    total, count = _chunked_cross_entropy(hidden, weight, target, ignore_index, grads=None)
    return total / count


def _chunked_cross_entropy(hidden, weight, target, ignore_index, grads):
    """(sum of the token losses, number of targets), fp32; with ``grads = (d_hidden, d_weight)`` (d_weight
    an fp32 buffer of zeros) also the gradients of their quotient, the mean, written into them."""
    valid = target != ignore_index
    count = valid.sum().to(torch.float32)
    rows = max(1, (CPU_CHUNK_LOGITS if hidden.device.type == "cpu" else GPU_CHUNK_LOGITS) // weight.shape[0])
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], rows):
        h, ok = hidden[start:start + rows], valid[start:start + rows]
        t = target[start:start + rows].masked_fill(~ok, 0)[:, None]  # ignored rows: any class, weight 0
        logits = F.linear(h, weight).float()
        # The log-sum-exp in four passes over the chunk (two in place), leaving exp(logits - max) behind.
        top = logits.amax(dim=-1, keepdim=True)
        picked = logits.gather(1, t)
        exp = logits.sub_(top).exp_()
        sum_exp = exp.sum(dim=-1, keepdim=True)
        total += ((top + sum_exp.log() - picked)[:, 0] * ok).sum()
        if grads is None:
            continue
        # d mean / d logits = (softmax - one_hot) * valid / count = (exp - sum_exp * one_hot) * factor:
        # the per-row factor goes on the narrow operands (h, and the GEMM's output), not the chunk.
        d_logits = exp.scatter_add_(1, t, -sum_exp).to(weight.dtype)
        factor = ok[:, None] / (count * sum_exp)
        d_h = grads[0][start:start + rows]
        torch.mm(d_logits, weight, out=d_h)
        d_h *= factor.to(d_h.dtype)
        scaled = h * factor.to(h.dtype)
        if grads[1].dtype == d_logits.dtype:
            grads[1].addmm_(d_logits.t(), scaled)
        else:  # the GEMM in the weight's dtype (a GPU's tensor cores), summed over the chunks in fp32
            grads[1].add_(d_logits.t() @ scaled)
    return total, count


class _LinearCrossEntropy(torch.autograd.Function):
    """The loss and, in the same pass, its gradients; the backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, target, ignore_index):
        d_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format)
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total, count = _chunked_cross_entropy(hidden, weight, target, ignore_index, grads=(d_hidden, d_weight))
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad):
        d_hidden, d_weight = ctx.saved_tensors
        return d_hidden * grad.to(d_hidden.dtype), (d_weight * grad).to(ctx.weight_dtype), None, None
