"""ReLU-MLP: numerics against float64 (forward and every gradient), dropout,
saved memory, edge cases, errors, the module, torch.library and compile.

Under the CPU interpreter these run the real Triton kernels (see conftest.py);
GEMM-bearing kernels are tested in fp16 and fp32 here, bf16 on a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import triton

from opt_core import functional
from opt_core.kernels import aot_cases, dispatch, reference
from opt_core.kernels.testing import FORWARD_FACTOR, GRADIENT_FACTOR, assert_close_to_reference
from opt_core import ReLUMLP

from opt_core.kernels import relu_mlp as mlp
dropout_mask = mlp.dropout_mask

DTYPES = [torch.float16, torch.float32]
NAMES = ("out", "dx", "dfc1_weight", "dfc1_bias", "dfc2_weight", "dfc2_bias", "dresidual")


def _inputs(M, d, dtype, device, *, bias=True, residual=True, lead=(), gaussian=False):
    """(x, w1, b1, w2, b2, residual) for a block of width d, ffn = 4d.

    Unless ``gaussian``, x, fc1's weight and bias are small dyadic numbers whose
    products and sums are exact in fp32, so every implementation computes the
    same pre-activation exactly and agrees on the sign ReLU sees.  With
    Gaussian values a pre-activation within rounding distance of 0 can be
    positive in one implementation and not in another; the ReLU mask then
    passes a whole gradient element in one and zeroes it in the other, which
    no tolerance absorbs.  fc2 and the gradients stay Gaussian.
    """
    ffn = 4 * d
    scale = 2.0 ** math.ceil(math.log2(19 * math.sqrt(d)))  # weight std ~ 1/sqrt(d)
    if gaussian:
        x = torch.randn(*lead, M, d)
        w1 = torch.randn(ffn, d) / math.sqrt(d)
        b1 = torch.randn(ffn) * 0.5
    else:
        x = torch.randint(-8, 9, (*lead, M, d)) / 8.0
        w1 = torch.randint(-32, 33, (ffn, d)) / scale
        b1 = torch.randint(-16, 17, (ffn,)) / 32.0
    w2 = torch.randn(d, ffn) / math.sqrt(ffn)
    b2 = torch.randn(d) * 0.5
    r = torch.randn(*lead, M, d)
    tensors = [x, w1, b1 if bias else None, w2, b2 if bias else None, r if residual else None]
    return [None if t is None else t.to(dtype=dtype, device=device) for t in tensors]


def _leaves(tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(True) for t in tensors]


def _run(fn, tensors, grad):
    out = fn(*tensors)
    out.backward(grad.to(out.dtype) if grad.dim() else grad.to(out.dtype).expand(out.shape))
    return [out] + [None if t is None else t.grad for t in tensors]


def _ours(p, seed):
    def fn(x, w1, b1, w2, b2, r):
        return functional.relu_mlp(x, w1, b1, w2, b2, residual=r, dropout_p=p, seed=seed)
    return fn


def _oracle(mask, p):
    def fn(x, w1, b1, w2, b2, r):
        return reference.relu_mlp(x, w1, b1, w2, b2, r, mask, p)
    return fn


def _plain_torch(mask, p):
    # What an unfused PyTorch model computes in this precision, with the same mask.
    def fn(x, w1, b1, w2, b2, r):
        z = F.linear(F.linear(x, w1, b1).relu(), w2, b2)
        if mask is not None:
            z = z * mask.to(z.dtype) * (1.0 / (1.0 - p))
        return z + r if r is not None else z
    return fn


def _check_against_oracle(M, d, dtype, device, *, p=0.0, lead=(), bias=True, residual=True, sum_grad=False,
                          gaussian=False, forward_only=False):
    tensors = _inputs(M, d, dtype, device, bias=bias, residual=residual, lead=lead, gaussian=gaussian)
    shape = (*lead, M, d)
    seed = int(torch.randint(0, 2**62, ()))
    mask = dropout_mask(seed, p, shape, device) if p > 0 else None
    # .sum().backward() hands the backward an expanded (stride-0) gradient.
    grad = torch.ones((), dtype=torch.float64) if sum_grad else torch.randn(shape, dtype=torch.float64)
    grad = grad.to(device)
    if forward_only:
        with torch.no_grad():
            ours = _ours(p, seed)(*tensors)
            ref = _oracle(mask, p)(*[None if t is None else t.double() for t in tensors])
            pt = _plain_torch(mask, p)(*tensors)
        assert ours.dtype == dtype and ours.shape == torch.Size(shape)
        assert_close_to_reference("out", ours, ref, pt, factor=FORWARD_FACTOR)
        return

    ours = _run(_ours(p, seed), _leaves(tensors), grad)
    ref = _run(_oracle(mask, p), _leaves(tensors, torch.float64), grad)
    pt = _run(_plain_torch(mask, p), _leaves(tensors), grad)
    assert ours[0].dtype == dtype and ours[0].shape == torch.Size(shape)
    for i, (name, o, rf, pl) in enumerate(zip(NAMES, ours, ref, pt)):
        if rf is None:
            assert o is None, name
            continue
        assert o.dtype == dtype, name
        assert_close_to_reference(name, o, rf, pl, factor=FORWARD_FACTOR if i == 0 else GRADIENT_FACTOR)


# --------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 33, 128])
@pytest.mark.parametrize("d", [64, 96, 200])
def test_matches_float64_reference(d, M, dtype, p, device):
    # 200 (ffn 800) leaves a partial tile in N and in K of every GEMM under the interpreter's
    # 128x128x32 tiles, and several tiles per persistent program.
    _check_against_oracle(M, d, dtype, device, p=p)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_reductions_match_float64_reference(dtype, device):
    # Width 1000, ffn 4000: fc2 and dx reduce over 4000 products, fc1 and dh over 1000 (32 K steps, the
    # last one partial). One shape per dtype: under the interpreter each case costs ~15 s.
    _check_against_oracle(128, 1000, dtype, device, p=0.1)


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
def test_sum_backward_with_stride_zero_gradient(p, device):
    _check_against_oracle(31, 96, torch.float16, device, p=p, lead=(3,), sum_grad=True)


@pytest.mark.parametrize("bias, residual", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
def test_without_biases_or_residual(bias, residual, p, device):
    _check_against_oracle(150, 40, torch.float32, device, p=p, bias=bias, residual=residual)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_with_gaussian_inputs(dtype, device):
    # The forward has no ReLU-kink problem: a pre-activation near 0 gives h near 0 either way.
    _check_against_oracle(33, 200, dtype, device, p=0.1, gaussian=True, forward_only=True)


def test_leading_dimensions_and_an_odd_width(device):
    _check_against_oracle(5, 98, torch.float16, device, p=0.1, lead=(2, 7))


def test_strided_inputs(device):
    # Every operand a non-contiguous view: the kernels read them through their strides.
    M, d = 37, 48
    ffn = 4 * d
    x = torch.randn(d, M, device=device).t()
    w1 = torch.randn(d, ffn, device=device).t() / math.sqrt(d)
    b1 = torch.randn(2 * ffn, device=device)[::2]
    w2 = torch.randn(ffn, d, device=device).t() / math.sqrt(ffn)
    b2 = torch.randn(d, 3, device=device)[:, 1]
    r = torch.randn(M, 2 * d, device=device)[:, ::2]
    tensors = [x, w1, b1, w2, b2, r]
    assert not any(t.is_contiguous() for t in tensors)
    grad = torch.randn(M, d, dtype=torch.float64, device=device)
    mask = dropout_mask(7, 0.25, (M, d), device)
    ours = _run(_ours(0.25, 7), _leaves(tensors), grad)
    ref = _run(_oracle(mask, 0.25), _leaves(tensors, torch.float64), grad)
    for name, o, rf in zip(NAMES, ours, ref):
        torch.testing.assert_close(o.double(), rf, rtol=1e-4, atol=1e-4, msg=name)


def test_nan_and_inf_propagate_like_pytorch(device):
    # NaN in x reaches out through relu(NaN) = NaN; an fp16 overflow in GEMM 1
    # (inf activations) reaches the output and the gradients as PyTorch's does.
    M, d = 12, 32
    x, w1, b1, w2, b2, r = _inputs(M, d, torch.float16, device)
    x[2, 5] = float("nan")
    x[7] = 1000.0
    w1[3] = 8.0  # hidden unit 3 of token 7 is 256000: inf in fp16
    seed, p = 11, 0.1
    mask = dropout_mask(seed, p, (M, d), device)
    grad = torch.randn(M, d, dtype=torch.float64, device=device)
    ours = _run(_ours(p, seed), _leaves([x, w1, b1, w2, b2, r]), grad)
    theirs = _run(_plain_torch(mask, p), _leaves([x, w1, b1, w2, b2, r]), grad)
    assert ours[0].isnan()[2].all() and not ours[0].isfinite()[7].any()
    assert ours[0].isfinite()[[0, 1, 3, 4, 5, 6, 8, 9, 10, 11]].all()
    for name, o, t in zip(NAMES, ours, theirs):
        assert torch.equal(o.isnan(), t.isnan()), name
        assert torch.equal(o.isinf(), t.isinf()), name


def test_relu_keeps_nan_in_the_hidden_activation(device):
    x, w1, b1, w2, b2, _ = _inputs(3, 16, torch.float32, device)
    w1[5, 0] = float("nan")  # hidden unit 5 is NaN for every token
    _, h = torch.ops.opt_core.relu_mlp_fwd(x, w1, b1, w2, b2, None, torch.zeros((), dtype=torch.int64), 0.0)
    assert h[:, 5].isnan().all() and not h[:, :5].isnan().any() and not h[:, 6:].isnan().any()


def test_zero_rows(device):
    tensors = _leaves(_inputs(0, 32, torch.float32, device, lead=(3,)))
    out = functional.relu_mlp(*tensors[:5], residual=tensors[5], dropout_p=0.1)
    assert out.shape == (3, 0, 32)
    out.sum().backward()
    for t in tensors[1:5]:
        assert torch.equal(t.grad, torch.zeros_like(t))
    assert tensors[0].grad.shape == tensors[0].shape


def test_float64_takes_the_reference_path(device):
    x, w1, b1, w2, b2, r = _leaves(_inputs(4, 6, torch.float64, device))
    for p in (0.0, 0.3):  # a fixed seed makes dropout a fixed function
        torch.autograd.gradcheck(
            lambda *t: functional.relu_mlp(*t[:5], residual=t[5], dropout_p=p, seed=5), (x, w1, b1, w2, b2, r))


def test_reference_backend_matches_kernel(device):
    tensors = _inputs(45, 40, torch.float32, device)
    grad = torch.randn(45, 40, device=device, dtype=torch.float64)
    kernel = _run(_ours(0.2, 99), _leaves(tensors), grad)
    with dispatch.reference_backend():
        ref = _run(_ours(0.2, 99), _leaves(tensors), grad)
    for name, a, b in zip(NAMES, kernel, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_forward_and_backward_are_bitwise_repeatable(device):
    tensors = _inputs(70, 72, torch.float16, device)
    grad = torch.randn(70, 72, dtype=torch.float64, device=device)
    a = _run(_ours(0.1, 3), _leaves(tensors), grad)
    b = _run(_ours(0.1, 3), _leaves(tensors), grad)
    for name, x, y in zip(NAMES, a, b):
        assert torch.equal(x, y), name


# --------------------------------------------------------------------------- TMA descriptors
@pytest.fixture
def tma_on(monkeypatch, device):
    """The GEMMs' descriptor path (sm_90's TMA loads) under the interpreter or on Hopper; yields the (TMA, A_T, B_T)
    layout of every GEMM launched, so a test can tell which path each one took."""
    if not (dispatch.INTERPRET or dispatch.tma_enabled("auto", torch.empty(0, dtype=torch.float16, device=device),
                                                       "TMA")):
        pytest.skip("the descriptor path runs under the interpreter or on an sm_90+ GPU; this is neither")
    layouts = []
    operands = mlp._operands

    def recorded(a, b):
        A, B, layout = operands(a, b)
        layouts.append((layout["TMA"], layout["A_T"], layout["B_T"]))
        return A, B, layout

    monkeypatch.setattr(mlp, "TMA", "on")
    monkeypatch.setattr(mlp, "_operands", recorded)
    yield layouts


@pytest.fixture
def tma_stores(monkeypatch):
    """Whether each GEMM launched got its output's descriptor (TMA stores: the persistent configs)."""
    stores = []
    output = mlp._output

    def recorded(c, layout):
        desc, tma_store = output(c, layout)
        stores.append(tma_store)
        return desc, tma_store

    monkeypatch.setattr(mlp, "_output", recorded)
    yield stores


