"""ReLU-MLP: smoke check and benchmark cases for the bench suite.

The block, ``residual + dropout(fc2(relu(fc1(x))))`` with dropout 0.1, against
the unfused PyTorch sequence (``F.linear``, ``relu``, ``F.dropout``, add; the
baseline), forward and forward+backward.  Each of our six GEMM kernels (with
its fused epilogue) against ``torch.matmul`` alone on the same operand views
(cuBLAS on a GPU).  On sm_90 and newer, ours with a switch of
``kernels/relu_mlp.py`` set are A/B providers (``VARIANTS``):
``opt-core-no-tma`` (the TMA loads off) and ``opt-core-no-persistent`` (the
persistent TMA-store configs kept from the tuner: what they buy), at the 6.7B
width, and the second at OPT-125M's width too (768: 12 K-steps per tile, where
an unoverlapped epilogue costs most); more rows mean more autotuning
compiles.  ``opt-core-gluon`` (the Gluon ping-pong GEMMs, ``GLUON = "on"``)
has never yet run on a GPU: proven against float64 in the smoke stage first
(``prove``; timed only where that passed), its rows (the block and each GEMM
at widths 768 and 4096, against our Triton kernels) come after every other
row of the op.  FLOPs count 2*M*d*ffn per
GEMM: 2 in the forward, 4 in the backward.  The goal (timed first): the block
at OPT-1.3B's and 6.7B's widths (2048, 4096), 16k tokens.

Bytes a fused block cannot avoid (M tokens, width d, ffn = 4d, element size
e): the forward reads x, the residual and both weights, writes out and writes
h once and reads it back, e(3Md + 2d*ffn + 2M*ffn); the backward reads dy, x
and h, writes dx and the weight gradients and writes dh and reads it twice,
e(3Md + 4d*ffn + 4M*ffn).  A GEMM reads both operands and writes its output
once: e(rows*inner + inner*cols + rows*cols).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from opt_core import functional
from bench.harness import Spec, Target, Variant, add_variants, grouped, mode_runner, selected, switched
from opt_core.kernels import reference
from opt_core.kernels.testing import FORWARD_FACTOR, GRADIENT_FACTOR, Comparison, compare

from opt_core.kernels import relu_mlp as mlp

OPT_WIDTHS = (768, 2048, 2560, 4096, 5120, 12288)
TOKENS = 16384
DROPOUT = 0.1
NAMES = ("out", "dx", "dfc1_weight", "dfc1_bias", "dfc2_weight", "dfc2_bias", "dresidual")


# --------------------------------------------------------------------------- correctness
def _inputs(M, d, dtype, device):
    # x, fc1's weight and bias are dyadic numbers whose products and sums are
    # exact in fp32, so every implementation agrees on the sign ReLU sees (see
    # tests/test_relu_mlp.py); fc2, the residual and the gradients are Gaussian.
    ffn = 4 * d
    scale = 2.0 ** math.ceil(math.log2(19 * math.sqrt(d)))
    x = torch.randint(-8, 9, (M, d)) / 8.0
    w1 = torch.randint(-32, 33, (ffn, d)) / scale
    b1 = torch.randint(-16, 17, (ffn,)) / 32.0
    w2 = torch.randn(d, ffn) / math.sqrt(ffn)
    b2 = torch.randn(d) * 0.5
    r = torch.randn(M, d)
    return [t.to(dtype=dtype, device=device) for t in (x, w1, b1, w2, b2, r)]


def smoke(device: torch.device) -> list[Comparison]:
    """The block's output and every gradient against float64, bf16 and fp16, through the TMA descriptors
    (sm_90; the interpreter's descriptor path on the CPU) and through pointers."""
    M, d = (33, 96) if device.type == "cpu" else (333, 1000)
    descriptors = "on" if device.type == "cpu" else "auto"
    results = []
    for dtype in (torch.bfloat16, torch.float16):
        for tma in (descriptors, "off"):
            with switched(mlp, "TMA", tma):
                results += [dataclasses.replace(c, name=f"{c.name} TMA={tma}") for c in _check_one(M, d, dtype, device)]
    return results


def _check_one(M, d, dtype, device) -> list[Comparison]:
    base = _inputs(M, d, dtype, device)
    seed = 1234
    mask = mlp.dropout_mask(seed, DROPOUT, (M, d), device)
    dy = torch.randn(M, d, dtype=torch.float64, device=device)

    def run(fn, cast=None):
        xs = [t.detach().to(cast or t.dtype).requires_grad_(True) for t in base]
        out = fn(*xs)
        out.backward(dy.to(out.dtype))
        return [out] + [t.grad for t in xs]

    ours = run(lambda x, w1, b1, w2, b2, r: functional.relu_mlp(x, w1, b1, w2, b2, residual=r, dropout_p=DROPOUT,
                                                             seed=seed))
    oracle = run(lambda x, w1, b1, w2, b2, r: reference.relu_mlp(x, w1, b1, w2, b2, r, mask, DROPOUT), torch.float64)
    plain = run(lambda x, w1, b1, w2, b2, r: F.linear(F.linear(x, w1, b1).relu(), w2, b2) * mask.to(dtype)
                * (1.0 / (1.0 - DROPOUT)) + r)
    tag = f"relu_mlp ({M}, {d}) {str(dtype).replace('torch.', '')}"
    return [
        compare(f"{tag} {name}", o, rf, p, factor=FORWARD_FACTOR if i == 0 else GRADIENT_FACTOR)
        for i, (name, o, rf, p) in enumerate(zip(NAMES, ours, oracle, plain))
    ]


def prove(device: torch.device, variant: str) -> list[Comparison]:
    """The Gluon GEMMs (``variant``, never yet run on a GPU) against float64: the block's output and every
    gradient with all six GEMMs routed to them, bf16 and fp16, at odd sizes; raises where one of the
    block's GEMMs would fall back to Triton (the proof would not prove it)."""
    if variant != GLUON_VARIANT:
        raise ValueError(f"no proof for {variant!r}: the unproven variant is {GLUON_VARIANT!r}")
    results = []
    for (M, d), dtype in ((shape, dtype) for shape in PROOF_SHAPES for dtype in (torch.bfloat16, torch.float16)):
        missing = _gluon_declines(M, d, dtype, device)
        if missing:
            raise RuntimeError(f"{variant}: the Gluon GEMMs do not take {', '.join(missing)} at ({M}, {d}) {dtype}")
        check = VARIANTS[variant].runner(mlp, lambda: lambda: _check_one(M, d, dtype, device))
        results += [dataclasses.replace(c, name=f"{c.name} {variant}") for c in check()]
    return results


PROOF_SHAPES = ((333, 1000), (77, 200))  # (tokens, width): tiles cut at every edge


def _gluon_declines(M: int, d: int, dtype, device) -> list[str]:
    """The block's GEMMs (as relu_mlp's launches view their operands) the Gluon kernels would not take."""
    from opt_core.kernels import relu_mlp_gluon as gluon

    x, w1, b1, w2, b2, r = (torch.empty(s, dtype=dtype, device=device) for s in
                            ((M, d), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (M, d)))
    h, dh = (torch.empty(M, 4 * d, dtype=dtype, device=device) for _ in range(2))
    g, dx = (torch.empty(M, d, dtype=dtype, device=device) for _ in range(2))
    dw1, dw2 = torch.empty(4 * d, d, dtype=dtype, device=device), torch.empty(d, 4 * d, dtype=dtype, device=device)
    gemms = {"fc1": ((x, w1.t(), h), dict(bias=b1)), "fc2": ((h, w2.t(), g), dict(bias=b2, residual=r)),
             "dh": ((g, w2, dh), dict(h=h)), "dW2": ((g.t(), h, dw2), {}), "dx": ((dh, w1, dx), {}),
             "dW1": ((dh.t(), x, dw1), {})}
    return [name for name, (abc, epilogue) in gemms.items() if not gluon.supported(*abc, **epilogue)]


def proof_compiles(variant: str) -> dict:
    """What ``prove(variant)`` compiles (the plan's count): per dtype the block's five plain/epilogue GEMMs
    and dh, and the Triton dropout backward."""
    return {"relu_mlp_gluon.gemm_kernel": 2 * 5, "relu_mlp_gluon.dh_kernel": 2, "relu_mlp.dropout_bwd_kernel": 2}


# --------------------------------------------------------------------------- benchmark cases
GOAL_WIDTHS = (2048, 4096)  # OPT-1.3B and 6.7B
AB_WIDTH = 4096             # where the A/B providers are timed (sm_90)
VARIANTS = {v.name: v for v in (
    Variant("opt-core-no-tma", (("TMA", "off"),), why="pointer loads instead of TMA descriptors"),
    Variant("opt-core-no-persistent", (("PERSISTENT", "off"),), why="no persistent TMA-store configs"),
    Variant("opt-core-gluon", (("GLUON", "on"),), ("fwd", "fwd+bwd"), "the Gluon ping-pong GEMMs", unproven=True),
)}
VARIANT_WIDTHS = {"opt-core-no-tma": (AB_WIDTH,), "opt-core-no-persistent": (768, AB_WIDTH)}
# The Gluon GEMMs have never run on a GPU: proven against float64 in the smoke stage first (``prove``),
# their rows come after every other row of the op (a hang or a sticky CUDA error costs only them), at
# OPT-125M's width (where an unoverlapped epilogue costs most) and the A/B width.
GLUON_VARIANT = "opt-core-gluon"
GLUON_WIDTHS = (768, AB_WIDTH)


def block_bytes(M: int, d: int, element_size: int, mode: str) -> int:
    ffn = 4 * d
    fwd = 3 * M * d + 2 * d * ffn + 2 * M * ffn
    bwd = 3 * M * d + 4 * d * ffn + 4 * M * ffn
    return element_size * {"fwd": fwd, "fwd+bwd": fwd + bwd}[mode]


def block_flops(M: int, d: int, mode: str) -> int:
    gemm = 2 * M * d * 4 * d
    return {"fwd": 2 * gemm, "fwd+bwd": 6 * gemm}[mode]


def gemm_dims(M: int, d: int) -> dict[str, tuple[int, int, int]]:
    """(rows, cols, inner) of each GEMM kernel of the block, by case name."""
    ffn = 4 * d
    return {
        "fc1 (x@W1^T +b1, relu)": (M, ffn, d), "fc2 (h@W2^T +b2, dropout, +residual)": (M, d, ffn),
        "dh (g@W2, relu mask, db1)": (M, ffn, d), "dW2 (g^T@h)": (d, ffn, M), "dx (dh@W1)": (M, d, ffn),
        "dW1 (dh^T@x)": (ffn, d, M),
    }


def gemm_bytes(rows: int, cols: int, inner: int, element_size: int) -> int:
    return element_size * (rows * inner + inner * cols + rows * cols)


def _widths(target: Target, quick: bool) -> tuple[int, tuple, tuple]:
    """(tokens, goal widths, rest widths); every width's GEMM cases are in the rest."""
    if not target.gpu:
        return 64, (64,), ()
    rest = tuple(d for d in OPT_WIDTHS if d not in GOAL_WIDTHS)
    return TOKENS, GOAL_WIDTHS, (rest[0], rest[-1]) if quick else rest


def specs(target: Target, quick: bool, dtypes=(torch.bfloat16,), part: str = "all") -> list[Spec]:
    M, goal, rest = _widths(target, quick)
    out = []
    for dtype in dtypes:
        for d in goal + rest:
            ab = tuple(name for name, widths in VARIANT_WIDTHS.items()
                       if target.tma and dtype != torch.float32 and d in widths)
            p = "goal" if d in goal else "rest"
            out += _width_specs(M, d, dtype, p, ("opt-core", "torch-unfused") + ab, ("opt-core", "torch.matmul") + ab)
    for dtype in (d for d in dtypes if target.tma and target.gpu and d != torch.float32):
        for d in GLUON_WIDTHS:  # its own shape labels: these opt-core rows repeat the earlier ones
            out += [dataclasses.replace(s, shape=f"{s.shape} (gluon A/B)", baseline="opt-core")
                    for s in _width_specs(M, d, dtype, "gluon", ("opt-core", GLUON_VARIANT), ("opt-core", GLUON_VARIANT))]
    return selected(out, part)


def _width_specs(M: int, d: int, dtype, p: str, block_providers: tuple, gemm_providers: tuple) -> list[Spec]:
    """The block's rows (fwd, fwd+bwd) and each GEMM's at width d; ``p`` the pass ("goal" or "rest"; "gluon":
    the rest, in groups of their own)."""
    el = torch.finfo(dtype).bits // 8
    part = "rest" if p == "gluon" else p
    specs = [Spec("relu_mlp", f"{M}x{d}x{4 * d}", dtype, mode, block_bytes(M, d, el, mode), block_flops(M, d, mode),
                  block_providers, block_providers[1], part, ("block", M, d, dtype, p)) for mode in ("fwd", "fwd+bwd")]
    specs += [Spec(f"relu_mlp gemm {name}", f"{rows}x{cols}x{inner}", dtype, "fwd", gemm_bytes(rows, cols, inner, el),
                   2 * rows * cols * inner, gemm_providers, gemm_providers[1], "rest",
                   ("gemm", M, d, dtype, "gluon" if p == "gluon" else "rest"))
              for name, (rows, cols, inner) in gemm_dims(M, d).items()]
    return specs


def cases(device: torch.device, quick: bool, dtypes=(torch.bfloat16,), part: str = "all"):
    """Benchmark cases, built lazily: a GPU run holds one width's tensors at a time."""
    for (kind, M, d, dtype, _), group in grouped(specs(Target.of(device), quick, dtypes, part)):
        yield from (_block_cases if kind == "block" else _gemm_cases)(group, M, d, dtype, device)


def _block_cases(group, M, d, dtype, device):
    x, w1, b1, w2, b2, r = (t.requires_grad_(True) for t in _tensors(M, d, dtype, device))
    leaves = (x, w1, b1, w2, b2, r)
    dy = torch.randn(M, d, dtype=dtype, device=device)
    providers = {
        "opt-core": lambda: functional.relu_mlp(x, w1, b1, w2, b2, residual=r, dropout_p=DROPOUT),
        "torch-unfused": lambda: F.dropout(F.linear(F.relu(F.linear(x, w1, b1)), w2, b2), DROPOUT, training=True) + r,
    }
    for spec in group:
        runners = {k: mode_runner(spec.mode, f, (), (dy,)) for k, f in providers.items() if k in spec.providers}
        add_variants(runners, spec, VARIANTS, mlp,
                     lambda mode=spec.mode: mode_runner(mode, providers["opt-core"], (), (dy,)))
        yield spec.case(runners, leaves)


def _tensors(M, d, dtype, device):
    ffn = 4 * d
    x = torch.randn(M, d, dtype=dtype, device=device)
    w1 = torch.randn(ffn, d, dtype=dtype, device=device) / math.sqrt(d)
    b1 = torch.randn(ffn, dtype=dtype, device=device)
    w2 = torch.randn(d, ffn, dtype=dtype, device=device) / math.sqrt(ffn)
    b2 = torch.randn(d, dtype=dtype, device=device)
    r = torch.randn(M, d, dtype=dtype, device=device)
    return x, w1, b1, w2, b2, r


def _gemm_cases(group, M, d, dtype, device):
    """Each GEMM kernel of the block (epilogue included) vs torch.matmul on the same views (and, where the
    spec says, ours with TMA off)."""
    ffn = 4 * d
    with torch.no_grad():
        x, w1, b1, w2, b2, r = _tensors(M, d, dtype, device)
        h = torch.relu(F.linear(x, w1, b1))
        g = torch.randn(M, d, dtype=dtype, device=device)
        dh = torch.randn(M, ffn, dtype=dtype, device=device)
    out_md = torch.empty(M, d, dtype=dtype, device=device)
    out_mf = torch.empty(M, ffn, dtype=dtype, device=device)
    out_df = torch.empty(d, ffn, dtype=dtype, device=device)
    out_fd = torch.empty(ffn, d, dtype=dtype, device=device)
    seed = 0x5DEECE66D
    gemms = {
        # name: (ours, torch.matmul's operands, its output buffer)
        "fc1 (x@W1^T +b1, relu)": (lambda: mlp._launch_fc1(x, w1, b1, out_mf), (x, w1.t()), out_mf),
        "fc2 (h@W2^T +b2, dropout, +residual)": (
            lambda: mlp._launch_fc2(h, w2, b2, r, seed, DROPOUT, out_md), (h, w2.t()), out_md),
        "dh (g@W2, relu mask, db1)": (lambda: mlp._launch_dh(g, w2, h, out_mf, True), (g, w2), out_mf),
        "dW2 (g^T@h)": (lambda: mlp._launch_matmul(g.t(), h, out_df), (g.t(), h), out_df),
        "dx (dh@W1)": (lambda: mlp._launch_matmul(dh, w1, out_md), (dh, w1), out_md),
        "dW1 (dh^T@x)": (lambda: mlp._launch_matmul(dh.t(), x, out_fd), (dh.t(), x), out_fd),
    }
    for spec in group:
        ours, (a, b), out = gemms[spec.op.removeprefix("relu_mlp gemm ")]

        def theirs(a=a, b=b, out=out):
            return torch.matmul(a, b, out=out)
        runners = {k: f for k, f in (("opt-core", ours), ("torch.matmul", theirs)) if k in spec.providers}
        yield spec.case(add_variants(runners, spec, VARIANTS, mlp, lambda ours=ours: ours))
