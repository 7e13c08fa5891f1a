"""Fused attention: smoke check and benchmark cases for the bench suite.

Peers: ``torch.nn.functional.scaled_dot_product_attention`` with each backend
this PyTorch and device offer (``sdpa-flash``, ``sdpa-cudnn``,
``sdpa-efficient``), each forced with ``torch.nn.attention.sdpa_kernel``; SDPA
takes (batch, heads, seqlen, head_dim), so it gets transposed views of the same
tensors.  Baseline: ``sdpa-flash`` (FlashAttention-2 inside PyTorch) where it
runs, else cuDNN, else the memory-efficient kernel; every provider's time is in
the table, so the ratio to the fastest SDPA backend can be read off too.  On
sm_90 and newer, our kernels with a switch of ``kernels/attention.py`` set are
A/B providers (``VARIANTS``): ``opt-core-no-tma`` (the TMA loads off: what the
descriptor path buys over the pointer path's sm_90 code, one masked loop per
kernel there: ``attention.split_masked``),
``opt-core-ws`` and ``opt-core-no-ws`` (the forward's tuner held to the
warp-specialised loop, or kept from it: what the overlap buys), ``opt-core-fused-dq`` (the five-product backward, dQ added up by the
dK/dV kernel in the deterministic order), ``opt-core-fused-dq-atomic`` (the
same in any order), and the Gluon kernels: ``opt-core-gluon`` (the
FlashAttention-3-style forward, ``GLUON = "on"``), ``opt-core-gluon-persistent``
(the same on a persistent grid), ``opt-core-gluon-bwd`` (that forward and
the five-product Gluon backward, ``GLUON_BWD = "on"``, deterministic) and
``opt-core-gluon-bwd-atomic`` (dQ added in any order).  Those
have never yet run on a GPU: each is proven against float64 in the smoke
stage first (``prove``; its rows are timed only where that passed), and its
rows come after every other row of the op, against our Triton kernels, at
``GLUON_ROWS`` (the goal shape, and head_dim 64 or 80 at seqlen 2048).  They run at the issue's goal shape (head_dim 128, seqlen
8192) and the warp-specialisation pair at seqlen 2048 with OPT-125M's and
2.7B's heads too (head_dim 64 and 80): each extra row of configs is another round of autotuning
compiles in a time-boxed GPU run.  On the CPU: one tiny shape against the
math SDPA.

Shapes: OPT's head layouts (heads x head_dim = 12x64 for 125M, 32x80 for 2.7B,
32x128 for 6.7B/13B, 96x128 for 175B) at 16k tokens per batch, seqlen 2048
(batch 8) and 8192 (batch 2), causal.  The goal (timed first): 32x128 at
seqlen 8192, forward and forward+backward.

Bytes, the minimum (n = batch * seqlen * heads * head_dim elements of each of
q, k, v): the forward reads q, k, v and writes out, 4n; the backward reads q,
k, v, out and dout and writes dq, dk, dv, 8n; forward+backward 12n; the fp32
log-sum-exp and delta rows are left out.

FLOPs (written down, as the issue asks): forward 4 * batch * heads * seqlen^2 *
head_dim (two matrix products of 2 * s^2 * d each), backward 2.5x that (five
products), forward+backward 3.5x; halved for causal.  Recomputation in the
backward (our dQ kernel recomputes two products) is not counted.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from opt_core import functional
from bench.harness import Spec, Target, Variant, grouped, mode_runner, selected, switched
from opt_core.kernels import reference
from opt_core.kernels.testing import FORWARD_FACTOR, GRADIENT_FACTOR, Comparison, compare

from opt_core.kernels import attention as _attention_module
OPT_HEADS = ((12, 64), (32, 80), (32, 128), (96, 128))  # heads x head_dim
AB_SHAPE = (8192, 32, 128)  # seqlen, heads, head_dim of the A/B rows (the goal shape)
WS_SHAPES = (AB_SHAPE, (2048, 12, 64), (2048, 32, 80))  # where the warp-specialisation pair runs
VARIANTS = {v.name: v for v in (
    Variant("opt-core-no-tma", (("TMA", "off"),), why="pointer loads instead of TMA descriptors"),
    Variant("opt-core-ws", (("WARP_SPECIALIZE", "on"),), ("fwd", "fwd+bwd"), "the warp-specialised forward only"),
    Variant("opt-core-no-ws", (("WARP_SPECIALIZE", "off"),), ("fwd", "fwd+bwd"), "no warp-specialised forward"),
    Variant("opt-core-fused-dq", (("FUSED_DQ", True),), ("bwd", "fwd+bwd"), "five products, deterministic"),
    Variant("opt-core-fused-dq-atomic", (("FUSED_DQ", True),), ("bwd",), "five products, dQ in any order"),
    Variant("opt-core-gluon", (("GLUON", "on"),), ("fwd", "fwd+bwd"), "the Gluon FA3-style forward", unproven=True),
    Variant("opt-core-gluon-persistent", (("GLUON", "on"), ("attention_gluon.PERSISTENT", "on")), ("fwd",),
            "the Gluon forward on a persistent grid", unproven=True),
    Variant("opt-core-gluon-bwd", (("GLUON", "on"), ("GLUON_BWD", "on")), ("bwd", "fwd+bwd"),
            "the Gluon FA3-style forward and five-product backward, deterministic", unproven=True),
    Variant("opt-core-gluon-bwd-atomic", (("GLUON", "on"), ("GLUON_BWD", "on")), ("bwd",),
            "the same, dQ added in any order (longest key blocks first)", unproven=True),
)}
# The Gluon kernels have never run on a GPU: each is proven against float64 in the smoke stage first
# (``prove``), and its rows are the op's last (a hang or a sticky CUDA error costs only them), timed
# against our Triton kernels at head dims it takes: (seqlen, heads, head_dim) per variant.
GLUON_ROWS = {
    "opt-core-gluon": (AB_SHAPE, (2048, 12, 64), (2048, 32, 80)),
    "opt-core-gluon-persistent": (AB_SHAPE, (2048, 32, 80)),
    "opt-core-gluon-bwd": (AB_SHAPE, (2048, 12, 64), (2048, 32, 80)),
    "opt-core-gluon-bwd-atomic": (AB_SHAPE,),
}
TOKENS = 16384
SEQLENS = (2048, 8192)


# --------------------------------------------------------------------------- smoke
def smoke(device: torch.device) -> list[Comparison]:
    """Output and gradients against float64 at one small causal shape, bf16 and fp16, through the TMA
    descriptors (sm_90; the interpreter's descriptor path on the CPU) and through pointers; then bf16
    with the warp-specialised forward and the fused-dQ backward (the A/B providers' kernels)."""
    shape = (2, 77, 77, 2, 64) if device.type == "cpu" else (2, 333, 333, 4, 128)
    descriptors = "on" if device.type == "cpu" else "auto"
    results = []
    for dtype in (torch.bfloat16, torch.float16):
        for tma in (descriptors, "off"):
            with switched(_attention_module, "TMA", tma):
                results += [dataclasses.replace(c, name=f"{c.name} TMA={tma}")
                            for c in _check_one(shape, dtype, device)]
    # The A/B providers' own kernels: the warp-specialised forward, the fused-dQ backward and its store.
    with switched(_attention_module, "TMA", descriptors), switched(_attention_module, "WARP_SPECIALIZE", "on"), \
            switched(_attention_module, "FUSED_DQ", True):
        results += [dataclasses.replace(c, name=f"{c.name} WARP_SPECIALIZE=on FUSED_DQ")
                    for c in _check_one(shape, torch.bfloat16, device)]
    return results


# The unproven variants' proofs (``prove``): (batch, seqlen_q, seqlen_k, heads, head_dim), odd seqlens and
# an unequal pair at each head dim the Gluon kernels take; the persistent grid's adds one with several
# tiles per program.
PROOF_SHAPES = ((2, 333, 333, 4, 64), (2, 150, 150, 2, 80), (1, 200, 333, 2, 128), (2, 77, 77, 2, 128))
MANY_TILES = (4, 600, 600, 16, 80)


def _backward(variant: str) -> bool:
    return "GLUON_BWD" in dict(VARIANTS[variant].switches)


def _proof_shapes(variant: str) -> list:
    """The proof shapes at the head dims ``variant``'s kernels take."""
    from opt_core.kernels import attention_gluon, attention_gluon_bwd

    head_dims = attention_gluon_bwd.HEAD_DIMS if _backward(variant) else attention_gluon.HEAD_DIMS
    shapes = PROOF_SHAPES + ((MANY_TILES,) if variant.endswith("-persistent") else ())
    return [s for s in shapes if s[-1] in head_dims]


def _taken(variant: str, q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether ``variant``'s Gluon kernels take these inputs (else its switches would fall back to the Triton
    kernels, and a proof would prove nothing)."""
    from opt_core.kernels import attention_gluon, attention_gluon_bwd

    forward = attention_gluon.supported(q, k, k, None, 0.0)
    if not _backward(variant):
        return forward
    return forward and attention_gluon_bwd.supported(q, k, k, None, 0.0, q, q.shape[-1] ** -0.5)


def prove(device: torch.device, variant: str) -> list[Comparison]:
    """``variant`` (an unproven one: a Gluon kernel never yet run on a GPU) against float64 at
    ``_proof_shapes``, bf16 and fp16, causal and not.  A forward: its out and lse, then out and every
    gradient through the routed op (bf16 causal, per head dim).  A backward: every gradient through the
    routed op at every combination, and their bitwise repeatability where it is deterministic.  Raises where its kernels would not
    take a proof's inputs (its switches would fall back to the Triton kernels: the proof would prove
    nothing)."""
    if variant not in GLUON_ROWS:
        raise ValueError(f"no proof for {variant!r}: the unproven variants are {sorted(GLUON_ROWS)}")
    results, routed = [], {}
    for shape, dtype, causal in ((s, d, c) for s in _proof_shapes(variant) for d in (torch.bfloat16, torch.float16)
                                 for c in (True, False)):
        B, Sq, Sk, H, D = shape
        q, k, v = (torch.randn(B, s, H, D, dtype=dtype, device=device) for s in (Sq, Sk, Sk))
        if not _taken(variant, q, k):
            raise RuntimeError(f"{variant}: its Gluon kernels do not take {shape} {dtype} on {device}")
        if _backward(variant):
            routed[(shape, dtype, causal)] = (shape, dtype, causal)
            continue
        run = VARIANTS[variant].runner(_attention_module, lambda: lambda: _gluon_forward(q, k, v, causal))
        results += [dataclasses.replace(c, name=f"{c.name} {variant}") for c in run()]
        routed.setdefault(D, (shape, torch.bfloat16, True))
    deterministic = not variant.endswith("-atomic")  # as the variant's rows run it (_ours)
    for shape, dtype, causal in routed.values():
        check = VARIANTS[variant].runner(_attention_module, lambda: lambda: _check_one(
            shape, dtype, device, causal, deterministic, repeat=_backward(variant) and deterministic))
        results += [dataclasses.replace(c, name=f"{c.name} {variant}") for c in check()]
    return results


def _gluon_forward(q, k, v, causal) -> list[Comparison]:
    """The Gluon forward's out and lse (called directly, under the variant's switches) against float64."""
    from opt_core.kernels import attention_gluon

    scale = q.shape[-1] ** -0.5
    out, lse = attention_gluon.attention_fwd(q, k, v, causal, scale)
    tag = f"attention gluon {tuple(q.shape)} seqlen_k {k.shape[1]} {str(q.dtype).replace('torch.', '')}" \
          f"{'' if causal else ' non-causal'}"
    wide = [t.double() for t in (q, k, v)]
    return [compare(f"{tag} out", out, reference.attention(*wide, causal),
                    reference.attention(q, k, v, causal, upcast=False), factor=FORWARD_FACTOR),
            _lse_comparison(f"{tag} lse", lse, reference.attention_lse(wide[0], wide[1], causal, scale))]


LSE_TOLERANCE = 1e-5  # relative and absolute, as the attention tests hold lse (fp32 from fp32 sums)


def _lse_comparison(name: str, lse: torch.Tensor, expected: torch.Tensor) -> Comparison:
    """lse against the float64 one: +inf exactly where a row sees no key, elsewhere within
    ``LSE_TOLERANCE`` (the error is in units of the per-element allowance: at most 1)."""
    lse = lse.double()
    if not torch.equal(torch.isinf(lse), torch.isinf(expected)) or bool((lse[torch.isinf(lse)] < 0).any()):
        return Comparison(name, float("inf"), float("nan"), 1.0, False, "+inf not exactly where no key is seen")
    finite = torch.isfinite(expected)
    allowance = LSE_TOLERANCE * (1.0 + expected[finite].abs())
    error = ((lse[finite] - expected[finite]).abs() / allowance).max().item() if bool(finite.any()) else 0.0
    return Comparison(name, error, float("nan"), 1.0, error <= 1.0, "in units of 1e-5 (1 + |lse|)")


def proof_compiles(variant: str) -> dict:
    """What ``prove(variant)`` compiles (the plan's count): a forward's Gluon kernel per head dim, dtype and
    causal flag and the Triton backward's kernels (their first configs, as in the smoke stage) per head
    dim; a backward's Gluon forward and backward and the delta pass per combination."""
    head_dims = len({shape[-1] for shape in _proof_shapes(variant)})
    if _backward(variant):
        combos = head_dims * 4
        return {family: combos for family in ("attention_gluon.fwd_kernel", "attention_gluon_bwd.bwd_kernel",
                                              "attention.bwd_preprocess_kernel")}
    backward = ("attention.bwd_preprocess_kernel", "attention.bwd_dkdv_kernel", "attention.bwd_dq_kernel")
    return {"attention_gluon.fwd_kernel": head_dims * 4, **{family: head_dims for family in backward}}


def _check_one(shape, dtype, device, causal=True, deterministic=True, repeat=False) -> list[Comparison]:
    """Out and the three gradients against float64; ``repeat``: also that a second run gives the same bits
    (a deterministic backward)."""
    B, Sq, Sk, H, D = shape
    q, k, v = (torch.randn(B, s, H, D, dtype=dtype, device=device) for s in (Sq, Sk, Sk))
    dout = torch.randn(B, Sq, H, D, dtype=torch.float64, device=device)

    def run(fn, cast=None):
        xs = [t.detach().to(cast or t.dtype).requires_grad_(True) for t in (q, k, v)]
        out = fn(*xs)
        out.backward(dout.to(out.dtype))
        return [out] + [t.grad for t in xs]

    ours = run(lambda *t: functional.attention(*t, causal=causal, deterministic=deterministic))
    oracle = run(lambda *t: reference.attention(*t, causal), torch.float64)
    plain = run(lambda *t: reference.attention(*t, causal, upcast=False))
    tag = f"attention {tuple(shape)} {str(dtype).replace('torch.', '')}{'' if causal else ' non-causal'}"
    names = ("out", "dq", "dk", "dv")
    results = [
        compare(f"{tag} {name}", o, rf, p, factor=FORWARD_FACTOR if i == 0 else GRADIENT_FACTOR)
        for i, (name, o, rf, p) in enumerate(zip(names, ours, oracle, plain))
    ]
    if repeat:
        again = run(lambda *t: functional.attention(*t, causal=causal, deterministic=deterministic))
        same = all(torch.equal(a, b) for a, b in zip(ours[1:], again[1:]))
        results.append(Comparison(f"{tag} gradients bitwise repeatable", 0.0 if same else float("inf"), 0.0, 0.0,
                                  same, "" if same else "a second run gave other bits"))
    return results


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


def attention_bytes(batch: int, heads: int, seqlen: int, head_dim: int, element_size: int, mode: str) -> int:
    n = batch * seqlen * heads * head_dim * element_size
    return {"fwd": 4 * n, "bwd": 8 * n, "fwd+bwd": 12 * n}[mode]


GOAL_SHAPE = (TOKENS // AB_SHAPE[0], *AB_SHAPE)  # batch, seqlen, heads, head_dim
GOAL_MODES = ("fwd", "fwd+bwd")


def _shapes(target: Target, quick: bool) -> list:
    if not target.gpu:
        return [(1, 64, 2, 64)]
    heads = ((32, 128),) if quick else OPT_HEADS
    return [(TOKENS // s, s, h, d) for s in SEQLENS for h, d in heads]


def _variants(target: Target, dtype, shape, mode: str) -> tuple:
    """The A/B providers of a row: on the TMA path (sm_90, 16-bit), at their shapes."""
    if not (target.tma and dtype != torch.float32):
        return ()
    s_h_d = tuple(shape[1:])
    return tuple(name for name, v in VARIANTS.items() if mode in v.modes and name not in GLUON_ROWS
                 and (s_h_d == AB_SHAPE or ("ws" in name.split("-") and s_h_d in WS_SHAPES)))


def _providers(target: Target, dtype, shape, mode: str) -> tuple:
    if not target.gpu:
        peers = ("sdpa-math",)
    else:  # what SDPA offers on an H200 (the build probes each backend)
        peers = ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient") if dtype != torch.float32 else ("sdpa-efficient",)
    return ("opt-core",) + peers + _variants(target, dtype, shape, mode)


def specs(target: Target, quick: bool, dtypes=(torch.bfloat16,), part: str = "all") -> list[Spec]:
    out = []
    for dtype in dtypes:
        if not target.gpu and dtype == torch.bfloat16:
            dtype = torch.float16  # interpreter: bf16 products are covered on a GPU
        el = torch.finfo(dtype).bits // 8
        for shape in _shapes(target, quick):
            B, S, H, D = shape
            for mode in ("fwd", "bwd", "fwd+bwd"):
                providers = _providers(target, dtype, shape, mode)
                goal = mode in GOAL_MODES and (shape == GOAL_SHAPE or not target.gpu)
                p = "goal" if goal else "rest"
                out.append(Spec("attention", f"b{B}xs{S}xh{H}xd{D} causal", dtype, mode,
                                attention_bytes(B, H, S, D, el, mode), flops(B, H, S, D, mode), providers,
                                _baseline(providers), p, (shape, dtype, p)))
    out += [spec for dtype in dtypes for spec in _gluon_specs(target, dtype)]
    return selected(out, part)


def _gluon_specs(target: Target, dtype) -> list[Spec]:
    """The Gluon kernels against our Triton ones (16-bit, sm_90), after every other row."""
    if not (target.tma and dtype != torch.float32):
        return []
    el, specs = torch.finfo(dtype).bits // 8, []
    shapes = list(dict.fromkeys(shape for rows in GLUON_ROWS.values() for shape in rows))
    for (S, H, D), mode in ((shape, mode) for shape in shapes for mode in ("fwd", "bwd", "fwd+bwd")):
        B = TOKENS // S
        variants = tuple(v for v, rows in GLUON_ROWS.items() if (S, H, D) in rows and mode in VARIANTS[v].modes)
        if variants:  # its own shape label: these opt-core rows repeat the earlier ones, read keyed by shape
            specs.append(Spec("attention", f"b{B}xs{S}xh{H}xd{D} causal (gluon A/B)", dtype, mode,
                              attention_bytes(B, H, S, D, el, mode), flops(B, H, S, D, mode),
                              ("opt-core",) + variants, "opt-core", "rest", ((B, S, H, D), dtype, "gluon")))
    return specs


def cases(device: torch.device, quick: bool, dtypes=(torch.bfloat16,), part: str = "all"):
    """Benchmark cases, built lazily: a GPU run holds one shape's tensors at a time."""
    for (shape, dtype, _), group in grouped(specs(Target.of(device), quick, dtypes, part)):
        yield from _cases_for(group, shape, dtype, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _ours(variant: str):
    """Our attention as a variant calls it (``-atomic``: the backward need not be deterministic)."""
    deterministic = not variant.endswith("-atomic")
    return lambda q_, k_, v_: functional.attention(q_, k_, v_, causal=True, deterministic=deterministic)


def _cases_for(group, shape, dtype, device):
    B, S, H, D = shape
    q, k, v = (torch.randn(B, S, H, D, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, S, H, D, dtype=dtype, device=device)
    providers = {"opt-core": lambda q_, k_, v_: functional.attention(q_, k_, v_, causal=True)}
    for name, backend in _sdpa_backends(device, dtype, D).items():
        providers[name] = _sdpa(backend)
    leaves = (q, k, v)
    for spec in group:
        wrapped = {}
        for name, fn in providers.items():
            try:
                wrapped[name] = mode_runner(spec.mode, fn, leaves, (dout,))
            except Exception as e:  # bwd runs the forward now: a failure is reported when timed
                wrapped[name] = _failing(e)
        for name in (n for n in spec.providers if n in VARIANTS):
            wrapped[name] = VARIANTS[name].runner(
                _attention_module, lambda mode=spec.mode, fn=_ours(name): mode_runner(mode, fn, leaves, (dout,)))
        yield dataclasses.replace(spec.case(wrapped, leaves), baseline=_baseline(wrapped))
