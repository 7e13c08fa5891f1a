"""LayerNorm: numerics against float64, gradients, edge cases, errors, compile.

Under the CPU interpreter these run the real Triton kernels (see conftest.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from opt_core import functional
from opt_core.kernels import aot_cases, dispatch, reference
from opt_core.kernels import layer_norm as ln
from opt_core.kernels.layer_norm import MAX_N
from opt_core.kernels.testing import FORWARD_FACTOR, GRADIENT_FACTOR, assert_close_to_reference
from opt_core import FusedLayerNorm

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(shape, dtype, device, *, affine="both", residual=False):
    N = shape[-1]
    x = torch.randn(shape, dtype=dtype, device=device) * 2 + 0.5
    w = torch.randn(N, dtype=dtype, device=device) if affine in ("both", "weight") else None
    b = torch.randn(N, dtype=dtype, device=device) if affine in ("both", "bias") else None
    r = torch.randn(shape, dtype=dtype, device=device) if residual else None
    return x, w, b, r


def _leaves(tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(True) for t in tensors]


def _run(fn, x, w, b, r, grads):
    """Forward + backward of ``fn``; (outputs, input grads), None where absent."""
    out = fn(x, w, b, r)
    outs = list(out) if isinstance(out, tuple) else [out]
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grads)])
    return outs, [None if t is None else t.grad for t in (x, w, b, r)]


def _ours(x, w, b, r):
    return functional.layer_norm(x, w, b, 1e-5, residual=r)


def _oracle(x, w, b, r):
    return reference.layer_norm(x, w, b, 1e-5, r)


def _plain_torch(x, w, b, r):
    # What a plain PyTorch model does in this precision: add, then F.layer_norm.
    h = x if r is None else x + r
    y = F.layer_norm(h, (h.shape[-1],), w, b, 1e-5)
    return y if r is None else (y, h)


def _check_against_oracle(shape, dtype, device, *, affine="both", residual=False, sum_grad=False):
    tensors = _inputs(shape, dtype, device, affine=affine, residual=residual)
    n_out = 2 if residual else 1
    grads = [torch.randn(shape, dtype=torch.float64, device=device) for _ in range(n_out)]
    if sum_grad:  # .sum().backward(): an expanded gradient with stride 0
        grads = [torch.ones((), dtype=torch.float64, device=device).expand(shape) for _ in range(n_out)]

    ours, ours_g = _run(_ours, *_leaves(tensors), grads)
    ref, ref_g = _run(_oracle, *_leaves(tensors, torch.float64), grads)
    pt, pt_g = _run(_plain_torch, *_leaves(tensors), grads)

    for name, o, rf, p in zip(("y", "h"), ours, ref, pt):
        assert o.dtype == dtype and o.shape == torch.Size(shape)
        assert_close_to_reference(name, o, rf, p, factor=FORWARD_FACTOR)
    for name, o, rf, p in zip(("dx", "dweight", "dbias", "dresidual"), ours_g, ref_g, pt_g):
        if rf is None:
            assert o is None, name
            continue
        assert o.dtype == dtype, name
        assert_close_to_reference(name, o, rf, p, factor=GRADIENT_FACTOR)


WIDTHS = [1, 7, 768, 1000, 2560, 12288]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N", WIDTHS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_matches_float64_reference(N, dtype, residual, device):
    rows = (3, 11) if N <= 2560 else (5,)  # odd row counts; fewer rows where rows are wide
    _check_against_oracle((*rows, N), dtype, device, residual=residual)


@pytest.mark.parametrize("shape", [(1, 1, 1023), (3, 7, 256), (1151, 64), (1, 1536), (2, 1, 3, 17), (1, 1)])
def test_odd_shapes(shape, device):
    _check_against_oracle(shape, torch.float16, device, residual=True)


@pytest.mark.parametrize("affine", ["none", "weight", "bias"])
@pytest.mark.parametrize("N", [33, 9000])  # the register backward and the wide one
def test_without_full_affine(affine, N, device):
    _check_against_oracle((5, N), torch.float32, device, affine=affine, residual=N == 33)


@pytest.mark.parametrize("rows", [1, 9, 37])
def test_wide_backward_with_several_row_tiles_per_program(rows, device):
    # fp32 rows wider than 8192 take the two-pass backward; with 37 rows each program
    # owns several row tiles, so its dW/dB partials are accumulated, not just stored.
    _check_against_oracle((rows, 8200), torch.float32, device)


@pytest.mark.parametrize("wide", ["auto", "off"])
def test_wide_16_bit_rows_on_either_backward(wide, device, monkeypatch):
    # fp16 rows above 8192: the one-read three-chunk kernel (sm_90 and the interpreter), or with the
    # switch off the two-pass kernel sm_80 runs; 37 rows give every program several rows (the
    # interpreter counts 4 SMs), the second and third chunks partial.
    monkeypatch.setattr(ln, "WIDE_BWD", wide)
    _check_against_oracle((37, 9000), torch.float16, device, residual=True)


def test_backward_kernel_for_each_width_dtype_and_gpu(monkeypatch):
    assert ln.bwd_variant(768, torch.bfloat16, 80) == ("bwd_kernel", dict(BLOCK_N=1024, PIPELINE=True))
    assert ln.bwd_variant(8192, torch.float32, 90) == ("bwd_kernel", dict(BLOCK_N=8192, PIPELINE=True))
    wide, two_pass = ("bwd_wide_kernel", dict(CHUNK=4096)), ("bwd_two_pass_kernel", dict(CHUNK=4096))
    assert ln.bwd_variant(12288, torch.bfloat16, 90) == wide
    assert ln.bwd_variant(8193, torch.float16, 90) == wide
    assert ln.bwd_variant(12288, torch.bfloat16, 80) == two_pass  # sm_80's ptxas spills the fp16 wide kernel
    assert ln.bwd_variant(12288, torch.float32, 90) == two_pass   # fp32 chunks do not fit the registers
    assert ln.bwd_variant(12289, torch.bfloat16, 90) == two_pass  # more than three chunks
    monkeypatch.setattr(ln, "WIDE_BWD", "off")
    assert ln.bwd_variant(12288, torch.bfloat16, 90) == two_pass
    monkeypatch.setattr(ln, "WIDE_BWD", "on")
    with pytest.raises(ValueError, match="opt_core.kernels.layer_norm.WIDE_BWD must be one of"):
        ln.bwd_variant(12288, torch.bfloat16, 90)


def test_backward_configs_keep_todays_beside_the_pipelined_ones(monkeypatch):
    for block_n in (1024, 2048, 4096, 8192):
        kept = ln.prune_bwd_configs(ln.BWD_CONFIGS, {}, BLOCK_N=block_n)
        today = [c for c in kept if c.kwargs["STAGES"] == 1]
        assert today and all(c.kwargs["PROGRAMS_PER_SM"] == 2 for c in today)
        assert {c.kwargs["STAGES"] for c in kept} == {1, 2}
        assert ln.prune_bwd_configs(ln.BWD_CONFIGS, {}, BLOCK_N=block_n, PIPELINE=False) == today
    monkeypatch.setattr(ln, "BWD_PIPELINE", "off")
    assert ln.bwd_variant(1000, torch.bfloat16, 90) == ("bwd_kernel", dict(BLOCK_N=1024, PIPELINE=False))
    monkeypatch.setattr(ln, "BWD_PIPELINE", "never")
    with pytest.raises(ValueError, match="opt_core.kernels.layer_norm.BWD_PIPELINE must be one of"):
        ln.bwd_variant(1000, torch.bfloat16, 90)


def test_aot_cases_cover_each_backward_where_it_runs():
    cases = {c.name: c for c in aot_cases.layer_norm_cases()}
    wide = [c for name, c in cases.items() if name.startswith("layer_norm_bwd_wide[")]
    assert {c.name.split(",")[1] for c in wide} == {"float16", "bfloat16"} and all(c.archs == (90,) for c in wide)
    two_pass = [c for name, c in cases.items() if name.startswith("layer_norm_bwd_two_pass[")]
    assert {(c.name.split(",")[1], c.archs) for c in two_pass} == {
        ("float16", (80,)), ("bfloat16", (80,)), ("float32", (80, 90))}
    # both loop depths of the register backward, and 16-byte loads asserted for the config each
    # kernel runs untuned
    assert any("STAGES=2" in name for name in cases) and any("STAGES=1" in name for name in cases)
    firsts = [c for c in cases.values() if dict(c.expects) == {"max_load_bits": 128}]
    assert {c.name.split("[")[0] for c in firsts} == {"layer_norm_fwd", "layer_norm_bwd", "layer_norm_bwd_wide",
                                                      "layer_norm_bwd_two_pass"}


@pytest.mark.parametrize("N", [100, 9000])
@pytest.mark.parametrize("residual", [False, True])
def test_sum_backward_with_stride_zero_gradient(N, residual, device):
    _check_against_oracle((4, 3, N), torch.float16, device, residual=residual, sum_grad=True)


def test_strided_inputs(device):
    base = torch.randn(6, 5, 2 * 300, dtype=torch.float32, device=device)
    x = base[:, :, ::2]                      # last-dim stride 2
    r = torch.randn(5, 6, 300, dtype=torch.float32, device=device).transpose(0, 1)  # not viewable as rows
    w = torch.randn(600, device=device)[::2]
    b = torch.randn(300, device=device)
    assert x.stride(-1) == 2 and not r.is_contiguous()
    y, h = functional.layer_norm(x, w, b, residual=r)
    y_ref, h_ref = reference.layer_norm(x.double(), w.double(), b.double(), 1e-5, r.double())
    torch.testing.assert_close(h.double(), h_ref)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)


def test_weight_in_fp32_with_fp16_input(device):
    x = torch.randn(9, 130, dtype=torch.float16, device=device, requires_grad=True)
    w = torch.randn(130, dtype=torch.float32, device=device, requires_grad=True)
    b = torch.randn(130, dtype=torch.float32, device=device, requires_grad=True)
    y = functional.layer_norm(x, w, b)
    assert y.dtype == torch.float16
    y.float().square().sum().backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    ref = reference.layer_norm(x.double(), w.double(), b.double())
    torch.testing.assert_close(y.double(), ref, rtol=2e-3, atol=4e-3)


def test_nan_and_inf_propagate_like_pytorch(device):
    x = torch.randn(6, 40, device=device)
    x[1, 3] = float("nan")
    x[4, 0] = float("inf")
    w, b = torch.randn(40, device=device), torch.randn(40, device=device)
    ours = functional.layer_norm(x, w, b)
    theirs = F.layer_norm(x, (40,), w, b)
    assert torch.equal(ours.isnan(), theirs.isnan())
    assert ours.isnan()[[1, 4]].all() and ours.isfinite()[[0, 2, 3, 5]].all()


def test_zero_rows(device):
    x = torch.randn(0, 3, 64, device=device, requires_grad=True)
    w = torch.randn(64, device=device, requires_grad=True)
    b = torch.zeros(64, device=device, requires_grad=True)
    y = functional.layer_norm(x, w, b)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_forward_and_backward_are_bitwise_repeatable(device):
    x, w, b, r = _inputs((37, 1000), torch.float16, device, residual=True)
    g = torch.randn(37, 1000, dtype=torch.float16, device=device)
    runs = []
    for _ in range(2):
        xs = _leaves((x, w, b, r))
        y, h = functional.layer_norm(xs[0], xs[1], xs[2], residual=xs[3])
        (y * g).sum().backward()
        runs.append([y, h] + [t.grad for t in xs])
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)


def test_reference_backend_matches_kernel(device):
    x, w, b, r = _inputs((7, 96), torch.float32, device, residual=True)
    g = torch.randn(7, 96, device=device)
    results = []
    for use_reference in (False, True):
        xs = _leaves((x, w, b, r))
        if use_reference:
            with dispatch.reference_backend():
                y, h = functional.layer_norm(xs[0], xs[1], xs[2], residual=xs[3])
                (y * g + h).sum().backward()
        else:
            y, h = functional.layer_norm(xs[0], xs[1], xs[2], residual=xs[3])
            (y * g + h).sum().backward()
        results.append([y, h] + [t.grad for t in xs])
    for a, b_ in zip(*results):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)


def test_float64_takes_the_reference_path(device):
    x = torch.randn(4, 10, dtype=torch.float64, device=device, requires_grad=True)
    torch.autograd.gradcheck(lambda t: functional.layer_norm(t, None, None), (x,))


# --------------------------------------------------------------------------- errors
def test_bad_inputs_raise_named_errors():
    x = torch.randn(4, 8)
    w = torch.randn(8)
    cases = [
        (lambda: functional.layer_norm([1.0], None, None), TypeError, "x must be a torch.Tensor"),
        (lambda: functional.layer_norm(x.long(), None, None), TypeError, "x must have dtype"),
        (lambda: functional.layer_norm(torch.randn(()), None, None), ValueError, "x must have at least 1"),
        (lambda: functional.layer_norm(torch.randn(4, 0), None, None), ValueError, "last dimension of at least 1"),
        (lambda: functional.layer_norm(x, torch.randn(7), None), ValueError, r"weight must have shape \(8,\)"),
        (lambda: functional.layer_norm(x, w.int(), None), TypeError, "weight must have dtype"),
        (lambda: functional.layer_norm(x, w, torch.randn(8, 1)), ValueError, "bias must have shape"),
        (lambda: functional.layer_norm(x, w.to("meta"), None), ValueError, "weight is on meta"),
        (lambda: functional.layer_norm(x, w, None, residual=torch.randn(4, 9)), ValueError, "residual must have shape"),
        (lambda: functional.layer_norm(x, w, None, residual=x.half()), TypeError, "residual must have the dtype"),
        (lambda: functional.layer_norm(x, w, None, eps=-1.0), ValueError, "eps must be >= 0"),
        (lambda: functional.layer_norm(x, w, None, eps="1e-5"), TypeError, "eps must be a float"),
        (lambda: functional.layer_norm(x, w, None, eps=float("nan")), ValueError, "eps must be finite"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


@pytest.mark.interpreter
def test_too_wide_for_the_kernel_is_rejected():
    with pytest.raises(ValueError, match=f"at most {MAX_N}"):
        functional.layer_norm(torch.randn(2, MAX_N + 1), None, None)


# --------------------------------------------------------------------------- module
@pytest.mark.parametrize("kwargs", [
    dict(normalized_shape=96),
    dict(normalized_shape=(96,), eps=1e-6, elementwise_affine=False),
    dict(normalized_shape=[96], bias=False),
    dict(normalized_shape=(4, 24)),
])
def test_fused_layer_norm_is_a_drop_in_for_nn_layer_norm(kwargs, device):
    torch_ln = torch.nn.LayerNorm(**kwargs, device=device)
    with torch.no_grad():
        for p in torch_ln.parameters():
            p.normal_()
    ours = FusedLayerNorm(**kwargs, device=device)
    assert isinstance(ours, torch.nn.LayerNorm)
    assert ours.extra_repr() == torch_ln.extra_repr()
    assert ours.state_dict().keys() == torch_ln.state_dict().keys()
    ours.load_state_dict(torch_ln.state_dict())
    back = torch.nn.LayerNorm(**kwargs, device=device)
    back.load_state_dict(ours.state_dict())
    for a, b in zip(back.state_dict().values(), torch_ln.state_dict().values()):
        assert torch.equal(a, b)

    shape = (3, 5, 96) if ours.normalized_shape == (96,) else (3, 5, 4, 24)
    x = torch.randn(shape, device=device)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), torch_ln(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-4)
    for (name, p1), p2 in zip(ours.named_parameters(), torch_ln.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # the kernels' path and the reference's
def test_outputs_are_fresh_tensors_not_views(dtype, device):
    """A module whose output is a view makes FSDP2 warn (an in-place op on it would drop FSDP2's hook).  The
    outputs own their storage, and autograd still catches an in-place change to the saved h."""
    x = torch.randn(2, 3, 40, device=device, dtype=dtype, requires_grad=True)
    r = torch.randn(2, 3, 40, device=device, dtype=dtype, requires_grad=True)
    w, b = torch.randn(40, device=device, dtype=dtype), torch.randn(40, device=device, dtype=dtype)
    y = functional.layer_norm(x, w, b)
    y_res, h = functional.layer_norm(x, w, b, residual=r)
    for t in (y, y_res, h):
        assert t._base is None and t.shape == x.shape
    h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (y_res.sum() + h.sum()).backward()


def test_fused_layer_norm_refuses_an_empty_shape():
    # nn.LayerNorm builds these and fails at the first forward; ours refuses where the size was written.
    for shape in (0, (4, 0), ()):
        with pytest.raises(ValueError, match="normalized_shape must be one or more sizes >= 1"):
            FusedLayerNorm(shape)


def test_fused_layer_norm_residual_form(device):
    ln = FusedLayerNorm(64, device=device)
    x, r = torch.randn(2, 3, 64, device=device), torch.randn(2, 3, 64, device=device)
    y, h = ln(x, r)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, F.layer_norm(x + r, (64,), ln.weight, ln.bias), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="normalized_shape"):
        ln(torch.randn(2, 63, device=device))


# --------------------------------------------------------------------------- torch.library / compile
def test_opcheck():
    x = torch.randn(5, 48, requires_grad=True)
    w = torch.randn(48, requires_grad=True)
    b = torch.randn(48, requires_grad=True)
    r = torch.randn(5, 48, requires_grad=True)
    torch.library.opcheck(torch.ops.opt_core.layer_norm_fwd.default, (x, w, b, r, 1e-5))
    torch.library.opcheck(torch.ops.opt_core.layer_norm_fwd.default, (x, None, None, None, 1e-5))
    x3, r3 = (t.detach().reshape(1, 5, 48).requires_grad_() for t in (x, r))  # the op takes any leading dims
    torch.library.opcheck(torch.ops.opt_core.layer_norm_fwd.default, (x3, w, b, r3, 1e-5))
    _, h, mean, rstd = torch.ops.opt_core.layer_norm_fwd(x, w, b, r, 1e-5)
    assert not mean.requires_grad and not rstd.requires_grad
    dy = torch.randn(5, 48)
    torch.library.opcheck(torch.ops.opt_core.layer_norm_bwd.default,
                          (dy, dy, h.detach(), w.detach(), b.detach(), mean, rstd, 1e-5))


class _PreLNBlock(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = FusedLayerNorm(d)
        self.fc = torch.nn.Linear(d, d)

    def forward(self, x, residual):
        y, h = self.ln(x, residual)
        return self.fc(y).relu() + h


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph_has_no_graph_break(backend):
    torch._dynamo.reset()
    block = _PreLNBlock(40)
    x, r = torch.randn(3, 40, requires_grad=True), torch.randn(3, 40)
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    out = compiled(x, r)
    out.sum().backward()
    x_eager = x.detach().clone().requires_grad_()
    expected = block(x_eager, r)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_eager.grad, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N", [768, 2560, 5120, 12288])
def test_gpu_large(N, dtype):
    _check_against_oracle((4096, N), dtype, torch.device("cuda"), residual=True)
