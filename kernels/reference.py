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
    on their master copy when given, else upcast and rounded back.  ``lr``,
    ``beta1``, ``beta2`` are floats or 1-element tensors, each used at the
    precision torch uses it; the bias corrections are float64 powers of the
    betas, from the ``steps`` tensors.  No host sync: with a non-zero
    ``found_inf`` every tensor is given its old value back on the device.
    """
    def on(x, device, dtype):  # a tensor hyper-parameter as a 0-d tensor; a number as it is
        return x.reshape(()).to(device=device, dtype=dtype) if isinstance(x, torch.Tensor) else x

    skip = None if found_inf is None else found_inf != 0
    for i, p in enumerate(params):
        ct, device = _compute_dtype_of_param(p), p.device
        master = masters[i] if masters is not None else None
        vmax = max_exp_avg_sqs[i] if max_exp_avg_sqs is not None else None
        m, v = exp_avgs[i], exp_avg_sqs[i]
        touched = [t for t in (p, master, m, v, vmax) if t is not None]
        before = [t.clone() for t in touched] if skip is not None else []
        g = grads[i].to(ct)
        if inv_scale is not None:
            g = g * inv_scale.to(ct)
        if clip_coef is not None:
            g = g * clip_coef.to(ct)
        if maximize:
            g = -g
        w = master if master is not None else (p if p.dtype == ct else p.to(ct))
        step = steps[i].to(device=device, dtype=torch.float64) + 1
        bias_correction1 = 1 - on(beta1, device, torch.float64) ** step
        bias_correction2_sqrt = (1 - on(beta2, device, torch.float64) ** step).sqrt().to(ct)
        neg_step_size = (-on(lr, device, torch.float64) / bias_correction1).to(ct)
        w.mul_(on(1 - lr * weight_decay, device, ct))
        m.lerp_(g, 1 - on(beta1, device, ct))
        # addcmul_ with a tensor value would read it on the host: multiply it in, in addcmul's order.
        v.mul_(on(beta2, device, ct)).addcmul_(g * on(1 - beta2, device, ct), g)
        if vmax is not None:
            torch.maximum(vmax, v, out=vmax)
            denom = (vmax.sqrt() / bias_correction2_sqrt).add_(eps)
        else:
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        w.addcdiv_(m * neg_step_size, denom)  # addcdiv_'s value * m / denom, the value as a tensor
        if w is not p:
            p.copy_(w)
        for t, old in zip(touched, before):
            t.copy_(torch.where(skip.to(t.device), old, t))
        if advance_steps:
            steps[i].add_(1 if skip is None else (~skip).to(steps[i]))


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


def relu_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    *,
    upcast: bool = True,
    return_hidden: bool = False,
):
    """OPT's feed-forward block: ``residual + dropout(fc2(relu(fc1(x))))``.

    Weights in ``nn.Linear`` layout; ``dropout_mask`` is the boolean keep-mask
    (shape of the output) or None for no dropout; kept values are scaled by
    ``1 / (1 - dropout_p)`` as ``F.dropout`` does.  The hidden activation is
    rounded to ``x``'s dtype (what any implementation stores between the two
    GEMMs).  With ``return_hidden`` returns ``(out, hidden)``.
    """
    ct = _compute_dtype(x.dtype, upcast)

    def cast(t):
        return None if t is None else t.to(ct)

    h = torch.relu(torch.nn.functional.linear(x.to(ct), cast(w1), cast(b1))).to(x.dtype)
    z = torch.nn.functional.linear(h.to(ct), cast(w2), cast(b2))
    if dropout_mask is not None:
        z = z * dropout_mask.to(ct) * (1.0 / (1.0 - dropout_p))
    if residual is not None:
        z = z + residual.to(ct)
    out = z.to(x.dtype)
    return (out, h) if return_hidden else out


def _attention_scores(q, k, causal, softmax_scale, key_padding_mask, compute_dtype):
    """Scaled scores (batch, heads, seqlen_q, seqlen_k) with hidden keys at -inf,
    and which rows see at least one key."""
    Sq, D = q.shape[1], q.shape[3]
    Sk = k.shape[1]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    qc = q.to(compute_dtype).transpose(1, 2)
    kc = k.to(compute_dtype).transpose(1, 2)
    s = (qc @ kc.transpose(-1, -2)) * scale
    visible = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
    if causal:  # bottom-right aligned: query i sees key j iff j <= i + Sk - Sq
        i = torch.arange(Sq, device=q.device)[:, None]
        j = torch.arange(Sk, device=q.device)[None, :]
        visible = j <= i + (Sk - Sq)
    visible = visible[None, None]
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    # masked_fill replaces (a NaN score of a hidden key does not leak)
    s = s.masked_fill(~visible, float("-inf"))
    return s, visible.any(dim=-1, keepdim=True)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    *,
    upcast: bool = True,
) -> torch.Tensor:
    """Attention over (batch, seqlen, heads, head_dim) tensors, the score matrix
    materialised; the semantics ``kernels.attention`` implements.

    Causal is bottom-right aligned (query i sees key j iff j <= i + seqlen_k -
    seqlen_q); ``key_padding_mask`` (batch, seqlen_k) is True for real keys; a
    query row that sees no key outputs 0 (gradient 0).  ``dropout_mask`` is a
    bool keep-mask (batch, heads, seqlen_q, seqlen_k): kept probabilities are
    scaled by 1 / (1 - dropout_p).
    """
    ct = _compute_dtype(q.dtype, upcast)
    s, any_visible = _attention_scores(q, k, causal, softmax_scale, key_padding_mask, ct)
    # Rows with no visible key: finite scores so softmax stays finite (and its
    # gradient), then zeroed.
    s = s.masked_fill(~any_visible, 0.0)
    p = torch.softmax(s, dim=-1) * any_visible
    if dropout_mask is not None:
        p = p * dropout_mask / (1.0 - dropout_p)
    out = p.to(ct) @ v.to(ct).transpose(1, 2)
    return out.transpose(1, 2).to(q.dtype)


def attention_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Natural-log log-sum-exp of each row's visible scores, (batch, heads,
    seqlen_q), in float32 or float64; +inf for rows that see no key."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    s, any_visible = _attention_scores(q, k, causal, softmax_scale, key_padding_mask, ct)
    return torch.logsumexp(s, dim=-1).masked_fill(~any_visible[..., 0], float("inf"))
