"""nn.Modules over ``opt_core.functional``: drop-in replacements for their torch.nn twins.

Each module has one forward.  The places where tensor parallelism needs a collective go through the
module's ``parallelism`` (``opt_core.parallelism.Parallelism``: on one process every seam is the plain
computation); ``opt_core.dist.parallelize`` attaches its tensor-parallel subclass to the modules instead.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from opt_core.functional import attention, layer_norm, relu_mlp
from opt_core.kernels.validation import check_dropout, check_positive_int
from opt_core.kv_cache import LayerKVCache
from opt_core.parallelism import ONE_PROCESS, Parallelism

class FusedLayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` computed by the Triton kernels.

    A subclass, so the constructor, attributes, parameter names, ``state_dict``
    keys, ``reset_parameters`` and ``extra_repr`` are LayerNorm's own: it loads a
    LayerNorm's weights and replaces it anywhere (``isinstance`` included).
    ``forward(x, residual)`` additionally returns ``(layer_norm(x + residual),
    x + residual)`` from one pass, for pre-LN blocks.

    One difference under ``torch.autocast``: ``nn.LayerNorm`` is autocast to
    fp32 and returns fp32; this one computes its statistics in fp32 as well but
    returns the input's dtype (half the activation memory, as apex's does).
    """

    parallelism: Parallelism = ONE_PROCESS

    def __init__(self, normalized_shape, *args, **kwargs):
        super().__init__(normalized_shape, *args, **kwargs)
        # nn.LayerNorm(0) builds, and fails only at the first forward: refuse it here, where it was written.
        if not self.normalized_shape or min(self.normalized_shape) < 1:
            raise ValueError(f"normalized_shape must be one or more sizes >= 1, got {list(self.normalized_shape)}")

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None):
        shape = tuple(self.normalized_shape)
        if tuple(input.shape[input.dim() - len(shape):]) != shape or input.dim() < len(shape):
            raise ValueError(
                f"input must end with normalized_shape {list(shape)}, got shape {list(input.shape)}"
            )
        weight, bias = self.parallelism.replicated(self.weight), self.parallelism.replicated(self.bias)
        if len(shape) == 1:
            return layer_norm(input, weight, bias, self.eps, residual)
        # Several normalised dims: flatten them into one row, as LayerNorm's maths does.
        n = math.prod(shape)
        flat = input.shape[: input.dim() - len(shape)] + (n,)
        weight = weight.reshape(n) if weight is not None else None
        bias = bias.reshape(n) if bias is not None else None
        res = residual.reshape(flat) if residual is not None else None
        out = layer_norm(input.reshape(flat), weight, bias, self.eps, res)
        if residual is None:
            return out.view(input.shape)
        return out[0].view(input.shape), out[1].view(input.shape)


