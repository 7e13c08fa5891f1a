"""The Gluon attention forward (kernels/attention_gluon.py, FlashAttention-3's schedule on sm_90).

The interpreter cannot run Gluon, so on the CPU these check the AOT compile of its default configs, the
routing switch, ``supported()`` and the host function's errors (all before any launch); the numerics
(out and lse against float64, the routed forward against the Triton kernel, a backward through the
routed forward) are ``gpu`` tests, run on a Hopper GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from triton.runtime.jit import mangle_type

from opt_core import functional
from opt_core.kernels import aot, aot_cases, reference
from opt_core.kernels import attention as attn
from opt_core.kernels import attention_gluon
from opt_core.kernels.testing import FORWARD_FACTOR, GRADIENT_FACTOR, assert_close_to_reference


def _qkv(B, Sq, Sk, H, D, dtype, device):
    return (torch.randn(B, Sq, H, D, dtype=dtype, device=device), torch.randn(B, Sk, H, D, dtype=dtype, device=device),
            torch.randn(B, Sk, H, D, dtype=dtype, device=device))


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


hopper = pytest.mark.skipif(not _hopper(), reason="needs a GPU of compute capability 9.x")


# --------------------------------------------------------------------------- AOT (no GPU)
def test_default_configs_overlap_the_softmax_with_a_product():
    """sm_90 compile of the default config per head dim: no spills, shared memory within the limit, TMA
    loads and stores, one wgmma in flight across the softmax, producer/consumer partitions with register
    limits."""
    script = ("import json; from opt_core.kernels import aot, aot_cases; "
              "print(json.dumps(aot.compile_all(aot_cases.attention_gluon_cases(), archs=(90,), workers=1)))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["case"].split(",BLOCK_N")[0] for r in results] == [
        "attention_gluon_fwd[D=64,bfloat16,causal", "attention_gluon_fwd[D=128,bfloat16,causal",
        "attention_gluon_fwd[D=128,bfloat16"]
    for r in results:
        assert not aot.problems(r), (r["case"], aot.problems(r))
        assert r["stack"] == 0 and r["shared"] <= r["max_shared"], r
        assert r["wgmma"] and r["tma"] and r["tma_store"], r
        assert r["wgmma_max_pending"] >= 1 and r["warp_specialized"], r


@pytest.mark.parametrize("D", [64, 128])
def test_aot_descriptors_are_what_a_launch_specialises_to(D):
    """The AOT cases compile the code a launch gets: the host descriptors' types (block and shared layout)
    equal the cases' signature."""
    case = next(c for c in aot_cases.attention_gluon_cases() if c.name.startswith(f"attention_gluon_fwd[D={D},"))
    block_n = attention_gluon.CONFIGS[D][0]
    q, k, _ = _qkv(2, 300, 300, 3, D, torch.bfloat16, "cpu")
    rows = attention_gluon.ROWS_PER_CONSUMER
    assert mangle_type(attention_gluon._descriptor(q, rows)) == case.signature["q_desc"] == case.signature["o_desc"]
    assert mangle_type(attention_gluon._descriptor(k, block_n)) == case.signature["k_desc"]


# --------------------------------------------------------------------------- routing switch
def test_switch_is_validated(monkeypatch):
    q, k, v = _qkv(1, 3, 3, 1, 16, torch.float32, "cpu")
    monkeypatch.setattr(attn, "GLUON", "auto")
    with pytest.raises(ValueError, match=r"opt_core\.kernels\.attention\.GLUON must be one of"):
        attn._launch_fwd(q, k, v, None, True, 0.25, 0.0, 0)


@pytest.mark.parametrize("mode", ["off", "on"])
def test_cpu_tensors_never_go_to_gluon(mode, monkeypatch):
    monkeypatch.setattr(attn, "GLUON", mode)
    q, k, v = _qkv(1, 5, 5, 2, 64, torch.bfloat16, "cpu")
    assert not attn._gluon_takes(q, k, v, None, 0.0)


def test_default_is_off():
    assert attn.GLUON == "off"


# --------------------------------------------------------------------------- supported() and errors
def _strided_last(B, S, H, D, dtype):
    return torch.randn(B, S, H, 2 * D, dtype=dtype)[..., ::2]


def _misaligned(B, S, H, D, dtype):
    # a base 2 bytes past a 16-byte boundary
    return torch.randn(B * S * H * D + 1, dtype=dtype)[1:].view(B, S, H, D)


# (what is wrong, how to make q, k, v from a good bf16 (2, 33, 2, 64) triple, the error it raises)
BAD_INPUTS = [
    ("fp32", lambda q, k, v: (q.float(), k.float(), v.float()), "float16 or bfloat16"),
    ("mixed dtypes", lambda q, k, v: (q, k.half(), v), "one dtype"),
    ("head_dim 80", lambda q, k, v: _qkv(2, 33, 40, 2, 80, q.dtype, "cpu"), "head_dim"),
    ("3-D q", lambda q, k, v: (q[0], k, v), "4-D"),
    ("k heads", lambda q, k, v: (q, k[:, :, :1], v[:, :, :1]), "to match q"),
    ("v shape", lambda q, k, v: (q, k, v[:, :7]), "to match q"),
    ("empty q", lambda q, k, v: (q[:, :0], k, v), "empty"),
    ("strided head_dim", lambda q, k, v: (_strided_last(2, 33, 2, 64, q.dtype), k, v), "TMA"),
    ("misaligned k", lambda q, k, v: (q, _misaligned(2, 40, 2, 64, q.dtype), v), "TMA"),
    ("cpu", lambda q, k, v: (q, k, v), "CUDA device"),
]