# fc1 (B = W1^T), fc2 (B = W2^T), dh, dW2 (A = g^T), dx, dW1 (A = dh^T): every operand orientation.
ALL_GEMMS_ON_TMA = [(True, False, True), (True, False, True), (True, False, False), (True, True, False),
                    (True, False, False), (True, True, False)]


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("M, d", [(1, 64), (33, 96), (128, 200), (150, 40)])
def test_tma_descriptor_path_matches_float64_reference(M, d, p, device, tma_on, tma_stores):
    """Tiles past M, N and K arrive as TMA's zeros instead of the pointer path's wrapped rows and masked K;
    the persistent loop walks several tiles per program (the interpreter counts 4 SMs) and its TMA stores
    clip the edge tiles."""
    _check_against_oracle(M, d, torch.float16, device, p=p)
    assert tma_on == ALL_GEMMS_ON_TMA
    assert tma_stores == [True] * 6


def test_tma_path_equals_the_pointer_path(device, tma_on, tma_stores, monkeypatch):
    """Zero-filled edge tiles and wrapped rows give the same products, and the persistent loop with TMA
    stores the same as one tile per program: bit for bit under the interpreter's single config (on a GPU
    the autotuner may pick other tiles per path)."""
    if not dispatch.INTERPRET:
        pytest.skip("bitwise only with the interpreter's single config; GPUs autotune each path separately")
    tensors = _inputs(70, 96, torch.float16, device)
    grad = torch.randn(70, 96, dtype=torch.float64, device=device)
    runs = []
    for tma, persistent in (("on", "auto"), ("on", "off"), ("off", "auto")):
        monkeypatch.setattr(mlp, "TMA", tma)
        monkeypatch.setattr(mlp, "PERSISTENT", persistent)
        runs.append(_run(_ours(0.1, 1234), _leaves(tensors), grad))
    assert tma_on[:12] == 2 * ALL_GEMMS_ON_TMA and not any(tma for tma, _, _ in tma_on[12:])
    assert tma_stores == [True] * 6 + [False] * 12
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(*runs))


