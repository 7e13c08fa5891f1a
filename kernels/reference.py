"""Plain-PyTorch versions of every op.

Two jobs: the oracle the tests compare the kernels with (called on float64
inputs, the result is exact to float64 rounding), and the fallback that runs
where no kernel does (``kernels/dispatch.py`` decides).  ``upcast=True``
computes in float32 and rounds back to the input dtype, the way the kernels do;
``upcast=False`` runs in the input dtype, the way a plain PyTorch model would.
"""

from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    if upcast and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    *,
    upcast: bool = True,
):
    """LayerNorm over the last dimension; with ``residual``, of ``x + residual``.

    Returns ``y`` or, with ``residual``, ``(y, h)`` where ``h = x + residual``
    is rounded to ``x``'s dtype before it is normalised (as an unfused model
    would store it).
    """
    h = x if residual is None else x + residual
    ct = _compute_dtype(h.dtype, upcast)
    hc = h.to(ct)
    mean = hc.mean(dim=-1, keepdim=True)
    centred = hc - mean
    var = (centred * centred).mean(dim=-1, keepdim=True)
    y = centred * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    y = y.to(x.dtype)
    return y if residual is None else (y, h)
