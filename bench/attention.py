"""Fused attention: correctness check and benchmark cases for the main job and the bench suite.

Peers: ``torch.nn.functional.scaled_dot_product_attention`` with each backend
this PyTorch and device offer (``sdpa-flash``, ``sdpa-cudnn``,
``sdpa-efficient``), each forced with ``torch.nn.attention.sdpa_kernel``; SDPA
takes (batch, heads, seqlen, head_dim), so it gets transposed views of the same
tensors.  Baseline: ``sdpa-flash`` (FlashAttention-2 inside PyTorch) where it
runs, else cuDNN, else the memory-efficient kernel; every provider's time is in
the table, so the ratio to the fastest SDPA backend can be read off too.  On
sm_90 and newer, ``opt-core-no-tma`` is our kernels with the TMA loads switched
off (``kernels.attention.TMA = "off"``): what the descriptor path buys, at the
issue's goal shape only (head_dim 128, seqlen 8192; each extra row of configs
is another round of autotuning compiles in a time-boxed GPU run).  On the CPU:
one tiny shape against the math SDPA.

Shapes: OPT's head layouts (heads x head_dim = 12x64 for 125M, 32x80 for 2.7B,
32x128 for 6.7B/13B, 96x128 for 175B) at 16k tokens per batch, seqlen 2048
(batch 8) and 8192 (batch 2), causal.

FLOPs (written down, as the issue asks): forward 4 * batch * heads * seqlen^2 *
head_dim (two matrix products of 2 * s^2 * d each), backward 2.5x that (five
products), forward+backward 3.5x; halved for causal.  Recomputation in the
backward (our dQ kernel recomputes two products) is not counted.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from opt_core import functional
from bench.harness import Case, has_tma, mode_runner, with_switch
from opt_core.kernels import reference
from opt_core.kernels.testing import FORWARD_FACTOR, GRADIENT_FACTOR, Comparison, compare

from opt_core.kernels import attention as _attention_module
OPT_HEADS = ((12, 64), (32, 80), (32, 128), (96, 128))  # heads x head_dim
AB_SHAPE = (8192, 32, 128)  # seqlen, heads, head_dim of the TMA on/off rows
TOKENS = 16384
SEQLENS = (2048, 8192)


# --------------------------------------------------------------------------- correctness
def check(device: torch.device, quick: bool) -> list[Comparison]:
    """Output and gradients against float64, by the DESIGN.md rule."""
    if device.type == "cpu":
        # interpreter: small shapes, fp16 and fp32 (bf16 products are checked on a GPU)
        shapes = [(2, 77, 77, 2, 64), (2, 45, 90, 2, 80)]
        dtypes = (torch.float32, torch.float16)
    else:
        shapes = [(2, 1024, 1024, 8, 64), (2, 777, 1031, 4, 80), (1, 2048, 2048, 4, 128)]
        if not quick:
            shapes.append((1, 4096, 4096, 2, 256))
        dtypes = (torch.bfloat16, torch.float16, torch.float32)
    results = []
    for dtype in dtypes:
        for shape in shapes:
            for padded in (False, True):
                results += _check_one(shape, dtype, device, padded)
    return results


def _check_one(shape, dtype, device, padded) -> list[Comparison]:
    B, Sq, Sk, H, D = shape
    q, k, v = (torch.randn(B, s, H, D, dtype=dtype, device=device) for s in (Sq, Sk, Sk))
    mask = None
    if padded:
        mask = torch.ones(B, Sk, dtype=torch.bool, device=device)
        mask[-1, : Sk // 3] = False  # left padding on the last sequence
    dout = torch.randn(B, Sq, H, D, dtype=torch.float64, device=device)

    def run(fn, cast=None):
        xs = [t.detach().to(cast or t.dtype).requires_grad_(True) for t in (q, k, v)]
        out = fn(*xs)
        out.backward(dout.to(out.dtype))
        return [out] + [t.grad for t in xs]

    ours = run(lambda *t: functional.attention(*t, causal=True, key_padding_mask=mask))
    oracle = run(lambda *t: reference.attention(*t, True, None, mask), torch.float64)
    plain = run(lambda *t: reference.attention(*t, True, None, mask, upcast=False))
    tag = f"attention {tuple(shape)} {str(dtype).replace('torch.', '')}{' padded' if padded else ''}"
    names = ("out", "dq", "dk", "dv")
    return [
        compare(f"{tag} {name}", o, rf, p, factor=FORWARD_FACTOR if i == 0 else GRADIENT_FACTOR)
        for i, (name, o, rf, p) in enumerate(zip(names, ours, oracle, plain))
    ]


# --------------------------------------------------------------------------- peers
def _sdpa_backends(device: torch.device, dtype: torch.dtype, head_dim: int) -> dict:
    """SDPA providers that run this dtype and head_dim here, by name."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type != "cuda":
        candidates = {"sdpa-math": SDPBackend.MATH}
    else:
        candidates = {
            "sdpa-flash": SDPBackend.FLASH_ATTENTION,
            "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
        }
    available = {}
    probe = torch.randn(1, 2, 128, head_dim, dtype=dtype, device=device, requires_grad=True)
    for name, backend in candidates.items():
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(probe, probe, probe, is_causal=True).sum().backward()
        except Exception:  # this backend does not take the dtype / head_dim / device
            continue
        available[name] = backend
    return available


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True)
        return out.transpose(1, 2)

    return run