def test_tma_falls_back_where_the_layout_does_not_allow_it(device, tma_on, tma_stores, monkeypatch):
    # d = 100 in fp16: x, g, W1 have 200-byte rows, not a multiple of 16 bytes; each GEMM decides for
    # itself, so only fc2 (h and W2, 800-byte rows) reads through TMA, and its output (200-byte rows)
    # takes pointer stores: no persistent configs.
    _check_against_oracle(20, 100, torch.float16, device)
    off = (False, False, False)
    assert tma_on == [off, (True, False, True), off, off, off, off]
    assert tma_stores == [False] * 6
    # fp32 (exact FMA, operands in registers) never takes it
    tma_on.clear()
    _check_against_oracle(20, 64, torch.float32, device)
    assert tma_on == [off] * 6
    monkeypatch.setattr(mlp, "TMA", "always")
    with pytest.raises(ValueError, match="opt_core.kernels.relu_mlp.TMA must be one of"):
        _ours(0.0, 0)(*_inputs(4, 16, torch.float16, device))
    monkeypatch.setattr(mlp, "TMA", "on")
    monkeypatch.setattr(mlp, "PERSISTENT", "always")
    with pytest.raises(ValueError, match="opt_core.kernels.relu_mlp.PERSISTENT must be one of"):
        _ours(0.0, 0)(*_inputs(4, 16, torch.float16, device))


