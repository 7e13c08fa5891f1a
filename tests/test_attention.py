"""Fused attention: numerics against float64, masking semantics, dropout, NaN,
errors, the OPT attention module, torch.library and torch.compile.

Under the CPU interpreter these run the real Triton kernels (see conftest.py),
with the interpreter's block shapes (forward 64x32, dK/dV 32 queries x 64 keys,
dQ 64x32), so the 128- and 200-long sequences span several blocks, a diagonal
and a ragged tail; test_other_block_shapes swaps in smaller and square ones.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from opt_core import functional
from opt_core.kernels import aot, dispatch, reference
from opt_core.kernels.testing import FORWARD_FACTOR, GRADIENT_FACTOR, assert_close_to_reference
from opt_core import FusedSelfAttention

from opt_core.kernels import attention as attn

LOWP = [torch.float16, torch.float32]


# --------------------------------------------------------------------------- helpers
def _qkv(B, Sq, Sk, H, D, dtype, device):
    q = torch.randn(B, Sq, H, D, dtype=dtype, device=device)
    k = torch.randn(B, Sk, H, D, dtype=dtype, device=device)
    v = torch.randn(B, Sk, H, D, dtype=dtype, device=device)
    return q, k, v


def _lengths(B, S):
    # batch 0 full, the others about 60% real (at least one key)
    return [S] + [max(1, math.ceil(0.6 * S) - b) for b in range(1, B)]


def _padding_mask(B, Sk, kind, device):
    """None, or a bool (B, Sk) mask with right or left padding (HF style)."""
    if kind == "none":
        return None
    mask = torch.zeros(B, Sk, dtype=torch.bool, device=device)
    for b, n in enumerate(_lengths(B, Sk)):
        if kind == "right":
            mask[b, :n] = True
        else:
            mask[b, Sk - n:] = True
    return mask


def _leaves(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in tensors]


def _run(fn, tensors, grad, dtype=None):
    """Forward and backward of ``fn`` on fresh leaves; (out, [dq, dk, dv]).
    ``grad`` None means ``out.sum().backward()``: autograd then hands the
    backward an expanded gradient with stride 0."""
    xs = _leaves(tensors, dtype)
    out = fn(*xs)
    if grad is None:
        out.sum().backward()
    else:
        out.backward(grad.to(out.dtype))
    return out, [x.grad for x in xs]


def _check(B, Sq, Sk, H, D, dtype, device, *, causal, pad="none", sum_grad=False, scale=None, deterministic=True):
    q, k, v = _qkv(B, Sq, Sk, H, D, dtype, device)
    mask = _padding_mask(B, Sk, pad, device)
    grad = None if sum_grad else torch.randn(B, Sq, H, D, dtype=torch.float64, device=device)

    ours, ours_g = _run(lambda *t: functional.attention(*t, causal=causal, softmax_scale=scale, key_padding_mask=mask,
                                                       deterministic=deterministic), (q, k, v), grad)
    ref, ref_g = _run(lambda *t: reference.attention(*t, causal, scale, mask), (q, k, v), grad, torch.float64)
    plain, plain_g = _run(lambda *t: reference.attention(*t, causal, scale, mask, upcast=False), (q, k, v), grad)

    assert ours.dtype == dtype and ours.shape == (B, Sq, H, D)
    assert_close_to_reference("out", ours, ref, plain, factor=FORWARD_FACTOR)
    for name, o, r, p in zip(("dq", "dk", "dv"), ours_g, ref_g, plain_g):
        assert o.dtype == dtype, name
        if Sk == 1 and name != "dv":
            _assert_single_key_gradient(name, o, q, k, v, grad, scale)
        else:
            assert_close_to_reference(name, o, r, p, factor=GRADIENT_FACTOR)
    return ours, ours_g


def _assert_single_key_gradient(name, g, q, k, v, grad, scale):
    """With one key the softmax is the constant 1, so dq = dk = 0 exactly, and
    plain PyTorch gets exactly 0 by cancellation (p * (g - g)).  The kernels form
    dS = P * (dP - delta) from two fp32 dot products of head_dim terms (dO.v on
    the tensor cores, rowsum(dO * O) separately), so dS is the rounding of their
    difference: |dP - delta| <= 2 * head_dim * eps32 * max|dO| * max|v| (a dot
    product's error bound, twice), and dq, dk are that times scale * max|k| (or
    max|q|), summed over at most seqlen_q rows for dk.  The DESIGN.md rule's
    floor is relative to the reference's magnitude, 0 here, so it cannot judge
    this case."""
    D, Sq = q.shape[-1], q.shape[1]
    scale = D ** -0.5 if scale is None else scale
    dout_max = 1.0 if grad is None else grad.abs().max().item()
    ds_bound = 2 * D * torch.finfo(torch.float32).eps * dout_max * v.double().abs().max().item()
    other = (k if name == "dq" else q).double().abs().max().item()
    rows = 1 if name == "dq" else Sq
    bound = rows * ds_bound * scale * other + torch.finfo(g.dtype).tiny
    assert g.double().abs().max().item() <= bound, f"{name} with one key: {g.abs().max().item():.3e} > {bound:.3e}"


# --------------------------------------------------------------------------- numerics
SEQLENS = [(1, 1), (17, 17), (128, 128), (200, 200), (113, 203), (1, 239)]
HEAD_DIMS = [64, 80, 128, 111]
# The full cross of sequence lengths x causal x padding x dtype (72 cases), with
# head_dim cycling through 64, 80, 128 and the odd 111 (it changes every second
# case, dtype every case), so each head dim meets every value of every other
# factor; heads are 2 or 3, changing every eighth case.
MATRIX = [
    (seqlens, causal, pad, dtype, HEAD_DIMS[(i // 2) % len(HEAD_DIMS)], 2 + (i // 8) % 2)
    for i, (seqlens, causal, pad, dtype) in enumerate(
        itertools.product(SEQLENS, (True, False), ("none", "left", "right"), LOWP))
]


@pytest.mark.parametrize(
    "seqlens, causal, pad, dtype, D, H", MATRIX,
    ids=[f"{sq}x{sk}-{'causal' if c else 'full'}-{p}-{str(dt)[6:]}-D{d}-H{h}"
         for (sq, sk), c, p, dt, d, h in MATRIX],
)
def test_matches_float64_reference(seqlens, causal, pad, dtype, D, H, device):
    Sq, Sk = seqlens
    _check(2, Sq, Sk, H, D, dtype, device, causal=causal, pad=pad)


@pytest.mark.parametrize("seqlens", [(203, 113), (239, 1)], ids=str)
@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_more_queries_than_keys(seqlens, dtype, device):
    # Causal with seqlen_q > seqlen_k: the first seqlen_q - seqlen_k queries see
    # no key (output 0, gradients 0).
    Sq, Sk = seqlens
    ours, (dq, _, _) = _check(2, Sq, Sk, 2, 59, dtype, device, causal=True)
    empty = Sq - Sk
    assert torch.equal(ours[:, :empty], torch.zeros_like(ours[:, :empty]))
    assert torch.equal(dq[:, :empty], torch.zeros_like(dq[:, :empty]))
    _check(2, Sq, Sk, 2, 59, dtype, device, causal=False)


@pytest.mark.parametrize("D, pad", [(64, "left"), (80, "right"), (128, "none"), (111, "left")])
def test_sum_backward_with_stride_zero_gradient(D, pad, device):
    _check(2, 75, 75, 2, D, torch.float16, device, causal=True, pad=pad, sum_grad=True)


def test_custom_softmax_scale(device):
    _check(2, 50, 70, 2, 64, torch.float32, device, causal=True, pad="right", scale=0.3)


@pytest.mark.parametrize("D", [16, 256])
def test_smallest_and_largest_head_dims(D, device):
    _check(1, 40, 40, 2, D, torch.float16, device, causal=True)


# Forward (BLOCK_M, BLOCK_N), dK/dV (BLOCK_M, BLOCK_N), dQ (BLOCK_M, BLOCK_N):
# query blocks smaller than key blocks, equal ones, and all small.
BLOCK_SHAPES = [
    ((16, 32), (32, 16), (16, 32)),
    ((32, 32), (32, 32), (32, 32)),
    ((16, 16), (16, 16), (16, 16)),
]


@pytest.mark.parametrize("shapes", BLOCK_SHAPES, ids=lambda s: "-".join(f"{m}x{n}" for m, n in s))
def test_other_block_shapes(shapes, device, monkeypatch):
    fwd, dkdv, dq = shapes
    for kind, tuner, (m, n) in (("fwd", attn._fwd, fwd), ("dkdv", attn._bwd_dkdv, dkdv), ("dq", attn._bwd_dq, dq)):
        monkeypatch.setattr(tuner, "configs", [attn._config(kind, m, n, 4, 1)])
        monkeypatch.setattr(tuner, "cache", {})
    _check(2, 93, 121, 2, 40, torch.float32, device, causal=True, pad="left")
    _check(2, 121, 93, 2, 40, torch.float32, device, causal=True, pad="right")


def test_lse_is_the_natural_log_sum_exp(device):
    q, k, v = _qkv(2, 70, 90, 2, 32, torch.float32, device)
    mask = _padding_mask(2, 90, "left", device)
    mask[1] = False  # every key of batch 1 padded: lse +inf
    _, lse = torch.ops.opt_core.attention_fwd(q, k, v, mask, True, 32 ** -0.5, 0.0, 0)
    expected = reference.attention_lse(q.double(), k.double(), True, 32 ** -0.5, mask)
    assert lse.dtype == torch.float32 and lse.shape == (2, 2, 70)
    assert torch.isinf(lse[1]).all() and (lse[1] > 0).all()
    torch.testing.assert_close(lse.double(), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- masking semantics
def test_bottom_right_causal_alignment(device):
    # seqlen_q < seqlen_k: query i sees keys 0 .. i + (Sk - Sq), so the last query
    # sees every key; a key only the last query sees must change only that row.
    q, k, v = _qkv(1, 4, 9, 1, 16, torch.float32, device)
    base = functional.attention(q, k, v, causal=True)
    v2 = v.clone()
    v2[:, 8] += 1.0
    moved = (functional.attention(q, k, v2, causal=True) - base).abs().amax(dim=(0, 2, 3))
    assert moved[:3].eq(0).all() and moved[3] > 0
    torch.testing.assert_close(base, reference.attention(q, k, v, True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sequence_alone(side, device):
    B, S, H, D = 3, 70, 2, 48
    lengths = [70, 41, 9]
    q, k, v = _qkv(B, S, S, H, D, torch.float32, device)
    mask = torch.zeros(B, S, dtype=torch.bool, device=device)
    spans = []
    for b, n in enumerate(lengths):
        span = slice(0, n) if side == "right" else slice(S - n, S)
        mask[b, span] = True
        spans.append(span)
    grad = torch.randn(B, S, H, D, device=device)
    for b, span in enumerate(spans):
        grad[b, ~mask[b]] = 0  # only real positions feed the loss
    out, (dq, dk, dv) = _run(lambda *t: functional.attention(*t, causal=True, key_padding_mask=mask), (q, k, v), grad)
    for b, span in enumerate(spans):
        alone = [t[b:b + 1, span] for t in (q, k, v)]
        out_b, (dq_b, dk_b, dv_b) = _run(lambda *t: functional.attention(*t, causal=True), alone, grad[b:b + 1, span])
        for name, padded, single in (("out", out, out_b), ("dq", dq, dq_b), ("dk", dk, dk_b), ("dv", dv, dv_b)):
            torch.testing.assert_close(padded[b:b + 1, span], single, rtol=1e-5, atol=2e-6, msg=name)
        pads = ~mask[b]
        assert torch.equal(dk[b, pads], torch.zeros_like(dk[b, pads]))
        assert torch.equal(dv[b, pads], torch.zeros_like(dv[b, pads]))
        if side == "left":  # padded queries see only padded keys: no key at all
            assert torch.equal(out[b, pads], torch.zeros_like(out[b, pads]))


def test_rows_that_see_no_key_are_zero_and_finite(device):
    B, Sq, Sk, H, D = 2, 40, 30, 2, 32
    q, k, v = _qkv(B, Sq, Sk, H, D, torch.float16, device)
    mask = torch.ones(B, Sk, dtype=torch.bool, device=device)
    mask[1] = False  # batch 1: every key padded
    grad = torch.randn(B, Sq, H, D, dtype=torch.float16, device=device)
    out, (dq, dk, dv) = _run(lambda *t: functional.attention(*t, causal=True, key_padding_mask=mask), (q, k, v), grad)
    for g in (out, dq, dk, dv):
        assert torch.isfinite(g).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(out[0, :Sq - Sk], torch.zeros_like(out[0, :Sq - Sk]))  # causal, Sq > Sk
    for g in (dq[1], dk[1], dv[1], dq[0, :Sq - Sk]):
        assert torch.equal(g, torch.zeros_like(g))


# --------------------------------------------------------------------------- determinism
def test_forward_and_backward_are_bitwise_repeatable(device):
    q, k, v = _qkv(2, 150, 150, 3, 64, torch.float16, device)
    mask = _padding_mask(2, 150, "right", device)
    grad = torch.randn(2, 150, 3, 64, dtype=torch.float16, device=device)
    runs = [_run(lambda *t: functional.attention(*t, key_padding_mask=mask, deterministic=True), (q, k, v), grad)
            for _ in range(2)]
    (o1, g1), (o2, g2) = runs
    assert torch.equal(o1, o2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- dropout
def test_dropout_same_seed_reproduces_other_seed_differs(device):
    q, k, v = _qkv(2, 60, 60, 2, 32, torch.float16, device)
    a = functional.attention(q, k, v, dropout_p=0.3, seed=1234)
    b = functional.attention(q, k, v, dropout_p=0.3, seed=1234)
    c = functional.attention(q, k, v, dropout_p=0.3, seed=1235)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, functional.attention(q, k, v))
    # No seed: drawn from torch's CPU generator, so manual_seed reproduces.
    torch.manual_seed(7)
    d = functional.attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(7)
    e = functional.attention(q, k, v, dropout_p=0.3)
    assert torch.equal(d, e)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_kept_fraction_within_three_sigma(p, device):
    B, H, Sq, Sk = 2, 3, 97, 131
    keep = attn.dropout_mask(99, p, B, H, Sq, Sk, device)
    assert keep.dtype == torch.bool and keep.shape == (B, H, Sq, Sk)
    n = keep.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep.float().mean().item() - (1 - p)) <= 3 * sigma
    # no visible structure: each (b, h) slice and each row position keeps about 1-p
    per_slice = keep.float().mean(dim=(2, 3))
    assert (per_slice - (1 - p)).abs().max() <= 4 * math.sqrt(p * (1 - p) / (Sq * Sk))


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("seqlens, pad", [((113, 203), "left"), ((130, 70), "right")], ids=str)
def test_dropout_matches_reference_with_the_same_mask(seqlens, pad, dtype, device):
    B, H, D, p, seed = 2, 2, 48, 0.2, 2 ** 40 + 17
    Sq, Sk = seqlens
    q, k, v = _qkv(B, Sq, Sk, H, D, dtype, device)
    mask = _padding_mask(B, Sk, pad, device)
    keep = attn.dropout_mask(seed, p, B, H, Sq, Sk, device, dtype)
    grad = torch.randn(B, Sq, H, D, dtype=torch.float64, device=device)

    def ours_fn(*t):
        return functional.attention(*t, causal=True, key_padding_mask=mask, dropout_p=p, seed=seed)

    ours, ours_g = _run(ours_fn, (q, k, v), grad)
    ref, ref_g = _run(lambda *t: reference.attention(*t, True, None, mask, keep, p), (q, k, v), grad, torch.float64)
    plain, plain_g = _run(lambda *t: reference.attention(*t, True, None, mask, keep, p, upcast=False), (q, k, v), grad)
    assert_close_to_reference("out", ours, ref, plain, factor=FORWARD_FACTOR)
    for name, o, r, pl in zip(("dq", "dk", "dv"), ours_g, ref_g, plain_g):
        assert_close_to_reference(name, o, r, pl, factor=GRADIENT_FACTOR)


# --------------------------------------------------------------------------- TMA descriptors
@pytest.fixture
def tma_on(monkeypatch, device):
    """The descriptor path (sm_90's TMA loads) under the interpreter or on Hopper; yields the list of the tensors each
    launch built a descriptor for, so a test can tell which path ran."""
    if not (dispatch.INTERPRET or dispatch.tma_enabled("auto", torch.empty(0, dtype=torch.float16, device=device),
                                                       "TMA")):
        pytest.skip("the descriptor path runs under the interpreter or on an sm_90+ GPU; this is neither")
    built = []
    make = attn._descriptor

    def counted(t):
        built.append(t)
        return make(t)

    monkeypatch.setattr(attn, "TMA", "on")
    monkeypatch.setattr(attn, "_descriptor", counted)
    yield built


TMA_CASES = [((113, 203), True, "left", 80, 3), ((200, 200), False, "right", 64, 2), ((1, 239), True, "none", 128, 2),
             ((128, 128), True, "none", 64, 2), ((17, 17), False, "left", 128, 3), ((203, 113), True, "right", 64, 2)]


def _descriptor_widths(D):
    """The head-dim widths of the descriptors a forward and a backward build, in order: each kernel's two
    streamed operands, then, where head_dim splits (48 = 32 + 16, 80 = 64 + 16), their tails."""
    tile, tail = attn.head_tiles(D)
    return [D, D, tail, tail] * 3 if tail else [D] * 6


@pytest.mark.parametrize("seqlens, causal, pad, D, H", TMA_CASES, ids=str)
def test_tma_descriptor_path_matches_float64_reference(seqlens, causal, pad, D, H, device, tma_on):
    """K/V (forward, dQ) and Q/dO (dK/dV) streamed through 4-D descriptors: the zero fill past seqlen must
    stand in for the masked loads exactly; head_dim 80 comes in a 64-wide and a 16-wide tile, each through
    a descriptor of its own."""
    Sq, Sk = seqlens
    _check(2, Sq, Sk, H, D, torch.float16, device, causal=causal, pad=pad)
    assert [t.shape[-1] for t in tma_on] == _descriptor_widths(D), "forward (k, v), dK/dV (q, dout), dQ (k, v)"


def test_tma_descriptor_path_with_dropout(device, tma_on):
    test_dropout_matches_reference_with_the_same_mask((113, 203), "left", torch.float16, device)
    assert [t.shape[-1] for t in tma_on] == _descriptor_widths(48)


def test_tma_path_equals_the_pointer_path(device, tma_on, monkeypatch):
    """Same loads, same arithmetic: the two paths agree bit for bit (a fused QKV tensor's strided views).
    Under the interpreter both run one fixed config; on a GPU the autotuner may pick other tiles per path."""
    if not dispatch.INTERPRET:
        pytest.skip("bitwise only with the interpreter's single config; GPUs autotune each path separately")
    qkv = torch.randn(2, 150, 3, 3, 64, dtype=torch.float16, device=device)  # (batch, seq, heads, 3, head_dim)
    q, k, v = qkv.unbind(3)
    mask = _padding_mask(2, 150, "left", device)
    grad = torch.randn(2, 150, 3, 64, dtype=torch.float64, device=device)
    runs = []
    for mode in ("on", "off"):
        monkeypatch.setattr(attn, "TMA", mode)
        runs.append(_run(lambda *t: functional.attention(*t, key_padding_mask=mask), (q, k, v), grad))
    assert len(tma_on) == 6
    (o1, g1), (o2, g2) = runs
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_tma_falls_back_where_the_layout_does_not_allow_it(device, tma_on, monkeypatch):
    # head_dim 111 in fp16: 222-byte row strides, not 16-byte multiples
    _check(1, 40, 40, 2, 111, torch.float16, device, causal=True)
    # a base 2 bytes past a 16-byte boundary
    k = torch.randn(1, 41 * 2 * 64 + 1, dtype=torch.float16, device=device)[:, 1:].view(1, 41, 2, 64)
    assert not attn._tma_usable(k)
    # fp32 multiplies on the FMA units with its operands in registers: no descriptors
    _check(1, 40, 40, 2, 64, torch.float32, device, causal=True)
    assert tma_on == []
    monkeypatch.setattr(attn, "TMA", "sometimes")
    with pytest.raises(ValueError, match="opt_core.kernels.attention.TMA must be one of"):
        functional.attention(*_qkv(1, 4, 4, 1, 16, torch.float16, device))


# --------------------------------------------------------------------------- sm_90's pointer path: one loop
@pytest.fixture
def one_loop(monkeypatch):
    """The loops sm_90 runs through pointers (no TMA: a layout TMA cannot describe, or TMA="off"): every
    block in one masked loop (split_masked with wgmma), here on any device; yields the dtypes of the
    launches that asked, so a test can tell they did."""
    asked = []

    def wgmma(x):
        asked.append(x.dtype)
        return True

    monkeypatch.setattr(attn, "_wgmma", wgmma)
    yield asked


ONE_LOOP_CASES = [((113, 203), True, "left", 80), ((200, 200), False, "right", 64), ((17, 17), True, "none", 111),
                  ((203, 113), True, "none", 128), ((1, 239), False, "left", 64)]


@pytest.mark.parametrize("seqlens, causal, pad, D", ONE_LOOP_CASES, ids=str)
def test_one_loop_pointer_path_matches_float64_reference(seqlens, causal, pad, D, device, one_loop):
    _check(2, *seqlens, 2, D, torch.float16, device, causal=causal, pad=pad)
    assert one_loop == [torch.float16] * 3, "the forward, dK/dV and dQ launches"


@pytest.mark.parametrize("causal", [True, False])
def test_one_loop_equals_the_split_loops(causal, device, monkeypatch):
    """The mask is a no-op on the blocks the split runs unmasked, so the two agree bit for bit (dropout and a
    padding mask included).  Under the interpreter both run one fixed config; a GPU tunes each apart."""
    if not dispatch.INTERPRET:
        pytest.skip("bitwise only with the interpreter's single config; GPUs autotune each loop separately")
    q, k, v = _qkv(2, 150, 203, 2, 64, torch.float16, device)
    mask = _padding_mask(2, 203, "left", device)
    grad = torch.randn(2, 150, 2, 64, dtype=torch.float64, device=device)
    runs = []
    for wgmma in (False, True):
        monkeypatch.setattr(attn, "_wgmma", lambda x, wgmma=wgmma: wgmma)
        runs.append(_run(lambda *t: functional.attention(*t, causal=causal, key_padding_mask=mask, dropout_p=0.2,
                                                         seed=2 ** 40 + 3), (q, k, v), grad))
    (o1, g1), (o2, g2) = runs
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_split_masked_per_kernel_and_path():
    """Where the loops split (sm_80, and the forward and dQ kernels on the TMA path) and where not."""
    assert all(attn.split_masked(kind, tma=False, wgmma=False) for kind in ("fwd", "dkdv", "dq"))
    assert not any(attn.split_masked(kind, tma=False, wgmma=True) for kind in ("fwd", "dkdv", "dq"))
    assert [attn.split_masked(kind, tma=True, wgmma=True) for kind in ("fwd", "dkdv", "dq")] == [True, False, True]
    assert attn.uses_wgmma(torch.bfloat16, 90) and attn.uses_wgmma(torch.float16, 90)
    assert not attn.uses_wgmma(torch.float32, 90) and not attn.uses_wgmma(torch.bfloat16, 80)
    assert not attn._wgmma(torch.empty(1, dtype=torch.float16))  # a CPU tensor: no wgmma


def test_head_tiles_and_where_they_split():
    """A power of two plus a power-of-two rest of at least 16 is held in two tiles, anything else in one
    padded tile; on sm_80's tensor cores only by tiles of at least 128 rows."""
    tiles = {D: attn.head_tiles(D) for D in (1, 16, 24, 48, 64, 72, 80, 96, 111, 128, 144, 192, 200, 256)}
    assert tiles == {1: (16, 0), 16: (16, 0), 24: (32, 0), 48: (32, 16), 64: (64, 0), 72: (128, 0), 80: (64, 16),
                     96: (64, 32), 111: (128, 0), 128: (128, 0), 144: (128, 16), 192: (128, 64), 200: (256, 0),
                     256: (256, 0)}
    assert all(attn.head_tiles(D)[1] == 0 or sum(attn.head_tiles(D)) == D for D in range(1, 257))
    assert attn.split_min_rows(torch.bfloat16, 80) == attn.split_min_rows(torch.float16, 86) == 128
    assert all(attn.split_min_rows(dtype, arch) == 0 for dtype, arch in ((torch.bfloat16, 90), (torch.float16, 90),
                                                                         (torch.float32, 80), (torch.float16, None)))
    assert [attn.config_head_tiles(64, 16, rows, 128, False) for rows in (64, 128)] == [(128, 0), (64, 16)]
    assert attn.config_head_tiles(64, 16, 64, 0, True) == (64, 16) == attn.config_head_tiles(64, 16, 256, 128, True)
    assert attn.config_head_tiles(128, 0, 32, 128, False) == (128, 0)
    with pytest.raises(ValueError, match="cannot take TMA"):
        attn.config_head_tiles(64, 16, 64, 128, True)


@pytest.mark.parametrize("rows", [64, 128])
def test_mma_sync_split_head_dim_by_tile_rows(rows, device, monkeypatch):
    """On sm_80's tensor cores (split_min_rows 128) head_dim 80 is two tiles in 128-row configs and one
    padded 128-wide tile in smaller ones; both against float64, the 128 rows of the dK/dV kernel keys."""
    monkeypatch.setattr(attn, "_arch", lambda x: 80)
    monkeypatch.setattr(attn, "TMA", "off")  # sm_80 has none (and a padded tile takes none)
    shapes = {"fwd": (rows, 32), "dkdv": (32, rows), "dq": (rows, 32)}
    for kind, tuner in (("fwd", attn._fwd), ("dkdv", attn._bwd_dkdv), ("dq", attn._bwd_dq)):
        monkeypatch.setattr(tuner, "configs", [attn._config(kind, *shapes[kind], 4, 1)])
        monkeypatch.setattr(tuner, "cache", {})
    _check(2, 200, 150, 2, 80, torch.float16, device, causal=True, pad="left")


# --------------------------------------------------------------------------- sm_90's new loops
@pytest.fixture
def specialized_forward(monkeypatch, tma_on):
    """The forward's warp-specialised loop (sm_90's TMA path) at the interpreter's block shape; yields the
    descriptors the launches built, as ``tma_on`` does."""
    if not dispatch.INTERPRET:
        pytest.skip("forces the interpreter's config; on a GPU WARP_SPECIALIZE='on' does (the gpu tests)")
    monkeypatch.setattr(attn._fwd, "configs", [attn._config("fwd", 64, 32, 4, 1, specialized=True)])
    monkeypatch.setattr(attn._fwd, "cache", {})
    yield tma_on


def _forward(q, k, v, mask, causal):
    return torch.ops.opt_core.attention_fwd(q, k, v, mask, causal, q.shape[-1] ** -0.5, 0.0, 0)


@pytest.mark.parametrize("seqlens, causal, pad, D, H", TMA_CASES, ids=str)
def test_specialized_forward_is_todays_loop_bit_for_bit(seqlens, causal, pad, D, H, device, specialized_forward,
                                                       monkeypatch):
    """One loop over every key block, each masked against the row's last key, q through a device-side
    descriptor: the same arithmetic as the unmasked/masked loop pair, so out and lse are bitwise the same,
    and so are the gradients computed from them (test_specialized_forward_with_gradients_and_dropout runs
    them)."""
    Sq, Sk = seqlens
    q, k, v = _qkv(2, Sq, Sk, H, D, torch.float16, device)
    mask = _padding_mask(2, Sk, pad, device)
    out, lse = _forward(q, k, v, mask, causal)
    ref = reference.attention(q.double(), k.double(), v.double(), causal, None, mask)
    assert_close_to_reference("out", out, ref, reference.attention(q, k, v, causal, None, mask, upcast=False),
                              factor=FORWARD_FACTOR)
    monkeypatch.setattr(attn._fwd, "configs", [attn._config("fwd", 64, 32, 4, 1)])
    monkeypatch.setattr(attn._fwd, "cache", {})
    out_plain, lse_plain = _forward(q, k, v, mask, causal)
    assert torch.equal(out, out_plain) and torch.equal(lse, lse_plain)


def test_specialized_forward_with_gradients_and_dropout(device, specialized_forward):
    _check(2, 113, 203, 2, 80, torch.float16, device, causal=True, pad="left")
    test_dropout_matches_reference_with_the_same_mask((130, 70), "right", torch.float16, device)
    assert [t.shape[-1] for t in specialized_forward] == _descriptor_widths(80) + _descriptor_widths(48)


def test_warp_specialize_switch(device, monkeypatch):
    q = torch.empty(1, 8, 1, 64, dtype=torch.float16, device=device)
    monkeypatch.setattr(attn, "WARP_SPECIALIZE", "on")
    assert attn._specialize_mode(q, tma=True) == "on"
    assert attn._specialize_mode(q, tma=False) == "off"
    assert attn._specialize_mode(q.new_empty(8 * 64 + 1)[1:].view(1, 8, 1, 64), tma=True) == "off"  # misaligned
    flags = dict(HEAD_DIM=128, HAS_KPM=False, HAS_DROPOUT=False, TMA=True)
    kept = {mode: [attn._shape(c) for c in attn.prune_fwd_configs(attn.FWD_CONFIGS, {}, **flags, SPECIALIZE=mode)]
            for mode in attn.SPECIALIZE_MODES}
    assert all(shape[-1] for shape in kept["on"]) and not any(shape[-1] for shape in kept["off"])
    assert kept["auto"] == kept["on"] + kept["off"]
    monkeypatch.setattr(attn, "WARP_SPECIALIZE", "sometimes")
    with pytest.raises(ValueError, match="opt_core.kernels.attention.WARP_SPECIALIZE must be one of"):
        attn._specialize_mode(q, tma=True)


# (seqlens, causal, pad, head_dim, deterministic): the fused dQ's geometry (the key blocks that visit a
# query block, the first that waits) at odd sizes, in both orders.
FUSED_DQ_CASES = [((1, 1), True, "none", 64, True), ((17, 17), False, "left", 111, False),
                  ((128, 128), True, "right", 80, True), ((200, 200), False, "none", 64, True),
                  ((113, 203), True, "left", 128, False), ((203, 113), True, "right", 64, True),
                  ((1, 239), False, "none", 128, True)]


@pytest.fixture
def fused_dq(monkeypatch):
    monkeypatch.setattr(attn, "FUSED_DQ", True)


@pytest.mark.parametrize("seqlens, causal, pad, D, deterministic", FUSED_DQ_CASES, ids=str)
def test_fused_dq_matches_float64_reference(seqlens, causal, pad, D, deterministic, device, fused_dq):
    """dQ added up by the dK/dV kernel (5 products)."""
    Sq, Sk = seqlens
    _check(2, Sq, Sk, 2, D, torch.float16, device, causal=causal, pad=pad, deterministic=deterministic)


def test_fused_dq_leaves_dk_dv_bit_for_bit(device, monkeypatch):
    """The dK/dV kernel's own arithmetic is that of the 7-product path, its programs in another order."""
    seed = torch.randint(0, 2 ** 31, ()).item()  # the same fresh inputs for both paths
    grads = []
    for fused in (True, False):
        monkeypatch.setattr(attn, "FUSED_DQ", fused)
        torch.manual_seed(seed)
        grads.append(_check(2, 70, 90, 2, 64, torch.float16, device, causal=True, pad="right")[1])
    (_, dk, dv), (_, dk_7, dv_7) = grads
    assert torch.equal(dk, dk_7) and torch.equal(dv, dv_7)


def test_fused_dq_with_dropout_and_other_block_shapes(device, fused_dq, monkeypatch):
    test_dropout_matches_reference_with_the_same_mask((130, 70), "right", torch.float16, device)
    # Several key blocks per query block (each waits from its first), and several query blocks per key block.
    for (m, n), seqlens, pad in (((32, 16), (45, 61), "left"), ((16, 32), (61, 45), "right")):
        monkeypatch.setattr(attn._bwd_dkdv, "configs", [attn._config("dkdv", m, n, 4, 1)])
        monkeypatch.setattr(attn._bwd_dkdv, "cache", {})
        _check(2, *seqlens, 2, 40, torch.float16, device, causal=True, pad=pad)


def test_fused_dq_applies_where_its_table_has_a_shape(device, monkeypatch):
    q = torch.empty(1, 8, 1, 128, dtype=torch.bfloat16, device=device)
    flags = dict(HEAD_DIM=128, HAS_KPM=False, HAS_DROPOUT=False, SPLIT_MIN_ROWS=0)
    assert not attn._fused_dq(q, flags, tma=True)  # the switch is off
    monkeypatch.setattr(attn, "FUSED_DQ", True)
    assert not attn._fused_dq(q.float(), flags, tma=True)
    assert not attn._fused_dq(q.new_empty(1, 8, 1, 256), dict(flags, HEAD_DIM=256), tma=True)
    assert not attn._fused_dq(q.new_empty(1, 8, 1, 192), dict(flags, HEAD_DIM=192), tma=True)  # 128 + 64
    assert not attn._fused_dq(q, dict(flags, SPLIT_MIN_ROWS=128), tma=False)  # mma.sync
    monkeypatch.setattr(dispatch, "INTERPRET", False)  # a GPU's launch: only the table's shapes
    assert attn._fused_dq(q, flags, tma=True)
    assert not attn._fused_dq(q, flags, tma=False) and not attn._fused_dq(q, dict(flags, HAS_KPM=True), tma=True)
    monkeypatch.setattr(attn, "FUSED_DQ", "yes")
    with pytest.raises(TypeError, match="opt_core.kernels.attention.FUSED_DQ must be a bool"):
        attn._fused_dq(q, flags, tma=True)


def test_default_forward_configs_overlap_the_softmax_with_a_product():
    """The forward config sm_90 runs untuned (the first its prune keeps on the TMA path, what
    OPT_CORE_TUNING=first runs) at OPT's head dims: the softmax overlaps a wgmma (the warp-specialised loop,
    or a product left in flight across it), no spills, shared memory within the limit (AOT, no GPU)."""
    script = ("import json; from opt_core.kernels import aot, aot_cases; "
              "cases = aot_cases.attention_default_forward_cases(); "
              "print(json.dumps(aot.compile_all(cases, archs=(90,), workers=1)))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["case"].split(",")[0] for r in results] == [f"attention_fwd[D={d}" for d in (64, 80, 128)]
    for r in results:
        assert not aot.problems(r), (r["case"], aot.problems(r))
        assert r["warp_specialized"] or (r["wgmma_max_pending"] or 0) >= 1, r


def test_no_sm90_kernel_has_its_wgmmas_serialised(aot_compile):
    """Every sm_90 case of the forward, dK/dV and dQ kernels (both paths, causal and not, every config the
    tuner may pick): ptxas keeps its wgmmas asynchronous as written, no C7515/C7517 note.  Loops split in a
    masked and an unmasked one had every wgmma serialised (C7515) in the dK/dV kernel, and in all three
    through pointers; there they are one loop (split_masked)."""
    results = [r for (name, arch), r in aot_compile("attention_").items()
               if arch == 90 and name.startswith(("attention_fwd[", "attention_dkdv[", "attention_dq["))]
    assert {r["case"].split("[")[0] for r in results} == {"attention_fwd", "attention_dkdv", "attention_dq"}
    paths = collections.Counter(("tma" if ",tma," in r["case"] else "pointer", ",noncausal," in r["case"])
                                for r in results)
    assert paths[("tma", False)] >= 50 and paths[("pointer", False)] >= 50, paths
    assert paths[("tma", True)] and paths[("pointer", True)], paths
    serialised = [(r["case"], r["wgmma_notes"]) for r in results if r["wgmma_serialized"]]
    assert not serialised, serialised


# --------------------------------------------------------------------------- NaN
def _sdpa_math(q, k, v, causal, mask):
    """PyTorch's math SDPA with the equivalent boolean attn_mask, in our layout."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    visible = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
    if causal:
        visible = torch.arange(Sk, device=q.device)[None, :] <= torch.arange(Sq, device=q.device)[:, None] + Sk - Sq
    visible = visible[None, None].expand(B, 1, Sq, Sk)
    if mask is not None:
        visible = visible & mask[:, None, None, :]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=visible)
    return out.transpose(1, 2)


@pytest.mark.parametrize("causal, pad", [(True, "none"), (True, "right"), (False, "left")])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_lands_where_sdpa_puts_it(where, causal, pad, device):
    # q: a row that sees keys; k, v: a key every query sees (the first real key).
    # There the kernels and the math SDPA agree exactly.
    B, S, H, D = 2, 45, 2, 32
    q, k, v = _qkv(B, S, S, H, D, torch.float32, device)
    mask = _padding_mask(B, S, pad, device)
    first_real = 0 if pad != "left" else S - _lengths(B, S)[1]
    t = {"q": q, "k": k, "v": v}[where]
    t[1, 30 if where == "q" else first_real, 1, 5] = float("nan")
    ours = functional.attention(q, k, v, causal=causal, key_padding_mask=mask)
    theirs = _sdpa_math(q, k, v, causal, mask)
    assert ours.isnan().any()
    assert torch.equal(ours.isnan(), theirs.isnan())


def test_nan_semantics_where_sdpa_differs(device):
    # A NaN in k at a key only the last rows see reaches exactly those rows (the
    # math SDPA spreads it over the whole head); a row that sees no key stays 0
    # even when its q is NaN or a v in its tile is (the math SDPA gives NaN).
    B, S, H, D = 1, 100, 1, 16
    q, k, v = _qkv(B, S, S, H, D, torch.float32, device)
    k[0, 90, 0, 3] = float("nan")
    ours = functional.attention(q, k, v, causal=True)
    rows = ours[0, :, 0].isnan().any(-1)
    assert rows[90:].all() and not rows[:90].any()
    assert _sdpa_math(q, k, v, True, None).isnan().all()

    q2, k2, v2 = _qkv(1, 10, 6, 1, 16, torch.float32, device)
    q2[0, 1, 0, 0] = float("nan")  # causal, Sq > Sk: rows 0..3 see no key
    v2[0, 5, 0, 2] = float("nan")  # key 5: only row 9 sees it, rows 0..3 share its tile
    out = functional.attention(q2, k2, v2, causal=True)
    assert torch.equal(out[0, :4], torch.zeros_like(out[0, :4]))
    assert out[0, 9].isnan().any()


# --------------------------------------------------------------------------- strides, empties, paths
def test_strided_inputs(device):
    B, S, H, D = 2, 37, 3, 24
    qkv = torch.randn(B, S, 3, H, D, device=device)
    q, k, v = qkv.unbind(2)  # views into one fused QKV activation
    q_t = torch.randn(B, H, S, D, device=device).transpose(1, 2)  # (b, h, s, d) storage
    k_wide = torch.randn(B, S, H, 2 * D, device=device)[..., ::2]  # head_dim stride 2: copied
    assert not q.is_contiguous() and k_wide.stride(-1) == 2
    for args in ((q, k, v), (q_t, k_wide, v)):
        out = functional.attention(*args, causal=True)
        expected = reference.attention(*(t.double() for t in args), True)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(0, 5, 7, 2, 16), (2, 0, 7, 2, 16), (2, 5, 0, 2, 16), (2, 5, 7, 0, 16)])
def test_empty_inputs(shape, device):
    B, Sq, Sk, H, D = shape
    q, k, v = _qkv(B, Sq, Sk, H, D, torch.float16, device)
    xs = _leaves((q, k, v))
    out = functional.attention(*xs, causal=False)
    assert out.shape == (B, Sq, H, D)
    assert torch.equal(out, torch.zeros_like(out))  # Sk == 0: no key, zeros
    out.float().sum().backward()
    for x in xs:
        assert torch.equal(x.grad, torch.zeros_like(x))


def test_reference_backend_matches_kernel(device):
    q, k, v = _qkv(2, 45, 60, 2, 40, torch.float32, device)
    mask = _padding_mask(2, 60, "right", device)
    grad = torch.randn(2, 45, 2, 40, device=device)
    fn = lambda *t: functional.attention(*t, causal=True, key_padding_mask=mask)  # noqa: E731
    out, grads = _run(fn, (q, k, v), grad)
    with dispatch.reference_backend():
        out_r, grads_r = _run(fn, (q, k, v), grad)
    for a, b in zip([out] + grads, [out_r] + grads_r):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_float64_takes_the_reference_path_and_gradchecks(device):
    q, k, v = _qkv(1, 5, 6, 2, 4, torch.float64, device)
    mask = torch.tensor([[False, True, True, True, True, True]], device=device)
    torch.autograd.gradcheck(
        lambda *t: functional.attention(*t, causal=True, key_padding_mask=mask), _leaves((q, k, v)))


# --------------------------------------------------------------------------- errors
def test_bad_inputs_raise_named_errors():
    q, k, v = _qkv(2, 5, 6, 3, 8, torch.float32, "cpu")
    cases = [
        (lambda: functional.attention([1.0], k, v), TypeError, "q must be a torch.Tensor"),
        (lambda: functional.attention(q.long(), k, v), TypeError, "q must have dtype"),
        (lambda: functional.attention(q[0], k, v), ValueError, r"q must have 4 dimensions .*got shape \(5, 3, 8\)"),
        (lambda: functional.attention(q, k[..., None], v), ValueError, "k must have 4 dimensions"),
        (lambda: functional.attention(q, k.half(), v), TypeError, r"k must have the dtype of q"),
        (lambda: functional.attention(q, k, v.double()), TypeError, r"v must have the dtype of q"),
        (lambda: functional.attention(q, k[:1], v[:1]), ValueError, r"k must have shape \(batch, seqlen_k"),
        (lambda: functional.attention(q, k[:, :, :2], v), ValueError, r"k must have shape"),
        (lambda: functional.attention(q, k, v[:, :5]), ValueError, r"v must have the shape of k"),
        (lambda: functional.attention(q, k, v.to("meta")), ValueError, "v is on meta"),
        (lambda: functional.attention(q, k, v, causal=1), TypeError, "causal must be a bool"),
        (lambda: functional.attention(q, k, v, softmax_scale=-1.0), ValueError, "softmax_scale must be >= 0"),
        (lambda: functional.attention(q, k, v, softmax_scale="x"), TypeError, "softmax_scale must be a float"),
        (lambda: functional.attention(q, k, v, key_padding_mask=torch.ones(2, 6)), TypeError,
         "key_padding_mask must have dtype in \\(bool\\)"),
        (lambda: functional.attention(q, k, v, key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError,
         r"key_padding_mask must have shape \(batch, seqlen_k\) = \(2, 6\)"),
        (lambda: functional.attention(q, k, v, key_padding_mask=torch.ones(2, 6, dtype=torch.bool, device="meta")),
         ValueError, "key_padding_mask is on meta"),
        (lambda: functional.attention(q, k, v, dropout_p=1.0), ValueError, "dropout_p must be < 1"),
        (lambda: functional.attention(q, k, v, dropout_p=-0.1), ValueError, "dropout_p must be >= 0"),
        (lambda: functional.attention(q, k, v, dropout_p=0.1, seed=1.5), TypeError, "seed must be an int"),
        (lambda: functional.attention(q, k, v, dropout_p=0.1, seed=-1), ValueError, r"seed must be in \[0, 2\*\*63\)"),
        (lambda: functional.attention(q, k, v, deterministic=None), TypeError, "deterministic must be a bool"),
        (lambda: attn.dropout_mask(1, 1.5, 1, 1, 1, 1, "cpu"), ValueError, "dropout_p must be < 1"),
        (lambda: attn.dropout_mask(-3, 0.5, 1, 1, 1, 1, "cpu"), ValueError, r"seed must be in \[0, 2\*\*63\)"),
        (lambda: attn.dropout_mask(True, 0.5, 1, 1, 1, 1, "cpu"), TypeError, "seed must be an int"),
        (lambda: attn.dropout_mask(1, 0.5, 1, -1, 1, 1, "cpu"), ValueError, "heads must be a non-negative int"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


@pytest.mark.parametrize("D", [0, 257])
def test_unsupported_head_dim_is_rejected(D):
    q = torch.randn(1, 3, 2, D)
    with pytest.raises(ValueError, match=r"head_dim \(q.shape\[3\]\) must be between 1 and 256, got " + str(D)):
        functional.attention(q, q, q)


# --------------------------------------------------------------------------- module
def _hf_opt_attention(x, sd, num_heads, attention_mask):
    """Hugging Face OPT's eager attention (OPTAttention) in plain PyTorch: q
    scaled after its bias, additive causal + padding mask at the dtype's
    minimum, softmax in fp32, out projection.  Reference for the module."""
    B, S, E = x.shape
    Dh = E // num_heads
    q = F.linear(x, sd["q_proj.weight"], sd["q_proj.bias"]) * Dh ** -0.5
    k = F.linear(x, sd["k_proj.weight"], sd["k_proj.bias"])
    v = F.linear(x, sd["v_proj.weight"], sd["v_proj.bias"])
    q, k, v = (t.view(B, S, num_heads, Dh).transpose(1, 2) for t in (q, k, v))
    allowed = torch.tril(torch.ones(S, S, dtype=torch.bool, device=x.device))[None, None]
    allowed = allowed & attention_mask[:, None, None, :].bool()
    bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, torch.finfo(x.dtype).min)
    weights = torch.softmax((q @ k.transpose(-1, -2) + bias).float(), dim=-1).to(x.dtype)
    out = (weights @ v).transpose(1, 2).reshape(B, S, E)
    return F.linear(out, sd["out_proj.weight"], sd["out_proj.bias"])


def _hf_state_dict(E, device, dtype=torch.float32):
    return {f"{p}.{kind}": torch.randn((E, E) if kind == "weight" else (E,), device=device, dtype=dtype) * 0.2
            for p in ("q_proj", "k_proj", "v_proj", "out_proj") for kind in ("weight", "bias")}


def test_fused_self_attention_matches_hf_opt_attention(device):
    E, H, B, S = 96, 3, 2, 29
    sd = _hf_state_dict(E, device)
    module = FusedSelfAttention.from_hf_state_dict(sd, num_heads=H)
    assert module.head_dim == 32 and module.qkv_proj.weight.shape == (3 * E, E)
    attention_mask = torch.ones(B, S, dtype=torch.long, device=device)
    attention_mask[1, :11] = 0  # HF left padding
    x = torch.randn(B, S, E, device=device)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = module(x1, key_padding_mask=attention_mask)
    theirs = _hf_opt_attention(x2, {k: v.clone().requires_grad_() for k, v in sd.items()}, H, attention_mask)
    real = attention_mask.bool()  # HF's outputs at padded queries are not meaningful
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-4, atol=1e-5)
    g = torch.randn_like(ours) * real[..., None]
    ours.backward(g)
    theirs.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)


def test_fused_self_attention_state_dict_round_trip(device):
    sd = _hf_state_dict(64, device)
    module = FusedSelfAttention.from_hf_state_dict({"layers.0." + k: v for k, v in sd.items()}, num_heads=4,
                                                   prefix="layers.0.", dropout=0.1)
    back = module.hf_state_dict()
    assert back.keys() == sd.keys()
    for key in sd:
        assert torch.equal(back[key], sd[key]), key
    other = FusedSelfAttention(64, 4, device=device)
    other.load_hf_state_dict(back)
    for a, b in zip(other.state_dict().values(), module.state_dict().values()):
        assert torch.equal(a, b)
    no_bias = FusedSelfAttention(64, 4, bias=False, device=device)
    assert set(no_bias.hf_state_dict()) == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight"}
    with pytest.raises(KeyError, match="missing"):
        other.load_hf_state_dict({k: v for k, v in sd.items() if k != "v_proj.bias"})
    with pytest.raises(ValueError, match=r"q_proj.weight must have shape \(64, 64\)"):
        other.load_hf_state_dict(dict(sd, **{"q_proj.weight": torch.zeros(64, 63)}))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        FusedSelfAttention(64, 5)
    for sizes, name in (((0, 4), "embed_dim"), ((64, 0), "num_heads"), ((64, 4.0), "num_heads")):
        with pytest.raises(ValueError, match=f"{name} must be a positive int"):
            FusedSelfAttention(*sizes)
    for dropout, error, message in ((1.0, ValueError, "dropout must be < 1"), (float("nan"), ValueError, "finite"),
                                    (None, TypeError, "dropout must be a float")):
        with pytest.raises(error, match=message):
            FusedSelfAttention(64, 4, dropout=dropout)
    with pytest.raises(ValueError, match="hidden_states must have shape"):
        other(torch.randn(2, 3, 63, device=device))


def test_fused_self_attention_dropout_only_in_training(device):
    module = FusedSelfAttention(64, 4, dropout=0.5, device=device)
    x = torch.randn(2, 12, 64, device=device)
    module.eval()
    assert torch.equal(module(x), module(x))
    module.train()
    torch.manual_seed(0)
    a = module(x)
    torch.manual_seed(0)
    assert torch.equal(a, module(x))
    assert not torch.equal(a, module(x))
    module.eval()
    assert not torch.equal(a, module(x))


def test_against_transformers_opt_attention(device):
    modeling_opt = pytest.importorskip("transformers.models.opt.modeling_opt")
    from transformers import OPTConfig

    config = OPTConfig(hidden_size=64, num_attention_heads=4, attention_dropout=0.0, enable_bias=True)
    hf = modeling_opt.OPTAttention(config, layer_idx=0).to(device).eval()
    ours = FusedSelfAttention.from_hf_state_dict(hf.state_dict(), num_heads=4)
    x = torch.randn(2, 10, 64, device=device)
    padding = torch.ones(2, 10, dtype=torch.long, device=device)
    padding[1, :3] = 0  # left padding, as HF batches for generation
    allowed = torch.ones(10, 10, dtype=torch.bool, device=device).tril()[None, None] & padding.bool()[:, None, None]
    additive = torch.zeros(2, 1, 10, 10, device=device).masked_fill(~allowed, torch.finfo(x.dtype).min)
    expected = hf(x, attention_mask=additive)[0]
    real = padding.bool()
    torch.testing.assert_close(ours(x, key_padding_mask=padding)[real], expected[real], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- torch.library / compile
def test_opcheck():
    q, k, v = (t.requires_grad_() for t in _qkv(2, 9, 11, 2, 16, torch.float32, "cpu"))
    mask = _padding_mask(2, 11, "left", "cpu")
    for args in ((q, k, v, mask, True, 0.25, 0.0, 0), (q, k, v, None, False, 0.25, 0.0, 0)):
        torch.library.opcheck(torch.ops.opt_core.attention_fwd.default, args)
    out, lse = torch.ops.opt_core.attention_fwd(q, k, v, mask, True, 0.25, 0.0, 0)
    assert not lse.requires_grad
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.opt_core.attention_bwd.default,
                          (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, mask, True, 0.25, 0.0, 0))


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = FusedSelfAttention(48, 3)
        self.ln = torch.nn.LayerNorm(48)

    def forward(self, x, mask):
        return self.ln(x + self.attn(x, key_padding_mask=mask))


def test_torch_compile_fullgraph_has_no_graph_break():
    torch._dynamo.reset()
    block = _Block()
    x = torch.randn(2, 13, 48, requires_grad=True)
    mask = _padding_mask(2, 13, "right", "cpu")
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x, mask)
    out.sum().backward()
    x_eager = x.detach().clone().requires_grad_()
    expected = block(x_eager, mask)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_eager.grad, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("D", [64, 80, 128, 256])
@pytest.mark.parametrize("causal, pad", [(True, "none"), (True, "left"), (False, "right")])
def test_gpu_matches_float64_reference(D, dtype, causal, pad):
    _check(2, 1024, 1024, 4, D, dtype, torch.device("cuda"), causal=causal, pad=pad)
    _check(2, 777, 1031, 4, D, dtype, torch.device("cuda"), causal=causal, pad=pad)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 80, 128])
def test_gpu_pointer_path_where_tma_is_available(D, monkeypatch):
    """On sm_90 the tests above take the TMA path; this keeps the pointer path checked there too (its loops
    as sm_90 runs them: one masked loop per kernel, split_masked)."""
    monkeypatch.setattr(attn, "TMA", "off")
    _check(2, 777, 1031, 4, D, torch.bfloat16, torch.device("cuda"), causal=True, pad="left")


def _sm90():
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the warp-specialised forward and the fused dQ run on sm_90's TMA path")


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 80, 128])
def test_gpu_specialized_forward_matches_reference(D, monkeypatch):
    """The warp-specialised configs alone (the tuner picks among them): the compiler's partitions, which the
    interpreter does not run, against the float64 oracle; run these first on a new GPU or Triton."""
    _sm90()
    monkeypatch.setattr(attn, "WARP_SPECIALIZE", "on")
    _check(2, 777, 1031, 4, D, torch.bfloat16, torch.device("cuda"), causal=True)
    _check(2, 1024, 1024, 4, D, torch.bfloat16, torch.device("cuda"), causal=False, pad="left")


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 80, 128])
@pytest.mark.parametrize("deterministic", [True, False])
def test_gpu_fused_dq_matches_reference(D, deterministic, monkeypatch):
    _sm90()
    monkeypatch.setattr(attn, "FUSED_DQ", True)
    _check(2, 777, 1031, 4, D, torch.bfloat16, torch.device("cuda"), causal=True, deterministic=deterministic)
    _check(2, 1024, 1024, 4, D, torch.bfloat16, torch.device("cuda"), causal=False, deterministic=deterministic)


@pytest.mark.gpu
def test_gpu_fused_dq_in_order_is_bitwise_repeatable(monkeypatch):
    """The key blocks' turns fix the order of dQ's fp32 sums whatever the timing: run it a few times."""
    _sm90()
    monkeypatch.setattr(attn, "FUSED_DQ", True)
    q, k, v = _qkv(2, 2048, 2048, 8, 128, torch.bfloat16, torch.device("cuda"))
    grad = torch.randn_like(q)
    runs = [_run(lambda *t: functional.attention(*t, causal=True), (q, k, v), grad)[1] for _ in range(3)]
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_dropout_matches_reference(dtype):
    device = torch.device("cuda")
    B, H, S, D, p, seed = 2, 4, 513, 128, 0.1, 5
    q, k, v = _qkv(B, S, S, H, D, dtype, device)
    keep = attn.dropout_mask(seed, p, B, H, S, S, device, dtype)
    grad = torch.randn(B, S, H, D, dtype=torch.float64, device=device)
    ours, ours_g = _run(lambda *t: functional.attention(*t, dropout_p=p, seed=seed), (q, k, v), grad)
    ref, ref_g = _run(lambda *t: reference.attention(*t, True, None, None, keep, p), (q, k, v), grad, torch.float64)
    plain, plain_g = _run(lambda *t: reference.attention(*t, True, None, None, keep, p, upcast=False), (q, k, v), grad)
    assert_close_to_reference("out", ours, ref, plain, factor=FORWARD_FACTOR)
    for name, o, r, pl in zip(("dq", "dk", "dv"), ours_g, ref_g, plain_g):
        assert_close_to_reference(name, o, r, pl, factor=GRADIENT_FACTOR)


@pytest.mark.gpu
@pytest.mark.parametrize("S", [8192, 32768])
def test_gpu_long_sequences_use_linear_memory(S):
    device = torch.device("cuda")
    q, k, v = (t.requires_grad_() for t in _qkv(1, S, S, 8, 128, torch.bfloat16, device))
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = functional.attention(q, k, v, causal=True)
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    # inputs, output, their gradients and small fp32 row statistics: no S x S buffer
    linear = 16 * q.numel() * q.element_size()
    assert torch.cuda.max_memory_allocated() - before < linear
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
