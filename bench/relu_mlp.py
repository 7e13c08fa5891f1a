"""ReLU-MLP: correctness check and benchmark cases for the main job and the bench suite.

The block, ``residual + dropout(fc2(relu(fc1(x))))`` with dropout 0.1, against
the unfused PyTorch sequence (``F.linear``, ``relu``, ``F.dropout``, add; the
baseline), forward and forward+backward.  Each of our six GEMM kernels (with
its fused epilogue) against ``torch.matmul`` alone on the same operand views
(cuBLAS on a GPU).  On sm_90 and newer, ``opt-core-no-tma`` is ours with the
TMA loads switched off (``kernels.relu_mlp.TMA = "off"``), at the largest width
of the run only (more rows mean more autotuning compiles).  FLOPs count
2*M*d*ffn per GEMM: 2 in the forward, 4 in the backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from opt_core import functional
from bench.harness import Case, has_tma, mode_runner, with_switch
from opt_core.kernels import reference
from opt_core.kernels.testing import FORWARD_FACTOR, GRADIENT_FACTOR, Comparison, compare

from opt_core.kernels import relu_mlp as mlp

OPT_WIDTHS = (768, 2560, 5120, 12288)
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


def check(device: torch.device, quick: bool) -> list[Comparison]:
    """Forward and every gradient against float64, by the DESIGN.md rule."""
    if device.type == "cpu":  # interpreted: small, and GEMMs in fp16/fp32 only
        shapes, dtypes = [(33, 96)], (torch.float32, torch.float16)
    else:
        shapes = [(1023, 768), (333, 1000)] + ([] if quick else [(2048, 2560), (512, 5120)])
        dtypes = (torch.float32, torch.float16, torch.bfloat16)
    results = []
    for dtype in dtypes:
        for M, d in shapes:
            results += _check_one(M, d, dtype, device)
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


# --------------------------------------------------------------------------- benchmark cases
def cases(device: torch.device, quick: bool, dtypes=(torch.bfloat16,)):
    """Benchmark cases, built lazily: a GPU run holds one width's tensors at a time."""
    if device.type == "cuda":
        tokens, widths = TOKENS, OPT_WIDTHS
    else:
        tokens, widths = 64, (64,)
    if quick:
        widths = widths[:1] + widths[-1:] if len(widths) > 1 else widths
    for dtype in dtypes:
        for d in widths:
            ab = has_tma(device) and dtype != torch.float32 and d == widths[-1]
            yield from _block_cases(tokens, d, dtype, device, ab)
            yield from _gemm_cases(tokens, d, dtype, device, ab)


def _block_cases(M, d, dtype, device, ab=False):
    ffn = 4 * d
    x, w1, b1, w2, b2, r = (t.requires_grad_(True) for t in _tensors(M, d, dtype, device))
    leaves = (x, w1, b1, w2, b2, r)
    dy = torch.randn(M, d, dtype=dtype, device=device)
    providers = {
        "opt-core": lambda: functional.relu_mlp(x, w1, b1, w2, b2, residual=r, dropout_p=DROPOUT),
        "torch-unfused": lambda: F.dropout(F.linear(F.relu(F.linear(x, w1, b1)), w2, b2), DROPOUT, training=True) + r,
    }
    gemm_flops = 2 * M * d * ffn
    el = x.element_size()
    # Bytes a fused block cannot avoid: x, residual, out, both weights, and h
    # written once and read back; the backward also reads dy, x, h and writes dx,
    # dh (read twice) and the weight gradients.
    fwd_bytes = el * (3 * M * d + 2 * d * ffn + 2 * M * ffn)
    bwd_bytes = el * (3 * M * d + 4 * d * ffn + 4 * M * ffn)
    shape = f"{M}x{d}x{ffn}"

    for mode, nbytes, flops in (("fwd", fwd_bytes, 2 * gemm_flops), ("fwd+bwd", fwd_bytes + bwd_bytes, 6 * gemm_flops)):
        runners = {k: mode_runner(mode, f, (), (dy,)) for k, f in providers.items()}
        if ab:
            runners["opt-core-no-tma"] = with_switch(mlp, "TMA", "off",
                                                     lambda: mode_runner(mode, providers["opt-core"], (), (dy,)))
        yield Case("relu_mlp", shape, dtype, mode, nbytes, runners, "torch-unfused", flops=flops,
                   grad_to_none=list(leaves))


def _tensors(M, d, dtype, device):
    ffn = 4 * d
    x = torch.randn(M, d, dtype=dtype, device=device)
    w1 = torch.randn(ffn, d, dtype=dtype, device=device) / math.sqrt(d)
    b1 = torch.randn(ffn, dtype=dtype, device=device)
    w2 = torch.randn(d, ffn, dtype=dtype, device=device) / math.sqrt(ffn)
    b2 = torch.randn(d, dtype=dtype, device=device)
    r = torch.randn(M, d, dtype=dtype, device=device)
    return x, w1, b1, w2, b2, r


def _gemm_cases(M, d, dtype, device, ab=False):
    """Each GEMM kernel of the block (epilogue included) vs torch.matmul on the same views (and with ``ab``,
    ours with TMA off)."""
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
        # name: (ours, torch.matmul's operands, its output buffer, (rows, cols, inner))
        "fc1 (x@W1^T +b1, relu)": (lambda: mlp._launch_fc1(x, w1, b1, out_mf), (x, w1.t()), out_mf, (M, ffn, d)),
        "fc2 (h@W2^T +b2, dropout, +residual)": (
            lambda: mlp._launch_fc2(h, w2, b2, r, seed, DROPOUT, out_md), (h, w2.t()), out_md, (M, d, ffn)),
        "dh (g@W2, relu mask, db1)": (lambda: mlp._launch_dh(g, w2, h, out_mf, True), (g, w2), out_mf, (M, ffn, d)),
        "dW2 (g^T@h)": (lambda: mlp._launch_matmul(g.t(), h, out_df), (g.t(), h), out_df, (d, ffn, M)),
        "dx (dh@W1)": (lambda: mlp._launch_matmul(dh, w1, out_md), (dh, w1), out_md, (M, d, ffn)),
        "dW1 (dh^T@x)": (lambda: mlp._launch_matmul(dh.t(), x, out_fd), (dh.t(), x), out_fd, (ffn, d, M)),
    }
    el = x.element_size()
    for name, (ours, (a, b), out, (rows, cols, inner)) in gemms.items():
        def theirs(a=a, b=b, out=out):
            return torch.matmul(a, b, out=out)
        runners = {"opt-core": ours, "torch.matmul": theirs}
        if ab:
            runners["opt-core-no-tma"] = with_switch(mlp, "TMA", "off", lambda ours=ours: ours)
        yield Case(f"relu_mlp gemm {name}", f"{rows}x{cols}x{inner}", dtype, "fwd",
                   el * (rows * inner + inner * cols + rows * cols), runners, "torch.matmul",
                   flops=2 * rows * cols * inner)
