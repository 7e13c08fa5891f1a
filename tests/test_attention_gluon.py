"""The Gluon attention forward (kernels/attention_gluon.py, FlashAttention-3's schedule on sm_90).

The interpreter cannot run Gluon, so on the CPU these check the AOT compile of its default configs, the
routing switch, ``supported()``, the host function's errors (all before any launch), the head-dim split
and, in float64, the kernel's blockwise arithmetic (chunked products, masks, online softmax); the
numerics of the kernel itself (out and lse against float64, the routed forward against the Triton
kernel, a backward through the routed forward) are ``gpu`` tests, run on a Hopper GPU.
"""

from __future__ import annotations

import math

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
def test_default_configs_overlap_the_softmax_with_a_product(aot_compile):
    """sm_90 compile of the default config per head dim: no spills, shared memory within the limit, TMA
    loads and stores, one wgmma in flight across the softmax, producer/consumer partitions with register
    limits."""
    compiled = aot_compile("attention_gluon_fwd")
    results = [compiled[(c.name, 90)] for c in aot_cases.attention_gluon_cases()]
    assert [r["case"].split(",BLOCK_N")[0] for r in results] == [
        "attention_gluon_fwd[D=64,bfloat16,causal", "attention_gluon_fwd[D=80,bfloat16,causal",
        "attention_gluon_fwd[D=128,bfloat16,causal", "attention_gluon_fwd[D=128,bfloat16",
        "attention_gluon_fwd[D=80,bfloat16,causal", "attention_gluon_fwd[D=128,bfloat16,causal"]
    assert [r["case"].endswith(",persistent]") for r in results] == [False] * 4 + [True] * 2
    for r in results:
        assert not aot.problems(r), (r["case"], aot.problems(r))
        assert r["stack"] == 0 and r["shared"] <= r["max_shared"], r
        assert r["wgmma"] and r["tma"] and r["tma_store"], r
        assert r["wgmma_max_pending"] >= 1 and r["warp_specialized"], r
        assert r["persistent"] == r["case"].endswith(",persistent]"), r
        assert not r["wgmma_serialized"], r  # ptxas keeps every wgmma asynchronous as written


@pytest.mark.parametrize("D", [64, 80, 128])
def test_aot_descriptors_are_what_a_launch_specialises_to(D):
    """The AOT cases compile the code a launch gets: the host descriptors' types (block and shared layout)
    of every head-dim chunk equal the cases' signature; a head_dim without a tail passes None (a constexpr)."""
    case = next(c for c in aot_cases.attention_gluon_cases() if c.name.startswith(f"attention_gluon_fwd[D={D},"))
    block_n = attention_gluon.CONFIGS[D][0]
    q, k, _ = _qkv(2, 300, 300, 3, D, torch.bfloat16, "cpu")
    for names, t, rows in ((("q", "o"), q, attention_gluon.ROWS_PER_CONSUMER), (("k", "v"), k, block_n)):
        main, tail = attention_gluon._chunk_descriptors(t, rows)
        assert main.block_shape == [1, rows, 1, attention_gluon.head_chunks(D)[0]]
        for name in names:
            assert mangle_type(main) == case.signature[f"{name}_desc"]
            if tail is None:
                assert case.signature[f"{name}_tail_desc"] == "constexpr"
                assert case.constexprs[f"{name}_tail_desc"] is None
            else:
                assert tail.block_shape == [1, rows, 1, D - main.block_shape[3]]
                assert mangle_type(tail) == case.signature[f"{name}_tail_desc"]


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
    assert attention_gluon.PERSISTENT == "off"


def test_persistent_switch_is_validated(monkeypatch):
    """Checked before anything else, so a CPU run sees it."""
    monkeypatch.setattr(attention_gluon, "PERSISTENT", True)
    q, k, v = _qkv(1, 8, 8, 1, 64, torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match=r"opt_core\.kernels\.attention_gluon\.PERSISTENT must be one of"):
        attention_gluon.attention_fwd(q, k, v, True, 0.125)


MB = 2**20