# --------------------------------------------------------------------------- dropout
def test_dropout_mask_is_the_kernels_mask_forward_and_backward(device):
    # Without residual, out = dropout(z): exactly 0 where dropped, and with an
    # all-ones upstream gradient db2 = scale * (kept count per column), so both
    # the forward's mask and the backward's regenerated one are checked bitwise.
    # d = 98 leaves a partial group of four columns; 150 rows span two row tiles.
    M, d, p, seed = 150, 98, 0.3, 2**40 + 17
    x, w1, b1, w2, b2, _ = _leaves(_inputs(M, d, torch.float32, device))
    out = functional.relu_mlp(x, w1, b1, w2, b2, dropout_p=p, seed=seed)
    keep = dropout_mask(seed, p, (M, d), device)
    assert torch.equal(out != 0, keep)
    out.sum().backward()
    torch.testing.assert_close(b2.grad, keep.sum(0).float() / (1 - p), rtol=1e-6, atol=0)
    # The helper is reachable as the lead's API spells it.
    assert functional.relu_mlp_dropout_mask is dropout_mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kept_fraction_within_three_sigma(p, device):
    n = 256 * 1000
    kept = dropout_mask(123 + int(10 * p), p, (256, 1000), device).double().mean().item()
    assert abs(kept - (1 - p)) <= 3 * math.sqrt(p * (1 - p) / n)
    # and through the kernel
    x, w1, b1, w2, b2, _ = _inputs(96, 64, torch.float16, device)
    out = functional.relu_mlp(x, w1, b1, w2, b2, dropout_p=p, seed=5)
    frac = (out != 0).double().mean().item()
    assert abs(frac - (1 - p)) <= 3 * math.sqrt(p * (1 - p) / out.numel())


