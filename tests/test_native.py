"""The native path (kernels/native.py): plain PyTorch with plain autograd where no kernel runs.

Each op against the float64 reference under the numerics rule (kernels.testing), through the public
functions with ``dispatch.native_backend()`` (the suite runs under the interpreter, where fp32 would
take the kernels); padding, seqlen_q != seqlen_k, rows that see no key, dropout statistics, the
chunked LM-head loss, the dispatch rule itself and torch.compile(fullgraph=True).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from opt_core import functional
from opt_core.kernels import dispatch, native, reference
from opt_core.kernels.testing import FORWARD_FACTOR, GRADIENT_FACTOR, assert_close_to_reference


@pytest.fixture(autouse=True)
def _native():
    with dispatch.native_backend():
        yield


def _leaves(tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(True) for t in tensors]


def _run(fn, tensors, grad, dtype=None):
    """fn's output and the gradients of every input for the cotangent ``grad`` (each output's, for tuples)."""
    xs = _leaves(tensors, dtype)
    out = fn(*xs)
    outs = out if isinstance(out, tuple) else (out,)
    grads = grad if isinstance(grad, tuple) else (grad,)
    torch.autograd.backward([o for o in outs], [g.to(o.dtype) for o, g in zip(outs, grads)])
    return outs, [x.grad if x is not None else None for x in xs]


def _check(name, fn, oracle, plain, tensors, grad):
    """ours (fn), the float64 oracle and plain PyTorch in the same dtype, forward and every gradient."""
    ours, ours_g = _run(fn, tensors, grad)
    ref, ref_g = _run(oracle, tensors, grad, torch.float64)
    low, low_g = _run(plain, tensors, grad)
    for i, (o, r, p) in enumerate(zip(ours, ref, low)):
        assert o.dtype == tensors[0].dtype
        assert_close_to_reference(f"{name} out{i}", o, r, p, factor=FORWARD_FACTOR)
    for i, (o, r, p) in enumerate(zip(ours_g, ref_g, low_g)):
        if o is not None:
            assert_close_to_reference(f"{name} grad{i}", o, r, p, factor=GRADIENT_FACTOR)
    return ours, ours_g


# --------------------------------------------------------------------------- attention
def _padding(B, Sk, kind):
    if kind == "none":
        return None
    mask = torch.zeros(B, Sk, dtype=torch.bool)
    for b in range(B):
        n = Sk if b == 0 else max(1, (2 * Sk) // 3 - b)
        mask[b, :n] = True
        if kind == "left":
            mask[b] = mask[b].flip(0)
    if kind == "all-padded-row":  # one batch row with no real key at all
        mask[-1] = False
    return mask


@pytest.mark.parametrize("Sq, Sk", [(37, 37), (13, 29), (29, 13), (1, 23)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pad", ["none", "left", "right"])
def test_attention_matches_float64(Sq, Sk, causal, pad):
    B, H, D = 3, 2, 24
    q, k, v = (torch.randn(B, S, H, D) for S in (Sq, Sk, Sk))
    mask = _padding(B, Sk, pad)
    grad = torch.randn(B, Sq, H, D, dtype=torch.float64)
    (out,), _ = _check("attention", lambda *t: functional.attention(*t, causal=causal, key_padding_mask=mask),
                       lambda *t: reference.attention(*t, causal, None, mask),
                       lambda *t: reference.attention(*t, causal, None, mask, upcast=False), (q, k, v), grad)
    if causal and Sq > Sk:  # bottom-right aligned: the first Sq - Sk queries see no key
        assert torch.equal(out[:, :Sq - Sk], torch.zeros_like(out[:, :Sq - Sk]))


def test_rows_that_see_no_key_give_zero_and_zero_gradients():
    B, S, H, D = 3, 11, 2, 16
    q, k, v = (torch.randn(B, S, H, D) for _ in range(3))
    mask = _padding(B, S, "all-padded-row")
    for causal in (True, False):
        out, (dq, dk, dv) = _run(lambda *t: functional.attention(*t, causal=causal, key_padding_mask=mask),
                                 (q, k, v), torch.randn(B, S, H, D))
        out = out[0]
        assert not out.isnan().any()
        assert torch.equal(out[-1], torch.zeros_like(out[-1]))
        for g in (dq, dk, dv):
            assert torch.equal(g[-1], torch.zeros_like(g[-1]))
    empty = [t[:, :0] for t in (k, v)]
    out = functional.attention(q, *empty, causal=False)
    assert torch.equal(out, torch.zeros_like(out))


def test_attention_dropout_keeps_the_expectation():
    """q = k = 0: uniform probabilities over the visible keys; v = 1: each output is the kept fraction / (1 - p)."""
    p, B, S, H = 0.25, 4, 64, 4
    q = k = torch.zeros(B, S, H, 8)
    v = torch.ones(B, S, H, 8)
    out = functional.attention(q, k, v, causal=False, dropout_p=p)[..., 0]
    kept = out * (1 - p)  # the fraction of the S keys kept, per row
    n = B * S * H * S
    assert abs(kept.mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    assert not torch.equal(out, torch.ones_like(out))


# --------------------------------------------------------------------------- layer norm
@pytest.mark.parametrize("N", [1, 37, 128])
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_matches_float64(N, residual):
    x, w, b = torch.randn(5, 3, N), 1 + 0.1 * torch.randn(N), 0.1 * torch.randn(N)
    r = torch.randn(5, 3, N) if residual else None
    grads = (torch.randn(5, 3, N, dtype=torch.float64),) * (2 if residual else 1)

    def ours(x_, w_, b_, r_=None):
        return functional.layer_norm(x_, w_, b_, 1e-5, residual=r_)

    def oracle(x_, w_, b_, r_=None, upcast=True):
        return reference.layer_norm(x_, w_, b_, 1e-5, r_, upcast=upcast)

    _check("layer_norm", ours, oracle, lambda *t: oracle(*t, upcast=False), (x, w, b, r)[:4 if residual else 3],
           grads)


# --------------------------------------------------------------------------- relu mlp and dropout
@pytest.mark.parametrize("d, ffn", [(24, 96), (33, 70)])
@pytest.mark.parametrize("residual", [False, True])
def test_relu_mlp_matches_float64(d, ffn, residual):
    x, r = torch.randn(2, 9, d), torch.randn(2, 9, d)
    w1, b1, w2, b2 = torch.randn(ffn, d) / d**0.5, torch.randn(ffn) * 0.1, torch.randn(d, ffn) / ffn**0.5, torch.randn(d)
    tensors = (x, w1, b1, w2, b2) + ((r,) if residual else ())
    grad = torch.randn(2, 9, d, dtype=torch.float64)

    def ours(*t):
        return functional.relu_mlp(*t[:5], residual=t[5] if residual else None)

    def oracle(*t, upcast=True):
        return reference.relu_mlp(*t[:5], t[5] if residual else None, upcast=upcast)

    _check("relu_mlp", ours, oracle, lambda *t: oracle(*t, upcast=False), tensors, grad)


def test_relu_mlp_dropout_zeroes_a_fraction_p_and_scales_the_rest():
    p, M, d, ffn = 0.3, 400, 64, 96
    x, w1, b1, w2, b2 = torch.randn(M, d), torch.randn(ffn, d) / 8, torch.randn(ffn), torch.randn(d, ffn) / 10, torch.randn(d)
    r = torch.randn(M, d)
    leaves = _leaves((x, w1, b1, w2, b2, r))
    out = functional.relu_mlp(*leaves[:5], residual=leaves[5], dropout_p=p)
    plain = functional.relu_mlp(x, w1, b1, w2, b2, dropout_p=p, training=False)
    branch = (out - r).detach()
    kept = branch != 0
    frac = kept.double().mean().item()
    assert abs(frac - (1 - p)) < 5 * math.sqrt(p * (1 - p) / kept.numel())
    torch.testing.assert_close(branch[kept], plain[kept] / (1 - p), rtol=1e-5, atol=1e-6)
    g = torch.randn(M, d)
    out.backward(g)
    torch.testing.assert_close(leaves[4].grad, (g * kept / (1 - p)).sum(0), rtol=1e-5, atol=1e-5)  # d fc2_bias
    torch.testing.assert_close(leaves[5].grad, g)  # the residual passes straight through
    assert torch.equal(functional.relu_mlp(x, w1, b1, w2, b2, dropout_p=p, training=False), plain)


def test_dropout_draws_from_torchs_generator():
    x = torch.randn(1000, 100)
    assert native.dropout(x, 0.0) is x
    torch.manual_seed(5)
    a = native.dropout(x, 0.1)
    torch.manual_seed(5)
    assert torch.equal(native.dropout(x, 0.1), a)  # torch.manual_seed (and a saved RNG state) replays it
    assert not torch.equal(native.dropout(x, 0.1), a)
    kept = (a != 0).double().mean().item()
    assert abs(kept - 0.9) < 5 * math.sqrt(0.09 / x.numel())
    torch.testing.assert_close(a[a != 0], x[a != 0] / 0.9)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_drops_a_fraction_p_in_each_lane_of_a_random_word(p):
    """The mask's numbers are four 15-bit lanes per 63-bit draw: each lane position (element index mod 4)
    drops a fraction p, the top lane (whose sign bit the draw never sets) as the others."""
    x = torch.ones(4 * 50_000)
    kept = (native.dropout(x, p) != 0).double().view(-1, 4).mean(0)
    bound = 5 * math.sqrt(p * (1 - p) / 50_000)
    assert ((kept - (1 - p)).abs() < bound).all(), kept


# --------------------------------------------------------------------------- the chunked LM-head loss
@pytest.mark.parametrize("rows_per_chunk", [1, 7, 1000])
def test_linear_cross_entropy_matches_float64(monkeypatch, rows_per_chunk):
    N, d, V = 45, 24, 50
    monkeypatch.setattr(native, "CPU_CHUNK_LOGITS", rows_per_chunk * V)
    h, w = torch.randn(N, d), torch.randn(V, d) / d**0.5
    target = torch.randint(0, V, (N,))
    target[::4] = -100

    def oracle(h_, w_, upcast=True):
        return F.cross_entropy(F.linear(h_, w_), target, ignore_index=-100)

    grad = torch.tensor(1.7, dtype=torch.float64)
    (loss,), _ = _check("linear_cross_entropy", lambda h_, w_: native.linear_cross_entropy(h_, w_, target),
                        oracle, oracle, (h, w), grad)
    with torch.no_grad():
        torch.testing.assert_close(native.linear_cross_entropy(h, w, target), loss.detach())


def test_linear_cross_entropy_edges_and_errors():
    h, w = torch.randn(6, 8), torch.randn(11, 8)
    none = torch.full((6,), -100)
    assert native.linear_cross_entropy(h, w, none).isnan()  # no target at all: NaN, as torch's mean
    assert F.cross_entropy(F.linear(h, w), none).isnan()
    with pytest.raises(ValueError, match="share d"):
        native.linear_cross_entropy(h, w[:, :5], none)
    with pytest.raises(ValueError, match="target must have shape"):
        native.linear_cross_entropy(h, w, none[:3])
    with pytest.raises(TypeError, match="weight must have the dtype of hidden"):
        native.linear_cross_entropy(h, w.double(), none)
    bad = h.clone()
    bad[2, 3] = float("nan")
    assert native.linear_cross_entropy(bad, w, torch.zeros(6, dtype=torch.long)).isnan()


# --------------------------------------------------------------------------- dispatch and compile
def test_dispatch_rule(monkeypatch):
    x32, x64 = torch.zeros(2), torch.zeros(2, dtype=torch.float64)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    with dispatch.native_backend(False):
        monkeypatch.setattr(dispatch, "INTERPRET", False)
        assert dispatch.use_native(x32, dtypes) and not dispatch.use_triton(x32, dtypes)
        assert not dispatch.use_native(x64, dtypes)  # float64 keeps the reference, the oracle's dtype
        with dispatch.reference_backend():
            assert not dispatch.use_native(x32, dtypes) and not dispatch.use_triton(x32, dtypes)
        monkeypatch.setattr(dispatch, "INTERPRET", True)
        assert not dispatch.use_native(x32, dtypes) and dispatch.use_triton(x32, dtypes)
    assert dispatch.use_native(x64, dtypes)  # inside native_backend(): every dtype
    q = torch.randn(1, 4, 2, 8, requires_grad=True)
    out = functional.attention(q, q, q)
    assert "opt_core" not in type(out.grad_fn).__name__.lower()  # plain autograd, not the custom op


def test_model_trains_the_same_on_the_native_and_the_reference_path():
    from opt_core import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig.from_preset("test", dropout=0.0))
    ids = torch.randint(3, 512, (2, 17))
    losses, grads = [], []
    for backend in (dispatch.native_backend(), dispatch.reference_backend()):
        with backend:
            model.zero_grad()
            loss = model(ids, labels=ids).loss
            loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_native_ops_compile_fullgraph():
    x = torch.randn(2, 9, 32, requires_grad=True)
    w1, w2 = torch.randn(64, 32) / 6, torch.randn(32, 64) / 8
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :3] = False

    def block(t, key_padding_mask, p):
        y, h = functional.layer_norm(t, None, None, residual=t)
        q = y.view(2, 9, 4, 8)
        a = functional.attention(q, q, q, key_padding_mask=key_padding_mask).reshape(2, 9, 32)
        return functional.relu_mlp(a, w1, None, w2, None, residual=h, dropout_p=p)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    for m in (mask, None):
        out = compiled(x, m, 0.1)  # dropout's random draw inside the graph
        out.sum().backward()
        assert out.shape == x.shape and torch.isfinite(x.grad).all()
        torch.testing.assert_close(compiled(x, m, 0.0), block(x, m, 0.0))