def _failing(error):
    def run():
        raise error
    return run


def _baseline(providers) -> str:
    for name in ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math"):
        if name in providers:
            return name
    return "opt-core"


# --------------------------------------------------------------------------- benchmark cases
def flops(batch: int, heads: int, seqlen: int, head_dim: int, mode: str, causal: bool = True) -> int:
    fwd = 4 * batch * heads * seqlen * seqlen * head_dim
    total = {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]
    return int(total / 2 if causal else total)


def cases(device: torch.device, quick: bool, dtypes=(torch.bfloat16,)):
    """Benchmark cases, built lazily: a GPU run holds one shape's tensors at a time."""
    if device.type == "cuda":
        shapes = [(TOKENS // s, s, h, d) for s in SEQLENS for h, d in OPT_HEADS]
        if quick:
            shapes = [(TOKENS // s, s, h, d) for s in SEQLENS for h, d in ((32, 128),)]
    else:
        shapes = [(1, 64, 2, 64)]
    for dtype in dtypes:
        if device.type == "cpu" and dtype == torch.bfloat16:
            dtype = torch.float16  # interpreter: bf16 products are covered on a GPU
        for shape in shapes:
            yield from _cases_for(shape, dtype, device)
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _cases_for(shape, dtype, device):
    B, S, H, D = shape
    q, k, v = (torch.randn(B, S, H, D, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, S, H, D, dtype=dtype, device=device)
    providers = {"opt-core": lambda q_, k_, v_: functional.attention(q_, k_, v_, causal=True)}
    for name, backend in _sdpa_backends(device, dtype, D).items():
        providers[name] = _sdpa(backend)
    baseline = _baseline(providers)
    el = q.element_size()
    n = B * S * H * D * el
    leaves = (q, k, v)

    # fwd reads q, k, v and writes out; bwd reads q, k, v, out, dout and writes dq, dk, dv.
    for mode, nbytes in (("fwd", 4 * n), ("bwd", 8 * n), ("fwd+bwd", 12 * n)):
        wrapped = {}
        for name, fn in providers.items():
            try:
                wrapped[name] = mode_runner(mode, fn, leaves, (dout,))
            except Exception as e:  # bwd runs the forward now: a failure is reported when timed
                wrapped[name] = _failing(e)
        if has_tma(device) and dtype != torch.float32 and (S, H, D) == AB_SHAPE:
            wrapped["opt-core-no-tma"] = with_switch(
                _attention_module, "TMA", "off", lambda: mode_runner(mode, providers["opt-core"], leaves, (dout,)))
        yield Case("attention", f"b{B}xs{S}xh{H}xd{D} causal", dtype, mode, nbytes, wrapped, baseline,
                   flops=flops(B, H, S, D, mode), grad_to_none=list(leaves))