def linear_relu_mlp(fc1: nn.Linear, fc2: nn.Linear, x: torch.Tensor, residual: Optional[torch.Tensor], *,
                    dropout_p: float, training: bool, run=None) -> torch.Tensor:
    """``residual + dropout(fc2(relu(fc1(x))))`` over two ``nn.Linear`` by ``run`` (a parallel seam with
    the fused op's signature; the fused op itself by default).  Under ``torch.autocast`` the input and weights are cast to the
    autocast dtype (what ``nn.Linear`` would compute in), and a residual of another dtype (an fp32
    residual stream) is added outside the kernel, so the sum keeps its precision."""
    params = (fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    add_outside = None
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x = x.to(dtype)
        params = tuple(p.to(dtype) if p is not None else None for p in params)
        if residual is not None and residual.dtype != dtype:
            add_outside, residual = residual, None
    # `run is None`, not `run or ...`: torch 2.11's Dynamo (the GPU machine's) cannot take a bound method's truth
    # value (a graph break under fullgraph=True).
    out = (relu_mlp if run is None else run)(x, *params, residual=residual, dropout_p=dropout_p, training=training)
    return out if add_outside is None else add_outside + out


class ReLUMLP(nn.Module):
    """OPT's feed-forward block, ``residual + dropout(fc2(relu(fc1(x))))``, computed
    by ``kernels.relu_mlp`` (two Triton GEMMs with everything else in their epilogues).

    ``fc1`` and ``fc2`` are ``nn.Linear`` submodules, so the state-dict keys are
    Hugging Face ``OPTDecoderLayer``'s (``fc1.weight``, ``fc1.bias``,
    ``fc2.weight``, ``fc2.bias``) and its weights load directly.  Dropout
    applies only in training.  ``forward(x, residual=None)`` adds ``residual``
    inside GEMM 2's epilogue.

    Under ``torch.autocast`` the input and parameters are cast to the autocast
    dtype, as ``nn.Linear`` would be; a residual of another dtype (an fp32
    residual stream) is then added outside the kernel, so the sum keeps the
    residual's precision as the unfused block's would.
    """

    parallelism: Parallelism = ONE_PROCESS

    def __init__(self, embed_dim: int, ffn_dim: int, *, dropout: float = 0.1, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        check_positive_int("embed_dim", embed_dim)
        check_positive_int("ffn_dim", ffn_dim)
        self.embed_dim = embed_dim
        self.ffn_dim = ffn_dim
        self.dropout = check_dropout("dropout", dropout)
        self.fc1 = nn.Linear(embed_dim, ffn_dim, bias=bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(ffn_dim, embed_dim, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return linear_relu_mlp(self.fc1, self.fc2, x, residual, dropout_p=self.dropout, training=self.training,
                               run=self.parallelism.relu_mlp)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, ffn_dim={self.ffn_dim}, dropout={self.dropout}, "
                f"bias={self.fc1.bias is not None}")


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Separate q/k/v projection weights (or biases), rows head-major, -> the fused per-head layout."""
    parts = [t.reshape(num_heads, -1, *t.shape[1:]) for t in (q, k, v)]  # (heads, head_dim, ...)
    return torch.stack(parts, dim=1).reshape(-1, *q.shape[1:])


def split_qkv(fused: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of ``interleave_qkv``: contiguous q, k, v."""
    per_head = fused.reshape(num_heads, 3, -1, *fused.shape[1:])
    return tuple(per_head[:, i].reshape(-1, *fused.shape[1:]).contiguous() for i in range(3))


class FusedSelfAttention(nn.Module):
    """OPT's self-attention block over ``kernels.attention``.

    One ``qkv_proj`` Linear (embed_dim -> 3 * embed_dim) whose output rows are
    grouped per head, Megatron's layout: (heads, 3, head_dim), q, k, v of head 0,
    then of head 1 ...  A tensor-parallel shard of its rows is then whole heads
    with their own q, k and v, under the same name and global shape as here, so
    checkpoints reshard between layouts.  Then the fused attention kernel
    (softmax_scale = head_dim ** -0.5: HF OPT scales q after its bias, the same
    product), and ``out_proj``.  q, k and v are strided views of the one QKV
    activation; the kernels read them in place.

    ``forward(hidden_states, key_padding_mask=None, causal=True, *, batch_shape=None,
    seed=None, kv_cache=None)``: hidden_states (batch, seqlen, embed_dim), or token
    rows (rows, embed_dim) with ``batch_shape=(batch, seqlen)`` (the first
    batch x seqlen rows of the all-token activations are the tokens, as
    sequence parallelism lays them out); key_padding_mask (batch, seqlen_k), True
    (or 1, as HF's ``attention_mask``) for real keys.  With a ``LayerKVCache``,
    this call's keys and values are appended to it and the queries attend to all
    of them (seqlen_k = cached + seqlen; causal aligned at the bottom right).
    Dropout on the attention probabilities only in training mode, from ``seed``
    (an int or a ``seed_value`` symbol; drawn by ``attention`` when None, an
    ``.item()``: pass one under ``torch.compile``, as OPTDecoder does).

    ``from_hf_state_dict`` / ``load_hf_state_dict`` take HF OPT's four
    projections (``q_proj.weight``, ``q_proj.bias``, ..., ``out_proj.bias``);
    ``hf_state_dict`` gives them back.
    """

    parallelism: Parallelism = ONE_PROCESS
    HF_PROJECTIONS = ("q_proj", "k_proj", "v_proj")

    def __init__(self, embed_dim: int, num_heads: int, *, dropout: float = 0.0, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        check_positive_int("embed_dim", embed_dim)
        check_positive_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = check_dropout("dropout", dropout)
        self.qkv_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias, device=device, dtype=dtype)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}"

    def forward(self, hidden_states: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                causal: bool = True, *, batch_shape: Optional[tuple[int, int]] = None, seed=None,
                kv_cache: Optional[LayerKVCache] = None) -> torch.Tensor:
        batch, seqlen = self._batch_shape(hidden_states, batch_shape)
        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            if key_padding_mask.is_floating_point() or key_padding_mask.is_complex():
                raise TypeError(f"key_padding_mask must be bool or integer 0/1, got {key_padding_mask.dtype}")
            key_padding_mask = key_padding_mask != 0
        par, tokens = self.parallelism, batch * seqlen
        qkv = par.column_linear(hidden_states, self.qkv_proj.weight, self.qkv_proj.bias)
        # Rows (heads, 3, head_dim): this process's heads under tensor parallelism.  Sliced to the batch's
        # tokens only where there are more rows (a no-op slice would still cost its backward a zeroed copy).
        rows = qkv.reshape(-1, qkv.shape[-1])
        rows = rows[:tokens] if rows.shape[0] != tokens else rows
        q, k, v = rows.view(batch, seqlen, -1, 3, self.head_dim).unbind(3)
        if kv_cache is not None:
            k, v = kv_cache.extend(k, v)
        p = self.dropout if self.training else 0.0
        out = attention(q, k, v, causal=causal, softmax_scale=self.head_dim ** -0.5, key_padding_mask=key_padding_mask,
                        dropout_p=p, seed=par.attention_seed(seed) if p > 0 and seed is not None else None)
        out = par.row_linear(out.reshape(tokens, -1), self.out_proj.weight, self.out_proj.bias)
        return out.view(*hidden_states.shape[:-1], self.embed_dim)

    def _batch_shape(self, hidden_states: torch.Tensor, batch_shape) -> tuple[int, int]:
        rows_given = hidden_states.dim() == 2 and batch_shape is not None
        if not (hidden_states.dim() == 3 or rows_given) or hidden_states.shape[-1] != self.embed_dim:
            raise ValueError(f"hidden_states must have shape (batch, seqlen, {self.embed_dim}), or (rows, "
                             f"{self.embed_dim}) with batch_shape, got {tuple(hidden_states.shape)}")
        return batch_shape if rows_given else tuple(hidden_states.shape[:2])

    @classmethod
    def from_hf_state_dict(cls, state_dict, num_heads: int, *, prefix: str = "", dropout: float = 0.0,
                           device=None, dtype=None) -> "FusedSelfAttention":
        """A module with the weights of HF OPT's attention (keys ``prefix +
        'q_proj.weight'`` etc.); bias present iff ``q_proj.bias`` is."""
        key = f"{prefix}q_proj.weight"
        if key not in state_dict:
            raise KeyError(f"state_dict has no {key!r}")
        weight = state_dict[key]
        module = cls(weight.shape[1], num_heads, dropout=dropout, bias=f"{prefix}q_proj.bias" in state_dict,
                     device=device if device is not None else weight.device,
                     dtype=dtype if dtype is not None else weight.dtype)
        module.load_hf_state_dict(state_dict, prefix=prefix)
        return module

    def load_hf_state_dict(self, state_dict, prefix: str = "") -> None:
        """Copy HF OPT's q/k/v/out projections into ``qkv_proj`` / ``out_proj``."""
        names = [f"{prefix}{p}.{kind}" for p in (*self.HF_PROJECTIONS, "out_proj")
                 for kind in (("weight", "bias") if self.out_proj.bias is not None else ("weight",))]
        missing = [n for n in names if n not in state_dict]
        if missing:
            raise KeyError(f"state_dict is missing {missing}")
        E = self.embed_dim
        for n in names:
            expected = (E, E) if n.endswith("weight") else (E,)
            if tuple(state_dict[n].shape) != expected:
                raise ValueError(f"{n} must have shape {expected}, got {tuple(state_dict[n].shape)}")
        with torch.no_grad():
            self.qkv_proj.weight.copy_(interleave_qkv(*(state_dict[f"{prefix}{p}.weight"] for p in self.HF_PROJECTIONS),
                                                      self.num_heads))
            self.out_proj.weight.copy_(state_dict[f"{prefix}out_proj.weight"])
            if self.qkv_proj.bias is not None:
                self.qkv_proj.bias.copy_(interleave_qkv(*(state_dict[f"{prefix}{p}.bias"] for p in self.HF_PROJECTIONS),
                                                        self.num_heads))
                self.out_proj.bias.copy_(state_dict[f"{prefix}out_proj.bias"])

    def hf_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The weights under HF OPT's keys (copies, not views of ``qkv_proj``)."""
        out = {}
        weights = split_qkv(self.qkv_proj.weight.detach(), self.num_heads)
        biases = split_qkv(self.qkv_proj.bias.detach(), self.num_heads) if self.qkv_proj.bias is not None else (None,) * 3
        for p, w, b in zip(self.HF_PROJECTIONS, weights, biases):
            out[f"{prefix}{p}.weight"] = w.clone()
            if b is not None:
                out[f"{prefix}{p}.bias"] = b.clone()
        out[f"{prefix}out_proj.weight"] = self.out_proj.weight.detach().clone()
        if self.out_proj.bias is not None:
            out[f"{prefix}out_proj.bias"] = self.out_proj.bias.detach().clone()
        return out