def test_dropout_reproducible_by_seed(device):
    x, w1, b1, w2, b2, r = _inputs(40, 64, torch.float16, device)

    def run(**kw):
        return functional.relu_mlp(x, w1, b1, w2, b2, residual=r, **kw)

    a, b = run(dropout_p=0.1, seed=42), run(dropout_p=0.1, seed=42)
    assert torch.equal(a, b)
    c = run(dropout_p=0.1, seed=43)
    assert not torch.equal(a, c)
    torch.manual_seed(7)
    d1 = run(dropout_p=0.1)
    torch.manual_seed(7)
    d2 = run(dropout_p=0.1)
    assert torch.equal(d1, d2) and not torch.equal(d1, run(dropout_p=0.1))
    # Dropout is off in eval mode and at p = 0, whatever the seed.
    plain = run(dropout_p=0.0)
    assert torch.equal(run(dropout_p=0.1, training=False), plain)
    assert torch.equal(run(dropout_p=0.0, seed=3), plain)


def test_dropout_mask_helper_matches_a_direct_philox_call(device):
    # The plain-PyTorch Philox against Triton's own, element by element.
    import triton
    import triton.language as tl

    @triton.jit
    def philox_words(OUT, seed, N: tl.constexpr):
        i = tl.arange(0, N)
        c0, c1, c2, c3 = tl.philox(seed, i, i * 3 + 1, 0, 0)
        tl.store(OUT + i, c0)
        tl.store(OUT + N + i, c1)
        tl.store(OUT + 2 * N + i, c2)
        tl.store(OUT + 3 * N + i, c3)

    if device.type != "cuda" and not dispatch.INTERPRET:
        pytest.skip("needs the interpreter or a GPU")
    seed = 0x1234_5678_9ABC_DEF0
    out = torch.empty(4 * 64, dtype=torch.int32, device=device)
    philox_words[(1,)](out, seed, N=64)
    i = torch.arange(64, dtype=torch.int64, device=device)
    words = mlp._philox4x32(seed, i, i * 3 + 1)
    assert torch.equal(out.view(4, 64).to(torch.int64) & 0xFFFFFFFF, torch.stack(words))


# --------------------------------------------------------------------------- memory
def _saved_bytes(fn, *args):
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(seen.values())


def test_saved_for_backward_per_token_is_below_unfused(device):
    """Per token, fp16, d = 64, ffn = 256, dropout 0.1: ours keeps x and the
    post-ReLU h (2d + 2*ffn = 640 bytes); the unfused sequence keeps x, h and the
    dropout mask (on the CPU an fp16 noise tensor, 768 bytes; on CUDA a bool
    mask, 704 bytes).  The weights are saved by both and cancel in the
    difference between two token counts."""
    d, ffn = 64, 256

    def per_token(fn):
        sizes = []
        for M in (16, 48):
            x, w1, b1, w2, b2, r = _leaves(_inputs(M, d, torch.float16, device))
            sizes.append(_saved_bytes(fn, x, w1, b1, w2, b2, r))
        return (sizes[1] - sizes[0]) / 32

    def ours(x, w1, b1, w2, b2, r):
        return functional.relu_mlp(x, w1, b1, w2, b2, residual=r, dropout_p=0.1)

    def unfused(x, w1, b1, w2, b2, r):
        return F.dropout(F.linear(F.linear(x, w1, b1).relu(), w2, b2), 0.1, training=True) + r

    ours_b, unfused_b = per_token(ours), per_token(unfused)
    assert ours_b == 2 * d + 2 * ffn
    assert unfused_b == (2 * d + 2 * ffn + (d if device.type == "cuda" else 2 * d))
    assert ours_b < unfused_b


# --------------------------------------------------------------------------- configs, AOT list
def test_config_pruning():
    half = mlp.prune_gemm_configs(mlp.GEMM_CONFIGS, dict(M=16384, N=3072), INPUT_PRECISION="tf32")
    assert half == mlp.HALF_CONFIGS
    fp32 = mlp.prune_gemm_configs(mlp.GEMM_CONFIGS, dict(M=16384, N=3072), INPUT_PRECISION="ieee")
    assert fp32 == mlp.FP32_CONFIGS
    for c in mlp.GEMM_CONFIGS:
        budget = mlp.TMA_SMEM_BUDGET if c in mlp.TMA_ONLY_CONFIGS + mlp.PERSISTENT_CONFIGS else mlp.SMEM_BUDGET
        assert mlp._smem_bytes(c, 4 if c in mlp.FP32_CONFIGS else 2) <= budget
    # sm_90's TMA path adds the 4-stage tiles only its shared memory holds; fp32 never takes it
    tma = mlp.prune_gemm_configs(mlp.GEMM_CONFIGS, dict(M=16384, N=3072), INPUT_PRECISION="tf32", TMA=True)
    assert tma == mlp.HALF_CONFIGS + mlp.TMA_ONLY_CONFIGS
    # with TMA stores the persistent configs join today's, for the autotuner to choose
    stores = mlp.prune_gemm_configs(mlp.GEMM_CONFIGS, dict(M=16384, N=3072), INPUT_PRECISION="tf32", TMA=True,
                                    TMA_STORE=True)
    assert stores == mlp.HALF_CONFIGS + mlp.TMA_ONLY_CONFIGS + mlp.PERSISTENT_CONFIGS
    assert all(c.kwargs["PERSISTENT"] for c in mlp.PERSISTENT_CONFIGS)
    assert not any(c.kwargs["PERSISTENT"] for c in mlp.HALF_CONFIGS + mlp.FP32_CONFIGS + mlp.TMA_ONLY_CONFIGS)
    tiny = mlp.prune_gemm_configs(mlp.GEMM_CONFIGS, dict(M=1, N=64), INPUT_PRECISION="tf32")
    assert all(c.kwargs["BLOCK_M"] == 64 for c in tiny) and tiny