# (batch * heads, K and V bytes per (batch, head), L2 bytes, pairs per group)
HEAD_GROUPS = [
    (64, 4 * MB, 50 * MB, 4),    # 6 fit in half the L2; 4 divides 64
    (24, 2 * MB, 50 * MB, 12),   # 12 fit and divide 24
    (6, MB // 2, 50 * MB, 6),    # all of them fit
    (7, 2 * MB, 50 * MB, 7),     # a prime count that fits whole
    (7, MB, 10 * MB, 1),         # a prime count that does not: one pair at a time
    (3, 100 * MB, 50 * MB, 1),   # not even one fits: one pair at a time
]


@pytest.mark.parametrize("batch_heads, kv_bytes, l2_bytes, expected", HEAD_GROUPS)
def test_persistent_head_group_fits_in_l2_and_divides_the_pairs(batch_heads, kv_bytes, l2_bytes, expected):
    assert attention_gluon.head_group(batch_heads, kv_bytes, l2_bytes) == expected


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
    ("head_dim 96", lambda q, k, v: _qkv(2, 33, 40, 2, 96, q.dtype, "cpu"), "head_dim"),
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


@pytest.mark.parametrize("D", [64, 80, 128])
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


# --------------------------------------------------------------------------- head-dim chunks
@pytest.mark.parametrize("head_dim, chunks", [(64, (64,)), (80, (64, 16)), (128, (128,)), (96, (64, 32)),
                                              (144, (128, 16)), (16, (16,))])
def test_head_dim_splits_into_a_power_of_two_and_a_power_of_two_tail(head_dim, chunks):
    assert attention_gluon.head_chunks(head_dim) == chunks


@pytest.mark.parametrize("head_dim", [72, 112, 8, 0])
def test_head_dim_without_such_a_split_is_refused(head_dim):
    with pytest.raises(ValueError, match="head_dim"):
        attention_gluon.head_chunks(head_dim)


def test_every_supported_head_dim_splits():
    for head_dim in attention_gluon.HEAD_DIMS:
        assert sum(attention_gluon.head_chunks(head_dim)) == head_dim


def _emulated_forward(q, k, v, causal, scale):
    """(out, lse) by the kernel's arithmetic in float64: per 64-row consumer tile of a 128-row program,
    key blocks of BLOCK_N up to the program's causal bound (zero-filled past seqlen_k as TMA fills them),
    S summed over the head-dim chunks (chunk c at column c * main), per-row masks only on blocks past the
    tile's least last key, exp2 online softmax, O per chunk, 0 out and +inf lse for rows that see no key."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    block_n = attention_gluon.CONFIGS[D][0]
    rows_m, chunks = attention_gluon.ROWS_PER_CONSUMER, attention_gluon.head_chunks(D)
    cols = [slice(c * chunks[0], c * chunks[0] + width) for c, width in enumerate(chunks)]
    num_blocks = math.ceil(Sk / block_n)
    pad = num_blocks * block_n - Sk
    k, v = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad)).transpose(1, 2) for t in (k, v))  # (B, H, keys, D)
    out, lse = torch.empty(B, H, Sq, D, dtype=torch.float64), torch.empty(B, H, Sq, dtype=torch.float64)
    for first in range(0, Sq, rows_m):
        rows = torch.arange(first, min(first + rows_m, Sq))
        qt = q[:, rows].transpose(1, 2)
        last_key = torch.minimum(rows + Sk - Sq, torch.tensor(Sk - 1)) if causal else torch.full_like(rows, Sk - 1)
        start_m = first // attention_gluon.ROWS_PER_PROGRAM * attention_gluon.ROWS_PER_PROGRAM
        hi = min(max(start_m + attention_gluon.ROWS_PER_PROGRAM + Sk - Sq, 0), Sk) if causal else Sk
        m = torch.full((B, H, len(rows)), -math.inf, dtype=torch.float64)
        l = torch.zeros_like(m)
        acc = [torch.zeros(B, H, len(rows), c.stop - c.start, dtype=torch.float64) for c in cols]
        for j in range(math.ceil(hi / block_n)):
            keys = slice(j * block_n, (j + 1) * block_n)
            s = sum(qt[..., c] @ k[:, :, keys, c].transpose(-1, -2) for c in cols) * (scale * attention_gluon.LOG2E)
            if (j + 1) * block_n - 1 > int(last_key[0]):
                s = s.masked_fill(torch.arange(keys.start, keys.stop)[None, :] > last_key[:, None], -math.inf)
            m_new = torch.maximum(m, s.amax(-1))
            m_sub = m_new.masked_fill(m_new == -math.inf, 0.0)
            alpha, p = torch.exp2(m - m_sub), torch.exp2(s - m_sub[..., None])
            l, m = l * alpha + p.sum(-1), m_new
            acc = [a * alpha[..., None] + p @ v[:, :, keys, c] for a, c in zip(acc, cols)]
        no_key = l == 0
        l_safe = l.masked_fill(no_key, 1.0)
        out[:, :, rows] = (torch.cat(acc, -1) / l_safe[..., None]).masked_fill(no_key[..., None], 0.0)
        lse[:, :, rows] = ((m + torch.log2(l_safe)) * math.log(2.0)).masked_fill(no_key, math.inf)
    return out.transpose(1, 2), lse


# 400x113 causal: a program whose rows see no key at all
@pytest.mark.parametrize("seqlens", [(1, 1), (200, 200), (113, 203), (203, 113), (400, 113)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("D", attention_gluon.HEAD_DIMS)
def test_blockwise_arithmetic_matches_the_reference(seqlens, causal, D):
    """The kernel's algorithm, not the kernel (the interpreter cannot run Gluon): in float64 its blocks,
    chunks, masks and online softmax give the reference's out and lse."""
    Sq, Sk = seqlens
    q, k, v = _qkv(2, Sq, Sk, 3, D, torch.float64, "cpu")
    scale = D ** -0.5
    out, lse = _emulated_forward(q, k, v, causal, scale)
    torch.testing.assert_close(out, reference.attention(q, k, v, causal, scale), rtol=1e-10, atol=1e-10)
    expected = reference.attention_lse(q, k, causal, scale)
    assert torch.equal(torch.isinf(lse), torch.isinf(expected))
    torch.testing.assert_close(lse, expected, rtol=1e-10, atol=1e-10)


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
@pytest.mark.parametrize("D", [64, 80, 128])
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


# (seqlens, (batch, heads), pairs per group or None for the launch's own): 8 x 4 x 8 tiles of 128 rows at
# 1000 are more than an H100/H200 has SMs, so programs run several tiles; at 400x113 causal the first
# tile of each (batch, head) sees no key (no turns, no key blocks).
PERSISTENT_CASES = [((1, 1), (2, 3), None), ((113, 203), (2, 3), None), ((400, 113), (4, 8), 4),
                    ((1000, 1000), (4, 8), None), ((1000, 1000), (4, 8), 1), ((1000, 1000), (4, 8), 8)]


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("seqlens, shape, group", PERSISTENT_CASES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("D", [80, 128])
def test_persistent_runs_the_same_tiles(seqlens, shape, group, causal, D, monkeypatch):
    """PERSISTENT on: bitwise the non-persistent kernel's out and lse (the same arithmetic per tile, only
    the order of the tiles and the barrier phases differ), within the float64 rule."""
    (Sq, Sk), (B, H) = seqlens, shape
    q, k, v = _qkv(B, Sq, Sk, H, D, torch.bfloat16, "cuda")
    scale = D ** -0.5
    expected_out, expected_lse = attention_gluon.attention_fwd(q, k, v, causal, scale)
    monkeypatch.setattr(attention_gluon, "PERSISTENT", "on")
    if group is not None:
        monkeypatch.setattr(attention_gluon, "head_group", lambda *args: group)
    out, lse = attention_gluon.attention_fwd(q, k, v, causal, scale)
    assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)
    ref, plain, ref_lse = _reference(q, k, v, causal, scale)
    assert_close_to_reference("out", out, ref, plain, factor=FORWARD_FACTOR)
    _check_lse(lse, ref_lse)


def routed_calls(monkeypatch, module, function: str, switch: str, shape_of: int) -> list:
    """The Triton attention module's ``switch`` on, with a list that gets the shape of argument ``shape_of``
    of each call of ``module.function`` (the Gluon kernel's host function) the routed op makes."""
    calls = []
    real = getattr(module, function)

    def counted(*args):
        calls.append(args[shape_of].shape)
        return real(*args)

    monkeypatch.setattr(module, function, counted)
    monkeypatch.setattr(attn, switch, "on")
    return calls


def _route_to_gluon(monkeypatch):
    """GLUON on, with a count of the forwards the Gluon kernel ran."""
    return routed_calls(monkeypatch, attention_gluon, "attention_fwd", "GLUON", 0)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("seqlens", [(200, 200), (113, 203)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("D", [64, 80, 128])
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
@pytest.mark.parametrize("D, dtype", [(64, torch.float16), (80, torch.bfloat16), (128, torch.bfloat16)], ids=str)
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
