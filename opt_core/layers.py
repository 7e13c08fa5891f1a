"""nn.Modules over ``kernels/``: drop-in replacements for their torch.nn twins."""

from __future__ import annotations

import math

import torch
from torch import nn

from kernels import layer_norm


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

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None):
        shape = tuple(self.normalized_shape)
        if tuple(input.shape[input.dim() - len(shape):]) != shape or input.dim() < len(shape):
            raise ValueError(
                f"input must end with normalized_shape {list(shape)}, got shape {list(input.shape)}"
            )
        if len(shape) == 1:
            return layer_norm(input, self.weight, self.bias, self.eps, residual)
        # Several normalised dims: flatten them into one row, as LayerNorm's maths does.
        n = math.prod(shape)
        flat = input.shape[: input.dim() - len(shape)] + (n,)
        weight = self.weight.reshape(n) if self.weight is not None else None
        bias = self.bias.reshape(n) if self.bias is not None else None
        res = residual.reshape(flat) if residual is not None else None
        out = layer_norm(input.reshape(flat), weight, bias, self.eps, res)
        if residual is None:
            return out.view(input.shape)
        return out[0].view(input.shape), out[1].view(input.shape)