def test_aot_cases_cover_every_gemm_at_the_opt_widths():
    cases = aot_cases.relu_mlp_cases()
    names = [c.name for c in cases]
    assert len(names) == len(set(names)) and len(cases) < 120
    for role in ("fc1", "fc2", "dh", "dx", "dw2+dw1", "dropout_bwd"):
        for dtype in ("bfloat16", "float16", "float32"):
            assert any(n.startswith(f"relu_mlp_{role}[d=768/2560/12288,{dtype},") for n in names), (role, dtype)
    assert all(c.tensor_cores for c in cases if "float32" not in c.name and "dropout_bwd" not in c.name)
    # The TMA path: every GEMM role, sm_90 only, descriptors for both operands, the 4-stage tiles included.
    tma = [c for c in cases if c.tma]
    for role in ("fc1", "fc2", "dh", "dx", "dw2+dw1"):
        assert any(c.name.startswith(f"relu_mlp_{role}[d=768/2560/12288,bfloat16,tma,") for c in tma), role
    assert all(c.archs == (90,) and c.signature["A"].startswith("tensordesc") for c in tma)
    assert any("128x256x64,w8,s4" in c.name for c in tma)
    # The persistent configs of every role: the output a descriptor too, and the compile check asserts
    # the TMA stores and the grid-strided tile loop in their PTX.
    persistent = [c for c in tma if c.constexprs["PERSISTENT"]]
    for role in ("fc1", "fc2", "dh", "dx", "dw2+dw1"):
        assert any(c.name.startswith(f"relu_mlp_{role}[d=768/2560/12288,bfloat16,tma,persistent,")
                   for c in persistent), role
    assert all(c.signature["OUT_DESC"].startswith("tensordesc") and c.constexprs["TMA_STORE"]
               and dict(c.expects) == {"tma_store": True, "persistent": True} for c in persistent)


