"""LayerNorm: smoke check and benchmark cases for the bench suite.

Peers: ``torch.nn.functional.layer_norm`` (the baseline), apex's
``FusedLayerNorm`` and Liger-Kernel's LayerNorm when they are importable.
The residual variant (``h = x + residual; y = layer_norm(h)``) is timed against
the same two steps unfused in PyTorch.

Bytes, the minimum each mode moves (M rows of width N, element size e):
plain forward reads x, weight and bias and writes y, (2MN + 2N)e; its backward
reads x, dy and weight and writes dx, dweight and dbias, (3MN + 3N)e.  With the
residual fused the forward reads x and residual and writes y and h,
(4MN + 2N)e, and the backward reads h, dy and dh and writes dx, (4MN + 3N)e.
The fp32 mean and rstd (8M bytes) are left out, as are the fp32 partial sums.

A/B providers on a GPU (``VARIANTS``, backward rows of the plain LayerNorm):
``opt-core-no-pipeline`` (``kernels.layer_norm.BWD_PIPELINE = "off"``: the
register-row backward without its pipelined configs) at widths up to 8192 and
``opt-core-two-pass`` (``WIDE_BWD = "off"``: rows wider than 8192 read twice
by the two-pass kernel instead of once) at 9216 and 12288.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from opt_core import functional
from bench.harness import Spec, Target, Variant, add_variants, grouped, mode_runner, selected, switched
from opt_core.kernels import layer_norm as _layer_norm_module
from opt_core.kernels import reference
from opt_core.kernels.testing import FORWARD_FACTOR, GRADIENT_FACTOR, Comparison, compare

OPT_WIDTHS = (768, 1024, 2048, 2560, 4096, 5120, 7168, 9216, 12288)
GOAL_WIDTHS = (2048, 4096)  # OPT-1.3B and 6.7B, at 16k rows
GPU_ROWS = 16384
EPS = 1e-5
MODES = ("fwd", "bwd", "fwd+bwd")
OPS = {False: "layer_norm", True: "add+layer_norm"}  # residual fused?
VARIANTS = {v.name: v for v in (
    Variant("opt-core-no-pipeline", (("BWD_PIPELINE", "off"),), ("bwd",), "no pipelined register-row backward"),
    Variant("opt-core-two-pass", (("WIDE_BWD", "off"),), ("bwd",), "wide rows read twice"),
)}
VARIANT_WIDTHS = {"opt-core-no-pipeline": (768, 2048, 4096, 7168), "opt-core-two-pass": (9216, 12288)}


# --------------------------------------------------------------------------- smoke
def smoke(device: torch.device) -> list[Comparison]:
    """Forward and gradients against float64, bf16 and fp16, one width per backward kernel (the
    register-row one and the wide one)."""
    rows = 7 if device.type == "cpu" else 257
    results = []
    for dtype in (torch.bfloat16, torch.float16):
        for N in (1000, 9000):
            results += _check_one((rows, N), dtype, device)
        with switched(_layer_norm_module, "WIDE_BWD", "off"):  # the two-pass kernel (an A/B provider)
            results += [dataclasses.replace(c, name=f"{c.name} WIDE_BWD=off")
                        for c in _check_one((rows, 9000), dtype, device)]
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
def layer_norm_bytes(rows: int, N: int, element_size: int, residual: bool, mode: str) -> int:
    """The minimal bytes of one mode (this module's docstring)."""
    mn = rows * N
    fwd = (4 * mn if residual else 2 * mn) + 2 * N
    bwd = (4 * mn if residual else 3 * mn) + 3 * N
    return element_size * {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def _widths(target: Target, quick: bool) -> dict[str, tuple]:
    if not target.gpu:
        return {"goal": (768,), "rest": (2560,)}
    rest = tuple(n for n in OPT_WIDTHS if n not in GOAL_WIDTHS)
    return {"goal": GOAL_WIDTHS, "rest": (rest[0], rest[-1]) if quick else rest}


def specs(target: Target, quick: bool, dtypes=(torch.bfloat16,), part: str = "all") -> list[Spec]:
    rows = GPU_ROWS if target.gpu else 64
    out = []
    for p, widths in _widths(target, quick).items():
        for dtype in dtypes:
            el = torch.finfo(dtype).bits // 8
            for N in widths:
                for residual in (False, True):
                    out += [Spec(OPS[residual], f"{rows}x{N}", dtype, mode,
                                 layer_norm_bytes(rows, N, el, residual, mode), 0,
                                 ("opt-core", "torch") + _variants(target, N, residual, mode), "torch",
                                 p, (residual, rows, N, dtype, p)) for mode in MODES]
    return selected(out, part)


def _variants(target: Target, N: int, residual: bool, mode: str) -> tuple:
    return tuple(name for name, v in VARIANTS.items()
                 if target.gpu and not residual and mode in v.modes and N in VARIANT_WIDTHS[name])


def cases(device: torch.device, quick: bool, dtypes=(torch.bfloat16,), part: str = "all"):
    """Benchmark cases, built lazily: a GPU run holds one shape's tensors at a time."""
    for (residual, rows, N, dtype, _), group in grouped(specs(Target.of(device), quick, dtypes, part)):
        build = _residual_cases if residual else _plain_cases
        yield from build(group, rows, N, dtype, device)


def _tensors(rows, N, dtype, device):
    x = torch.randn(rows, N, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(N, dtype=dtype, device=device, requires_grad=True)
    b = torch.randn(N, dtype=dtype, device=device, requires_grad=True)
    return x, w, b


def _modes(group, providers, leaves, grads):
    """The group's cases (one per mode) for providers that map leaves -> outputs (and the variants of ours
    a spec lists)."""
    def runners(spec):
        made = {k: mode_runner(spec.mode, f, leaves, grads) for k, f in providers.items()}
        return add_variants(made, spec, VARIANTS, _layer_norm_module,
                            lambda: mode_runner(spec.mode, providers["opt-core"], leaves, grads))
    return [spec.case(runners(spec), leaves) for spec in group]


def _plain_cases(group, rows, N, dtype, device):
    x, w, b = _tensors(rows, N, dtype, device)
    dy = torch.randn_like(x)
    providers = {
        "opt-core": lambda x_, w_, b_: functional.layer_norm(x_, w_, b_, EPS),
        "torch": lambda x_, w_, b_: F.layer_norm(x_, (N,), w_, b_, EPS),
    }
    for name, peer in (("apex", _apex(N, w.detach(), b.detach())), ("liger", _liger())):
        if peer is not None:
            providers[name] = peer
    return _modes(group, providers, (x, w, b), [dy])


def _residual_cases(group, rows, N, dtype, device):
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
    return _modes(group, providers, (x, w, b, r), [dy, dh])