@pytest.mark.parametrize("make, message", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_host_function_names_what_it_cannot_take(make, message):
    q, k, v = make(*_qkv(2, 33, 40, 2, 64, torch.bfloat16, "cpu"))
    with pytest.raises(ValueError, match=message):
        attention_gluon.attention_fwd(q, k, v, True, 0.125)
    assert not attention_gluon.supported(q, k, v, None, 0.0)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_supported_inputs_fail_only_for_the_device(D, dtype):
    """Everything but the device suits the kernel: the only error left is the CPU device."""
    q, k, v = _qkv(2, 17, 9, 3, D, dtype, "cpu")
    with pytest.raises(ValueError, match="must be on one CUDA device"):
        attention_gluon.attention_fwd(q, k, v, False, 0.1)


def test_mask_and_dropout_are_not_supported():
    q, k, v = _qkv(1, 8, 8, 1, 64, torch.bfloat16, "cpu")
    mask = torch.ones(1, 8, dtype=torch.bool)
    assert not attention_gluon.supported(q, k, v, mask, 0.0)
    assert not attention_gluon.supported(q, k, v, None, 0.1)


# --------------------------------------------------------------------------- numerics (GPU)
SEQLENS = [(1, 1), (17, 17), (128, 128), (200, 200), (1000, 1000), (113, 203), (203, 113)]


def _reference(q, k, v, causal, scale):
    """(float64 out, plain low-precision out, float64 lse)."""
    ref = reference.attention(q.double(), k.double(), v.double(), causal, scale)
    plain = reference.attention(q, k, v, causal, scale, upcast=False)
    return ref, plain, reference.attention_lse(q.double(), k.double(), causal, scale)


def _check_lse(lse, expected):
    assert lse.dtype == torch.float32
    # +inf exactly where a row sees no key
    assert torch.equal(torch.isinf(lse), torch.isinf(expected)) and bool((lse[torch.isinf(lse)] > 0).all())
    torch.testing.assert_close(lse.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("seqlens", SEQLENS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_matches_float64_reference(seqlens, causal, D, dtype):
    Sq, Sk = seqlens
    q, k, v = _qkv(2, Sq, Sk, 3, D, dtype, "cuda")
    scale = D ** -0.5
    assert attention_gluon.supported(q, k, v, None, 0.0)
    out, lse = attention_gluon.attention_fwd(q, k, v, causal, scale)
    ref, plain, ref_lse = _reference(q, k, v, causal, scale)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (2, 3, Sq)
    assert_close_to_reference("out", out, ref, plain, factor=FORWARD_FACTOR)
    _check_lse(lse, ref_lse)
    if causal and Sq > Sk:  # the first Sq - Sk queries see no key: exactly 0
        assert torch.equal(out[:, :Sq - Sk], torch.zeros_like(out[:, :Sq - Sk]))


def _route_to_gluon(monkeypatch):
    """GLUON on, with a count of the forwards the Gluon kernel ran."""
    calls = []
    real = attention_gluon.attention_fwd

    def counted(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(attention_gluon, "attention_fwd", counted)
    monkeypatch.setattr(attn, "GLUON", "on")
    return calls


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("seqlens", [(200, 200), (113, 203)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("D", [64, 128])
def test_routed_forward_matches_the_triton_kernel(seqlens, D, monkeypatch):
    Sq, Sk = seqlens
    q, k, v = _qkv(2, Sq, Sk, 2, D, torch.bfloat16, "cuda")
    scale = D ** -0.5
    triton_out, triton_lse = torch.ops.opt_core.attention_fwd(q, k, v, None, True, scale, 0.0, 0)
    calls = _route_to_gluon(monkeypatch)
    out, lse = torch.ops.opt_core.attention_fwd(q, k, v, None, True, scale, 0.0, 0)
    assert len(calls) == 1
    ref, plain, ref_lse = _reference(q, k, v, True, scale)
    assert_close_to_reference("gluon out", out, ref, plain, factor=FORWARD_FACTOR)
    assert_close_to_reference("triton out", triton_out, ref, plain, factor=FORWARD_FACTOR)
    _check_lse(lse, ref_lse)
    torch.testing.assert_close(lse, triton_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("seqlens", [(200, 200), (203, 113)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("D, dtype", [(64, torch.float16), (128, torch.bfloat16)], ids=str)
def test_backward_through_the_routed_forward(seqlens, D, dtype, monkeypatch):
    Sq, Sk = seqlens
    q, k, v = _qkv(2, Sq, Sk, 2, D, dtype, "cuda")
    grad = torch.randn(2, Sq, 2, D, dtype=torch.float64, device="cuda")
    calls = _route_to_gluon(monkeypatch)

    def run(fn, cast=None):
        xs = [t.detach().to(cast or t.dtype).requires_grad_(True) for t in (q, k, v)]
        out = fn(*xs)
        out.backward(grad.to(out.dtype))
        return out, [x.grad for x in xs]

    ours, ours_g = run(lambda *t: functional.attention(*t, causal=True))
    assert len(calls) == 1
    ref, ref_g = run(lambda *t: reference.attention(*t, True), torch.float64)
    plain, plain_g = run(lambda *t: reference.attention(*t, True, upcast=False))
    assert_close_to_reference("out", ours, ref, plain, factor=FORWARD_FACTOR)
    for name, o, r, p in zip(("dq", "dk", "dv"), ours_g, ref_g, plain_g):
        assert_close_to_reference(name, o, r, p, factor=GRADIENT_FACTOR)