# --------------------------------------------------------------------------- errors
def test_bad_inputs_raise_named_errors():
    x, w1, b1, w2, b2, r = _inputs(4, 8, torch.float32, torch.device("cpu"))

    def call(**kw):
        args = dict(x=x, fc1_weight=w1, fc1_bias=b1, fc2_weight=w2, fc2_bias=b2)
        args.update(kw)
        extra = {k: args.pop(k) for k in ("residual", "dropout_p", "training", "seed") if k in args}
        return functional.relu_mlp(args["x"], args["fc1_weight"], args["fc1_bias"], args["fc2_weight"],
                                args["fc2_bias"], **extra)

    cases = [
        (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
        (dict(x=x.long()), TypeError, "x must have dtype"),
        (dict(x=torch.randn(4, 0)), ValueError, "last dimension of at least 1"),
        (dict(fc1_weight=torch.randn(32)), ValueError, "fc1_weight must have at least 2"),
        (dict(fc1_weight=torch.randn(32, 9)), ValueError, r"fc1_weight must have shape \(32, 8\)"),
        (dict(fc2_weight=torch.randn(32, 8)), ValueError, r"fc2_weight must have shape \(8, 32\)"),
        (dict(fc1_bias=torch.randn(31)), ValueError, r"fc1_bias must have shape \(32,\)"),
        (dict(fc2_bias=torch.randn(8, 1)), ValueError, r"fc2_bias must have shape \(8,\)"),
        (dict(residual=torch.randn(4, 9)), ValueError, "residual must have shape"),
        (dict(fc1_weight=w1.half()), TypeError, "fc1_weight must have the dtype of x"),
        (dict(fc2_bias=b2.double()), TypeError, "fc2_bias must have the dtype of x"),
        (dict(residual=r.half()), TypeError, "residual must have the dtype of x"),
        (dict(fc2_weight=w2.to("meta")), ValueError, "fc2_weight is on meta"),
        (dict(dropout_p=1.0), ValueError, "dropout_p must be < 1"),
        (dict(dropout_p=-0.1), ValueError, "dropout_p must be >= 0"),
        (dict(dropout_p="0.1"), TypeError, "dropout_p must be a float"),
        (dict(training=1), TypeError, "training must be a bool"),
        (dict(seed=1.5), TypeError, "seed must be an int"),
        (dict(seed=True), TypeError, "seed must be an int"),
        (dict(seed=-1), ValueError, r"seed must be in \[0, 2\*\*63\)"),
        (dict(seed=2**63), ValueError, r"seed must be in \[0, 2\*\*63\)"),
    ]
    for kw, error, message in cases:
        with pytest.raises(error, match=message):
            call(**kw)
    for dropout, error, message in ((1.0, ValueError, "dropout must be < 1"), (-0.1, ValueError, "dropout must be >= 0"),
                                    ("0.1", TypeError, "dropout must be a float"),
                                    (True, TypeError, "dropout must be a float")):
        with pytest.raises(error, match=message):
            ReLUMLP(8, 32, dropout=dropout)
    for sizes, name in (((0, 32), "embed_dim"), ((8, 0), "ffn_dim"), ((8, -1), "ffn_dim"), ((8, 32.0), "ffn_dim"),
                        ((True, 32), "embed_dim")):
        with pytest.raises(ValueError, match=f"{name} must be a positive int"):
            ReLUMLP(*sizes)


# --------------------------------------------------------------------------- module
def test_relu_mlp_module_loads_hugging_face_opt_weights(device):
    # An OPT decoder layer's fc1/fc2 entries, named as Hugging Face names them.
    d, ffn = 48, 192
    hf_layer = torch.nn.ModuleDict({
        "fc1": torch.nn.Linear(d, ffn), "fc2": torch.nn.Linear(ffn, d),
        "final_layer_norm": torch.nn.LayerNorm(d),
    }).to(device)
    state = {k: v for k, v in hf_layer.state_dict().items() if k.startswith(("fc1.", "fc2."))}
    block = ReLUMLP(d, ffn, dropout=0.1, device=device)
    assert set(block.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    block.load_state_dict(state)
    block.eval()
    x, r = torch.randn(2, 5, d, device=device), torch.randn(2, 5, d, device=device)
    expected = r + hf_layer["fc2"](torch.relu(hf_layer["fc1"](x)))  # OPTDecoderLayer's MLP half, eval
    torch.testing.assert_close(block(x, r), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block(x), expected - r, rtol=1e-5, atol=1e-5)
    block.train()
    y = block(x, r)
    assert ((y - r).abs() < 1e-6).float().mean().item() > 0.02  # some outputs dropped to the residual


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # the kernels' path and the reference's
def test_output_is_a_fresh_tensor_not_a_view(dtype, device):
    """A module whose output is a view makes FSDP2 warn (an in-place op on it would drop FSDP2's hook)."""
    x, w1, b1, w2, b2, r = _inputs(6, 16, dtype, device, lead=(2,))
    for residual, p in ((r, 0.0), (None, 0.25)):
        out = functional.relu_mlp(x, w1, b1, w2, b2, residual=residual, dropout_p=p, training=True, seed=5)
        assert out._base is None and out.shape == x.shape


def test_relu_mlp_module_matches_transformers_opt_decoder_layer(device):
    transformers = pytest.importorskip("transformers")
    config = transformers.OPTConfig(hidden_size=32, ffn_dim=128, num_attention_heads=4, dropout=0.0,
                                    do_layer_norm_before=True, enable_bias=True)
    layer = transformers.models.opt.modeling_opt.OPTDecoderLayer(config, layer_idx=0).to(device).eval()
    block = ReLUMLP(32, 128, dropout=0.0, device=device)
    block.load_state_dict({k: v for k, v in layer.state_dict().items() if k.startswith(("fc1.", "fc2."))})
    h = torch.randn(3, 32, device=device)
    expected = h + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(h))))
    torch.testing.assert_close(block(layer.final_layer_norm(h), h), expected, rtol=1e-5, atol=1e-5)


