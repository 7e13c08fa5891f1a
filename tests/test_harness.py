"""The harness itself: the numerics rule can fail, poisoning works, the
interpreter's bf16 defects are fixed, dispatch picks the right path and the
op registration helper follows it."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from opt_core.kernels import dispatch
from opt_core.kernels.op_registry import Direction, register_op
from opt_core.kernels.testing import FORWARD_FACTOR, compare


def _pair(n=1000):
    ref = torch.randn(n, dtype=torch.float64)
    lowp = ref.half()  # plain PyTorch: one rounding to fp16
    return ref, lowp


def test_rule_accepts_a_correctly_rounded_result():
    ref, lowp = _pair()
    assert compare("y", ref.half(), ref, lowp, factor=FORWARD_FACTOR).ok


def test_rule_rejects_an_error_beyond_twice_pytorchs():
    ref, lowp = _pair()
    worse = (ref + 8e-3).half()  # ~8 ulps off at |x| ~ 1
    result = compare("y", worse, ref, lowp, factor=FORWARD_FACTOR)
    assert not result.ok and "FAIL" in str(result)


def test_rule_rejects_nan_where_the_reference_has_none():
    ref, lowp = _pair()
    ours = ref.half().clone()
    ours[17] = float("nan")  # what an unwritten, poisoned element looks like
    result = compare("y", ours, ref, lowp, factor=FORWARD_FACTOR)
    assert not result.ok and "NaN mismatch" in result.detail


def test_rule_rejects_a_missing_nan_and_a_wrong_inf():
    ref, lowp = _pair()
    ref[3] = float("nan")
    assert not compare("y", ref.half().nan_to_num(0.0), ref, lowp, factor=2).ok
    ref2, lowp2 = _pair()
    ref2[5] = float("inf")
    ours = ref2.half().clone()
    ours[5] = float("-inf")
    assert not compare("y", ours, ref2, lowp2, factor=2).ok


def test_rule_floor_covers_an_exact_pytorch():
    ref = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    ours = torch.tensor([1.0, 2.0, 3.0 + 2 ** -9], dtype=torch.float16)  # one ulp at 3.0 in fp16 is 2**-9
    assert compare("y", ours, ref, ref.half(), factor=2).ok
    far = torch.tensor([1.0, 2.0, 3.01], dtype=torch.float16)
    assert not compare("y", far, ref, ref.half(), factor=2).ok


def test_outputs_are_poisoned_in_tests():
    out = dispatch.empty((4,), dtype=torch.float16, device=torch.device("cpu"))
    assert out.isnan().all()
    assert (dispatch.empty((2,), dtype=torch.int32, device=torch.device("cpu")) == -1).all()
    with dispatch.poison_outputs(False):
        dispatch.empty((4,), dtype=torch.float16, device=torch.device("cpu"))  # no fill, no error


def test_dispatch_rules(device):
    x = torch.randn(2, device=device)
    expected = device.type == "cuda" or dispatch.INTERPRET
    assert dispatch.use_triton(x, (torch.float32,)) == expected
    assert not dispatch.use_triton(x.double(), (torch.float32,))
    with dispatch.reference_backend():
        assert not dispatch.use_triton(x, (torch.float32,))
    assert not dispatch.use_triton(torch.randn(2, device="meta"), (torch.float32,))


@triton.jit
def _dot_kernel(A, B, C, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    m, n, k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(A + m[:, None] * K + k[None, :])
    b = tl.load(B + k[:, None] * N + n[None, :])
    tl.store(C + m[:, None] * N + n[None, :], tl.dot(a, b))


@triton.jit
def _cast_kernel(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, tl.load(X + offs).to(Y.dtype.element_ty))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_down_casts_round_to_nearest_even_like_torch(dtype, device):
    # Under the interpreter this checks interpreter_fixes' bf16 rounding.
    x = torch.randn(4096, device=device) * 100
    y = torch.full((4096,), float("nan"), dtype=dtype, device=device)
    _cast_kernel[(1,)](x, y, N=4096)
    assert torch.equal(y, x.to(dtype))


@triton.jit
def _max_kernel(X, Y, Z, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(X + offs)
    tl.store(Y + offs, tl.maximum(x, 0.0))
    tl.store(Z + offs, tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL))


def test_maximum_drops_nan_unless_asked_like_the_gpu(device):
    # Under the interpreter this checks interpreter_fixes' maxnum semantics.
    x = torch.tensor([1.0, -1.0, float("nan"), 0.0] * 4, device=device)
    y, z = torch.empty_like(x), torch.empty_like(x)
    _max_kernel[(1,)](x, y, z, N=16)
    assert not y.isnan().any() and torch.equal(z.isnan(), x.isnan())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_tl_dot_is_right_in_every_dtype(dtype, device):
    # Under the interpreter this checks interpreter_fixes' bf16 dot; on a GPU, the real dot.
    a = torch.randn(16, 32, device=device).to(dtype)
    b = torch.randn(32, 16, device=device).to(dtype)
    c = torch.full((16, 16), float("nan"), device=device)
    _dot_kernel[(1,)](a, b, c, M=16, N=16, K=32)
    expected = a.double() @ b.double()
    torch.testing.assert_close(c.double(), expected, rtol=2e-2 if dtype == torch.float32 else 1e-3, atol=2e-2)


@triton.jit
def _dot_both_ways_kernel(A, B, ACC, C, CT, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    m, n, k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(A + m[:, None] * K + k[None, :])
    b = tl.load(B + n[:, None] * K + k[None, :])
    acc = tl.load(ACC + m[:, None] * N + n[None, :])
    tl.store(C + m[:, None] * N + n[None, :], tl.dot(a, tl.trans(b), acc, input_precision="ieee"))
    tl.store(CT + n[:, None] * M + m[None, :], tl.dot(b, tl.trans(a), tl.trans(acc), input_precision="ieee"))


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_interpreted_dot_is_rounded_once_whatever_the_host_blas(dtype, device):
    # interpreter_fixes: a dot is summed in float64 and rounded once, so its bits do not depend on
    # the CPU's BLAS kernel, and A·Bᵀ is exactly the transpose of B·Aᵀ (as attention's forward and
    # backward recompute the same scores).  Plain np.matmul in fp32 is neither, at K = 128.
    a = torch.randn(32, 128, device=device).to(dtype)
    b = torch.randn(16, 128, device=device).to(dtype)
    acc = torch.randn(32, 16, device=device)
    c, ct = torch.full_like(acc, float("nan")), torch.full((16, 32), float("nan"), device=device)
    _dot_both_ways_kernel[(1,)](a, b, acc, c, ct, M=32, N=16, K=128)
    rounded_once = (a.double() @ b.double().T + acc.double()).float()
    assert torch.equal(c, rounded_once)
    assert torch.equal(ct, rounded_once.T)


# --------------------------------------------------------------------------- op registration
# A probe op, y = x * scale, whose two paths record which one ran.
_PATHS_TAKEN: list[str] = []


def _probe_kernel(x: torch.Tensor, scale: float) -> torch.Tensor:
    _PATHS_TAKEN.append("kernel")
    return x * scale


def _probe_reference(x, scale):
    _PATHS_TAKEN.append("reference")
    return x * scale


def _probe_fake(x, scale):
    return torch.empty_like(x)


def _probe_bwd_kernel(dy: torch.Tensor, x: torch.Tensor, scale: float) -> torch.Tensor:
    _PATHS_TAKEN.append("kernel")
    return dy * scale


def _probe_bwd_reference(dy, x, scale):
    _PATHS_TAKEN.append("reference")
    return dy * scale


def _probe_bwd_fake(dy, x, scale):
    return torch.empty_like(dy)


def _probe_setup_context(ctx, inputs, output):
    x, scale = inputs
    ctx.scale = scale
    ctx.save_for_backward(x)


def _probe_gradients(ctx, dy):
    (x,) = ctx.saved_tensors
    return torch.ops.opt_core.registry_probe_bwd(dy, x, ctx.scale), None


def _register_probe(name, chosen_by="x"):
    register_op(
        name, dtypes=(torch.float32,),
        forward=Direction(_probe_kernel, _probe_reference, _probe_fake, chosen_by=chosen_by),
        backward=Direction(_probe_bwd_kernel, _probe_bwd_reference, _probe_bwd_fake, chosen_by="x"),
        setup_context=_probe_setup_context, gradients=_probe_gradients,
    )


_register_probe("registry_probe")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_registered_op_runs_the_path_dispatch_chooses(dtype, device):
    x = torch.randn(5, dtype=dtype, device=device, requires_grad=True)
    scale = float(torch.rand(()) + 0.5)
    expected = "kernel" if dispatch.use_triton(x, (torch.float32,)) else "reference"
    _PATHS_TAKEN.clear()
    y = torch.ops.opt_core.registry_probe_fwd(x, scale)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert _PATHS_TAKEN == [expected, expected]  # forward, then backward
    torch.testing.assert_close(y, x.detach() * scale)
    torch.testing.assert_close(x.grad, dy * scale)
    _PATHS_TAKEN.clear()
    with dispatch.reference_backend():
        torch.ops.opt_core.registry_probe_fwd(x.detach(), scale)
    assert _PATHS_TAKEN == ["reference"]


def test_registered_op_passes_opcheck():
    x = torch.randn(4, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.opt_core.registry_probe_fwd.default, (x, 2.5))


def test_register_op_rejects_a_chooser_that_is_no_argument():
    with pytest.raises(ValueError, match="chosen_by='y' is not an argument of _probe_kernel"):
        _register_probe("registry_probe_misnamed", chosen_by="y")
