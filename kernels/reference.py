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


def _compute_dtype_of_param(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


@torch.no_grad()
def adamw_step(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay,
               max_exp_avg_sqs=None, masters=None, maximize=False, inv_scale=None, clip_coef=None,
               found_inf=None, advance_steps=True):
    """torch.optim.AdamW's single-tensor step, with the fused options of kernels.adamw.adamw_step.

    Moments are fp32 (fp64 for fp64 params); low-precision params step in fp32,
    on their master copy when given, else upcast and rounded back.  With a
    non-zero ``found_inf`` nothing changes.  Syncs with the host (reference).
    """
    if found_inf is not None and bool(found_inf.item()):
        return
    for i, p in enumerate(params):
        ct = _compute_dtype_of_param(p)
        g = grads[i].to(ct)
        if inv_scale is not None:
            g = g * inv_scale.to(ct)
        if clip_coef is not None:
            g = g * clip_coef.to(ct)
        if maximize:
            g = -g
        master = masters[i] if masters is not None else None
        w = master if master is not None else (p if p.dtype == ct else p.to(ct))
        m, v = exp_avgs[i], exp_avg_sqs[i]
        step = float(steps[i].item()) + 1
        w.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
        if max_exp_avg_sqs is not None:
            torch.maximum(max_exp_avg_sqs[i], v, out=max_exp_avg_sqs[i])
            denom = (max_exp_avg_sqs[i].sqrt() / bias_correction2_sqrt).add_(eps)
        else:
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        w.addcdiv_(m, denom, value=-(lr / (1 - beta1 ** step)))
        if w is not p:
            p.copy_(w)
        if advance_steps:
            steps[i].add_(1)


@torch.no_grad()
def grad_stats(grads, *, inv_scale=None, unscale_in_place=False):
    """(sum of squares of the unscaled grads in fp32, count of non-finite raw values) as 0-d tensors."""
    sumsq = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    bad = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    for g in grads:
        bad += (~torch.isfinite(g)).sum()
        gf = g.float() if inv_scale is None else g.float() * inv_scale
        if unscale_in_place:
            g.copy_(gf)
        sumsq += (gf * gf).sum()
    return sumsq, bad