def test_relu_mlp_module_under_autocast(device):
    block = ReLUMLP(32, 128, dropout=0.0, device=device)
    x = torch.randn(6, 32, device=device)
    r = torch.randn(6, 32, device=device)  # an fp32 residual stream
    with torch.autocast(device.type, dtype=torch.float16):
        y = block(x, r)
        mlp_only = block(x)
    assert mlp_only.dtype == torch.float16 and y.dtype == torch.float32
    torch.testing.assert_close(y, r + mlp_only.float())
    y.sum().backward()
    assert block.fc1.weight.grad.dtype == torch.float32 and block.fc2.bias.grad.dtype == torch.float32


# --------------------------------------------------------------------------- torch.library / compile
def test_opcheck():
    x, w1, b1, w2, b2, r = _leaves(_inputs(5, 24, torch.float32, torch.device("cpu")))
    seed = torch.tensor(77, dtype=torch.int64)
    for args in ((x, w1, b1, w2, b2, r, seed, 0.1), (x, w1, None, w2, None, None, seed, 0.0)):
        torch.library.opcheck(torch.ops.opt_core.relu_mlp_fwd.default, args)
    x3, r3 = (t.detach().reshape(1, 5, 24).requires_grad_() for t in (x, r))  # the op takes any leading dims
    torch.library.opcheck(torch.ops.opt_core.relu_mlp_fwd.default, (x3, w1, b1, w2, b2, r3, seed, 0.1))
    _, h = torch.ops.opt_core.relu_mlp_fwd(x, w1, b1, w2, b2, r, seed, 0.1)
    assert not h.requires_grad
    dy = torch.randn(5, 24)
    torch.library.opcheck(torch.ops.opt_core.relu_mlp_bwd.default,
                          (dy, x.detach(), w1.detach(), b1.detach(), w2.detach(), b2.detach(), h, seed, 0.1))


class _Block(torch.nn.Module):
    def __init__(self, d, dropout):
        super().__init__()
        self.ln = torch.nn.LayerNorm(d)
        self.mlp = ReLUMLP(d, 4 * d, dropout=dropout)

    def forward(self, x):
        return self.mlp(self.ln(x), x)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_torch_compile_fullgraph_has_no_graph_break(dropout):
    # The dropout seed is drawn with torch.randint inside the graph, so dropout
    # compiles too, and torch.manual_seed reproduces the eager run.
    torch._dynamo.reset()
    block = _Block(32, dropout)
    x = torch.randn(2, 5, 32, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    out = compiled(x)
    out.sum().backward()
    x_eager = x.detach().clone().requires_grad_()
    torch.manual_seed(3)
    expected = block(x_eager)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_eager.grad, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("M, d", [(4096, 768), (1000, 1000), (2048, 2560), (333, 5120)])
def test_gpu_large(M, d, dtype, p):
    _check_against_oracle(M, d, dtype, torch.device("cuda"), p=p)


@pytest.mark.gpu
@pytest.mark.parametrize("M, d", [(1000, 1000), (333, 5120)])
def test_gpu_pointer_path_where_tma_is_available(M, d, monkeypatch):
    """On sm_90 the tests above take the TMA path; this keeps the pointer path (sm_80's) checked there too."""
    monkeypatch.setattr(mlp, "TMA", "off")
    _check_against_oracle(M, d, torch.bfloat16, torch.device("cuda"), p=0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("config", range(len(mlp.PERSISTENT_CONFIGS)))
def test_gpu_persistent_configs_match_float64_reference(config, monkeypatch):
    """Every GEMM on one persistent config: the autotuner only ever checks the config it picks."""
    if not dispatch.tma_enabled("auto", torch.empty(0, dtype=torch.bfloat16, device="cuda"), "TMA"):
        pytest.skip("the persistent configs run on sm_90 and newer")
    for name in ("_fc", "_dh", "_matmul"):
        kernel = getattr(mlp, name).fn
        monkeypatch.setattr(mlp, name, triton.autotune([mlp.PERSISTENT_CONFIGS[config]], key=[])(kernel))
    _check_against_oracle(1000, 1000, torch.bfloat16, torch.device("cuda"), p=0.1)
    _check_against_oracle(333, 5120, torch.bfloat16, torch.device("cuda"), p=0.1)


@pytest.mark.gpu
def test_gpu_device_guard_and_seed_on_cpu():
    # The seed tensor stays on the CPU (no sync); the op runs on x's GPU.
    x, w1, b1, w2, b2, r = _inputs(64, 128, torch.bfloat16, torch.device("cuda"))
    out = functional.relu_mlp(x, w1, b1, w2, b2, residual=r, dropout_p=0.1, seed=9)
    assert out.device == x.device and torch.isfinite(out).all()
