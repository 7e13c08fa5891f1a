"""LayerNorm: correctness check and benchmark cases for the main job and the bench suite.

Peers: ``torch.nn.functional.layer_norm`` (the baseline), apex's
``FusedLayerNorm`` and Liger-Kernel's LayerNorm when they are importable.
The residual variant (``h = x + residual; y = layer_norm(h)``) is timed against
the same two steps unfused in PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from opt_core import functional
from bench.harness import Case, mode_runner
from opt_core.kernels import reference
from opt_core.kernels.testing import FORWARD_FACTOR, GRADIENT_FACTOR, Comparison, compare

OPT_WIDTHS = (768, 1024, 2048, 2560, 4096, 5120, 7168, 9216, 12288)
EPS = 1e-5


# --------------------------------------------------------------------------- correctness
def check(device: torch.device, quick: bool) -> list[Comparison]:
    """Forward and gradients against float64, by the DESIGN.md rule."""
    widths = (1, 7, 768, 1000, 12288) if quick else (1, 7, 768, 1000, 2560, 5120, 12288)
    rows = 7 if device.type == "cpu" else 1023
    results = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for N in widths:
            results += _check_one((rows, N), dtype, device)
    return results


def _check_one(shape, dtype, device) -> list[Comparison]:
    N = shape[-1]
    base = [torch.randn(shape, dtype=dtype, device=device), torch.randn(N, dtype=dtype, device=device),
            torch.randn(N, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device)]
    dy = torch.randn(shape, dtype=torch.float64, device=device)
    dh = torch.randn(shape, dtype=torch.float64, device=device)

    def run(fn, cast=None):
        xs = [t.detach().to(cast or t.dtype).requires_grad_(True) for t in base]
        y, h = fn(*xs)
        torch.autograd.backward([y, h], [dy.to(y.dtype), dh.to(h.dtype)])
        return [y, h] + [t.grad for t in xs]

    ours = run(lambda x, w, b, r: functional.layer_norm(x, w, b, EPS, residual=r))
    oracle = run(lambda x, w, b, r: reference.layer_norm(x, w, b, EPS, r), torch.float64)
    plain = run(lambda x, w, b, r: (F.layer_norm(x + r, (N,), w, b, EPS), x + r))
    tag = f"layer_norm {tuple(shape)} {str(dtype).replace('torch.', '')}"
    names = ("y", "h", "dx", "dweight", "dbias", "dresidual")
    return [
        compare(f"{tag} {name}", o, rf, p, factor=FORWARD_FACTOR if i < 2 else GRADIENT_FACTOR)
        for i, (name, o, rf, p) in enumerate(zip(names, ours, oracle, plain))
    ]


# --------------------------------------------------------------------------- peers
def _apex(N, w, b):
    try:
        from apex.normalization import FusedLayerNorm as ApexLayerNorm
    except Exception:
        return None
    module = ApexLayerNorm(N, eps=EPS).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        module.weight.copy_(w)
        module.bias.copy_(b)
    return lambda x, w_, b_: module(x)


def _liger():
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    except Exception:
        return None
    return lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, EPS)


# --------------------------------------------------------------------------- benchmark cases
def cases(device: torch.device, quick: bool, dtypes=(torch.bfloat16,)):
    """Benchmark cases, built lazily: a GPU run holds one shape's tensors at a time."""
    if device.type == "cuda":
        rows, widths = 16384, OPT_WIDTHS
    else:
        rows, widths = 64, (768, 2560)
    if quick:
        widths = widths[:1] + widths[-1:]
    for dtype in dtypes:
        for N in widths:
            yield from _plain_cases(rows, N, dtype, device)
            yield from _residual_cases(rows, N, dtype, device)


def _tensors(rows, N, dtype, device):
    x = torch.randn(rows, N, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(N, dtype=dtype, device=device, requires_grad=True)
    b = torch.randn(N, dtype=dtype, device=device, requires_grad=True)
    return x, w, b


def _modes(op, shape, dtype, el_bytes, passes, providers, baseline, leaves, grads):
    """fwd / bwd / fwd+bwd cases for providers that map leaves -> outputs."""
    fwd_passes, bwd_passes = passes
    return [Case(op, shape, dtype, mode, p * el_bytes,
                 {k: mode_runner(mode, f, leaves, grads) for k, f in providers.items()}, baseline,
                 grad_to_none=list(leaves))
            for mode, p in (("fwd", fwd_passes), ("bwd", bwd_passes), ("fwd+bwd", fwd_passes + bwd_passes))]


def _plain_cases(rows, N, dtype, device):
    x, w, b = _tensors(rows, N, dtype, device)
    dy = torch.randn_like(x)
    providers = {
        "opt-core": lambda x_, w_, b_: functional.layer_norm(x_, w_, b_, EPS),
        "torch": lambda x_, w_, b_: F.layer_norm(x_, (N,), w_, b_, EPS),
    }
    for name, peer in (("apex", _apex(N, w.detach(), b.detach())), ("liger", _liger())):
        if peer is not None:
            providers[name] = peer
    mn = rows * N * x.element_size()
    # fwd reads x, writes y; bwd reads x and dy, writes dx.
    return _modes("layer_norm", f"{rows}x{N}", dtype, mn, (2, 3), providers, "torch", (x, w, b), [dy])


def _residual_cases(rows, N, dtype, device):
    x, w, b = _tensors(rows, N, dtype, device)
    r = torch.randn_like(x, requires_grad=True)
    dy, dh = torch.randn_like(x), torch.randn_like(x)

    def unfused(x_, w_, b_, r_):
        h = x_ + r_
        return F.layer_norm(h, (N,), w_, b_, EPS), h

    providers = {
        "opt-core": lambda x_, w_, b_, r_: functional.layer_norm(x_, w_, b_, EPS, residual=r_),
        "torch": unfused,
    }
    mn = rows * N * x.element_size()
    # fwd reads x, r, writes y, h; bwd reads h, dy, dh, writes dx (= d residual).
    return _modes("add+layer_norm", f"{rows}x{N}", dtype, mn, (4, 4), providers, "torch", (x, w, b, r), [dy, dh])
