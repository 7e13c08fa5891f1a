"""The Gluon attention backward (kernels/attention_gluon_bwd.py, FlashAttention-3's five products on sm_90).

The interpreter cannot run Gluon, so on the CPU these check the AOT compile of its configs, the routing
switch, ``supported()``, the host function's errors (all before any launch), and a float64 emulation of
the kernel's tile loop (its blocks, masks, shifted accumulators and dQ halves) against the reference
gradients.  The numerics of the kernel itself (dq, dk, dv against float64, against the Triton backward,
bitwise repeatability, a full forward + backward through ``functional.attention``) are ``gpu`` tests,
run on a Hopper GPU.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import triton
from triton.runtime.jit import mangle_type

from opt_core import functional
from opt_core.kernels import aot, aot_cases, reference
from opt_core.kernels import attention as attn
from opt_core.kernels import attention_gluon
from opt_core.kernels import attention_gluon_bwd as gbwd
from opt_core.kernels.testing import FORWARD_FACTOR, GRADIENT_FACTOR, assert_close_to_reference
from test_attention import _assert_single_key_gradient, _run
from test_attention_gluon import routed_calls


def _qkv(B, Sq, Sk, H, D, dtype, device):
    return (torch.randn(B, Sq, H, D, dtype=dtype, device=device), torch.randn(B, Sk, H, D, dtype=dtype, device=device),
            torch.randn(B, Sk, H, D, dtype=dtype, device=device))


def _rows(B, Sq, H, device="cpu"):
    """A well-formed lse or delta: (batch, heads, seqlen_q) fp32."""
    return torch.randn(B, H, Sq, dtype=torch.float32, device=device)


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


hopper = pytest.mark.skipif(not _hopper(), reason="needs a GPU of compute capability 9.x")


# --------------------------------------------------------------------------- AOT (no GPU)
def test_configs_compile_warp_specialized_without_spills(aot_compile):
    """sm_90 compile of every case: no spills, shared memory within the limit, TMA loads and stores, wgmma
    with two products in flight past a wait, producer/consumer partitions with register limits."""
    compiled = aot_compile("attention_gluon_bwd")
    results = [compiled[(c.name, 90)] for c in aot_cases.attention_gluon_bwd_cases()]
    assert [r["case"].split(",stages")[0] for r in results] == [
        "attention_gluon_bwd[D=64,bfloat16,causal", "attention_gluon_bwd[D=80,bfloat16,causal",
        "attention_gluon_bwd[D=128,bfloat16,causal",
        "attention_gluon_bwd[D=128,bfloat16", "attention_gluon_bwd[D=128,bfloat16,causal,nondeterministic"]
    for r in results:
        assert not aot.problems(r), (r["case"], aot.problems(r))
        assert r["stack"] == 0 and r["shared"] <= r["max_shared"], r
        assert r["wgmma"] and r["tma"] and r["tma_store"] and r["warp_specialized"], r
        assert r["wgmma_max_pending"] == 2, r
        # dP^T started at -delta: ptxas waits for S^T before it (C7517); started at 0 it keeps both in flight
        head_dim = int(r["case"].split("D=")[1].split(",")[0])
        assert r["wgmma_serialized"] == gbwd.DP_FROM_DELTA[head_dim] and set(r["wgmma_notes"]) <= {"C7517"}, r


@pytest.mark.parametrize("D", [64, 80, 128])
def test_aot_descriptors_are_what_a_launch_specialises_to(D):
    """The AOT cases compile the code a launch gets: the host's descriptor arguments (block and shared layout
    of every head-dim chunk; None, a constexpr, for no tail and for no K in halves) equal the cases'."""
    case = next(c for c in aot_cases.attention_gluon_bwd_cases() if c.name.startswith(f"attention_gluon_bwd[D={D},"))
    q, k, _ = _qkv(2, 300, 300, 3, D, torch.bfloat16, "cpu")
    args = gbwd.descriptors(dict(q=q, do=q, k=k, v=k, dk=k, dv=k))
    assert len(args) == 13
    for name, descriptor in args.items():
        if descriptor is None:
            assert case.signature[name] == "constexpr" and case.constexprs[name] is None, name
        else:
            assert mangle_type(descriptor) == case.signature[name], name
    chunked = len(attention_gluon.head_chunks(D)) == 2
    assert (args["q_tail_desc"] is None) != chunked and (args["kh_desc"] is None) == chunked
    widths = [args[f"q{part}_desc"].block_shape[3] for part in ("", "_tail") if args[f"q{part}_desc"] is not None]
    assert sum(widths) == D


@pytest.mark.parametrize("D", [64, 80, 128])
def test_launch_binds_every_kernel_parameter(D, monkeypatch):
    """The host's launch on the CPU with the device check and the kernel stubbed: its arguments bind to the
    kernel's parameters by name (a misspelt one would first fail on a GPU), with the grid, the head-dim
    chunks' descriptors and the config the AOT cases compile."""
    launches = []
    parameters = inspect.signature(gbwd.bwd_kernel.fn)

    class Kernel:
        def __getitem__(self, grid):
            return lambda **kwargs: launches.append((grid, parameters.bind(
                **{k: v for k, v in kwargs.items() if k != "num_warps"}).arguments, kwargs["num_warps"]))

    monkeypatch.setattr(gbwd, "_problem_all", lambda *args: None)
    monkeypatch.setattr(gbwd, "bwd_kernel", Kernel())
    dout, q, k, v, lse, delta = _good(B=2, Sq=33, Sk=200, H=3, D=D)
    gbwd.attention_bwd(dout, q, k, v, lse, delta, True, 0.125, True)
    (grid, args, warps), = launches
    assert grid == (2 * 2 * 3,) and warps == 4
    assert set(args) == set(parameters.parameters)
    assert (args["q_tail_desc"] is None) == (D != 80) and (args["kh_desc"] is None) == (D == 80)
    assert args["NUM_STAGES"] == gbwd.NUM_STAGES[D] and args["CAUSAL"] and args["DETERMINISTIC"]
    # A kernel argument, not a global the kernel reads: the compile cache keys on it.
    assert args["DP_FROM_DELTA"] == gbwd.DP_FROM_DELTA[D]
    assert args["DQ_ACC"].shape == (2 * 3, 64, D) and args["LOCKS"].numel() == 2 * 3 * 1 * 2
    assert (args["seqlen_q"], args["seqlen_k"], args["dq_acc_rows"]) == (33, 200, 64)


@pytest.mark.parametrize("D, columns", [(64, (32, 32)), (80, (64, 16)), (128, (64, 64))])
def test_dq_columns_split_head_dim_between_the_consumers(D, columns):
    assert gbwd.dq_columns(D) == columns


# --------------------------------------------------------------------------- routing switch
def test_switch_is_validated(monkeypatch):
    q, k, v = _qkv(1, 3, 3, 1, 16, torch.float32, "cpu")
    out, lse = attn._launch_fwd(q, k, v, None, True, 0.25, 0.0, 0)
    monkeypatch.setattr(attn, "GLUON_BWD", "auto")
    with pytest.raises(ValueError, match=r"opt_core\.kernels\.attention\.GLUON_BWD must be one of"):
        attn._launch_bwd(torch.randn_like(q), q, k, v, out, lse, None, True, 0.25, 0.0, 0)


@pytest.mark.parametrize("mode", ["off", "on"])
def test_cpu_tensors_never_go_to_gluon(mode, monkeypatch):
    monkeypatch.setattr(attn, "GLUON_BWD", mode)
    q, k, v = _qkv(1, 5, 5, 2, 64, torch.bfloat16, "cpu")
    assert not attn._gluon_bwd_takes(torch.randn_like(q), q, k, v, _rows(1, 5, 2), None, 0.0, 0.125)


def test_default_is_off():
    assert attn.GLUON_BWD == "off"


# --------------------------------------------------------------------------- supported() and errors
def _strided_last(B, S, H, D, dtype):
    return torch.randn(B, S, H, 2 * D, dtype=dtype)[..., ::2]


def _misaligned(B, S, H, D, dtype):
    # a base 2 bytes past a 16-byte boundary
    return torch.randn(B * S * H * D + 1, dtype=dtype)[1:].view(B, S, H, D)


def _good(B=2, Sq=33, Sk=40, H=2, D=64, dtype=torch.bfloat16):
    """(dout, q, k, v, lse, delta) the kernel takes but for the device."""
    q, k, v = _qkv(B, Sq, Sk, H, D, dtype, "cpu")
    return torch.randn_like(q), q, k, v, _rows(B, Sq, H), _rows(B, Sq, H)


def _with(**changes):
    """A good argument set with some replaced: each value maps the good tuple to the new argument."""
    names = ("dout", "q", "k", "v", "lse", "delta")

    def make():
        args = dict(zip(names, _good()))
        args.update({name: change(args) for name, change in changes.items()})
        return tuple(args[n] for n in names)
    return make


# (what is wrong, how to make the arguments, the error it raises)
BAD_INPUTS = [
    ("fp32", lambda: tuple(t.float() for t in _good()), "float16 or bfloat16"),
    ("head_dim 96", lambda: _good(D=96), r"head_dim \(q.shape\[3\]\) must be one of \(64, 80, 128\)"),
    ("head_dim 32", lambda: _good(D=32), "head_dim"),
    ("mixed dtypes", _with(k=lambda a: a["k"].half()), "one dtype"),
    ("3-D q", _with(q=lambda a: a["q"][0]), "4-D"),
    ("k heads", _with(k=lambda a: a["k"][:, :, :1], v=lambda a: a["v"][:, :, :1]), "to match q"),
    ("empty q", lambda: _good(Sq=0), "empty"),
    ("misaligned k", _with(k=lambda a: _misaligned(2, 40, 2, 64, torch.bfloat16)), "TMA"),
    ("dout shape", _with(dout=lambda a: a["dout"][:, :7]), "dout must be a torch.bfloat16 tensor of q's shape"),
    ("dout dtype", _with(dout=lambda a: a["dout"].half()), "dout must be"),
    ("strided dout", _with(dout=lambda a: _strided_last(2, 33, 2, 64, torch.bfloat16)), "dout must suit a TMA"),
    ("lse dtype", _with(lse=lambda a: a["lse"].double()), r"lse must be a float32 tensor of shape \(2, 2, 33\)"),
    ("delta shape", _with(delta=lambda a: a["delta"][:, :, :5]), "delta must be a float32 tensor"),
    ("lse strides", _with(lse=lambda a: a["lse"].transpose(1, 2).contiguous().transpose(1, 2)), "lse must be contig"),
    ("cpu", lambda: _good(), "CUDA device"),
]


@pytest.mark.parametrize("make, message", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_host_function_names_what_it_cannot_take(make, message):
    dout, q, k, v, lse, delta = make()
    with pytest.raises(ValueError, match=message):
        gbwd.attention_bwd(dout, q, k, v, lse, delta, True, 0.125)
    if not message.startswith(("dout", "lse", "delta")):  # supported() sees q, k, v (and dout) only
        assert not gbwd.supported(q, k, v, None, 0.0, dout, 0.125)


@pytest.mark.parametrize("flags, error, message", [
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(deterministic=None), TypeError, "deterministic must be a bool"),
    (dict(softmax_scale="0.1"), TypeError, "softmax_scale must be a float"),
    (dict(softmax_scale=0.0), ValueError, "softmax_scale must be a finite float > 0"),
    (dict(softmax_scale=-0.5), ValueError, "softmax_scale must be a finite float > 0"),
    (dict(softmax_scale=math.inf), ValueError, "softmax_scale must be a finite float > 0"),
], ids=["causal", "deterministic", "scale type", "scale 0", "scale < 0", "scale inf"])
def test_host_function_checks_its_flags(flags, error, message):
    args = dict(causal=True, softmax_scale=0.125, deterministic=True) | flags
    with pytest.raises(error, match=message):
        gbwd.attention_bwd(*_good(), **args)


@pytest.mark.parametrize("D", [64, 80, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_supported_inputs_fail_only_for_the_device(D, dtype):
    """Everything but the device suits the kernel: the only error left is the CPU device."""
    args = _good(2, 17, 9, 3, D, dtype)
    with pytest.raises(ValueError, match="must be on one CUDA device"):
        gbwd.attention_bwd(*args, False, 0.1, False)


def test_supported_decisions():
    dout, q, k, v, _, _ = _good()
    assert not gbwd.supported(q, k, v, None, 0.0)  # the CPU device
    assert not gbwd.supported(q, k, v, torch.ones(2, 40, dtype=torch.bool), 0.0)
    assert not gbwd.supported(q, k, v, None, 0.1)
    assert not gbwd.supported(*_good(D=96)[1:4], None, 0.0)


def test_supported_checks_dout_and_scale_where_given(monkeypatch):
    """Past the q, k, v checks (the device one stubbed out), dout and the scale decide."""
    monkeypatch.setattr(gbwd, "_problem", lambda q, k, v: None)
    dout, q, k, v, _, _ = _good()
    assert gbwd.supported(q, k, v, None, 0.0) and gbwd.supported(q, k, v, None, 0.0, dout, 0.125)
    assert not gbwd.supported(q, k, v, None, 0.0, dout[:, :5], 0.125)
    assert not gbwd.supported(q, k, v, None, 0.0, dout.half(), 0.125)
    assert not gbwd.supported(q, k, v, None, 0.0, _strided_last(2, 33, 2, 64, torch.bfloat16), 0.125)
    assert not gbwd.supported(q, k, v, None, 0.0, dout, 0.0)
    assert not gbwd.supported(q, k, v, None, 0.0, dout, float("nan"))


# --------------------------------------------------------------------------- the tile loop, emulated (CPU)
def _padded(t, rows):
    """t (batch, seqlen, heads, head_dim) with zero rows up to ``rows``, as the TMA boxes read past the end."""
    out = t.new_zeros((t.shape[0], rows) + tuple(t.shape[2:]))
    out[:, :t.shape[1]] = t
    return out


def _emulated_key_block(n, b, h, tensors, causal, scale, dq_acc):
    """Key block n of (b, h) as the kernel runs it: returns its (dk, dv) rows unscaled, adds into dq_acc."""
    dout, q, k, v, lse, delta, Sq, Sk = tensors
    M, KEYS = gbwd.BLOCK_M, gbwd.KEYS_PER_CONSUMER
    start_n, diag = n * gbwd.BLOCK_N, Sk - Sq
    lo = (min(max(start_n - diag, 0), Sq) // M) * M if causal else 0
    keys = [(k[b, start_n + c * KEYS:start_n + (c + 1) * KEYS, h], v[b, start_n + c * KEYS:start_n + (c + 1) * KEYS, h])
            for c in (0, 1)]
    grads = [[torch.zeros_like(keys[0][0]), torch.zeros_like(keys[0][0])] for _ in (0, 1)]
    for start_m in range(lo, Sq, M):
        q_t, do_t = q[b, start_m:start_m + M, h], dout[b, start_m:start_m + M, h]
        ds_tiles = []
        for c, (k_c, v_c) in enumerate(keys):
            s_t = (k_c @ q_t.T - lse[b, h, start_m:start_m + M][None, :] / scale) * (scale * attn.LOG2E)
            first_key = start_n + c * KEYS
            key_last = first_key + KEYS - 1
            if key_last >= Sk or (causal and key_last > start_m + diag):
                cols = torch.arange(first_key, first_key + KEYS)[:, None]
                rows = torch.arange(start_m, start_m + M)[None, :]
                visible = (cols < Sk) & ((cols <= rows + diag) if causal else True)
                s_t = torch.where(visible, s_t, -math.inf)
            p_t = torch.exp2(s_t)
            dp_t = v_c @ do_t.T - delta[b, h, start_m:start_m + M][None, :]
            ds_t = p_t * dp_t
            grads[c][0] += ds_t @ q_t
            grads[c][1] += p_t @ do_t
            ds_tiles.append(ds_t)
        widths = gbwd.dq_columns(q.shape[3])
        for c in (0, 1):  # consumer c's columns of dQ, over both consumers' keys
            cols = slice(sum(widths[:c]), sum(widths[:c + 1]))
            dq_acc[b, start_m:start_m + M, h, cols] += (ds_tiles[0].T @ keys[0][0][:, cols]
                                                        + ds_tiles[1].T @ keys[1][0][:, cols])
    return torch.cat([grads[0][0], grads[1][0]]), torch.cat([grads[0][1], grads[1][1]])


def _emulated_backward(dout, q, k, v, lse, delta, causal, scale):
    """(dq, dk, dv) by the kernel's blocks in float64: 64-row query blocks from the first one that sees a key
    block, 128-key blocks in two consumers' halves, the accumulators started at -lse / scale and -delta,
    masks only where the kernel applies them, dQ in the consumers' columns over both halves' keys."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    rows, keys = triton.cdiv(Sq, gbwd.BLOCK_M) * gbwd.BLOCK_M, triton.cdiv(Sk, gbwd.BLOCK_N) * gbwd.BLOCK_N
    lse_p = torch.full((B, H, rows), math.inf, dtype=torch.float64)
    lse_p[..., :Sq] = lse
    delta_p = torch.zeros((B, H, rows), dtype=torch.float64)
    delta_p[..., :Sq] = delta
    tensors = (_padded(dout, rows), _padded(q, rows), _padded(k, keys), _padded(v, keys), lse_p, delta_p, Sq, Sk)
    dq_acc = torch.zeros((B, rows, H, D), dtype=torch.float64)
    dk, dv = torch.zeros((B, keys, H, D), dtype=torch.float64), torch.zeros((B, keys, H, D), dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for n in range(keys // gbwd.BLOCK_N):
                block = slice(n * gbwd.BLOCK_N, (n + 1) * gbwd.BLOCK_N)
                dk[b, block, h], dv[b, block, h] = _emulated_key_block(n, b, h, tensors, causal, scale, dq_acc)
    return dq_acc[:, :Sq] * scale, dk[:, :Sk] * scale, dv[:, :Sk]


@pytest.mark.parametrize("seqlens, causal, D", [
    ((1, 1), True, 64), ((17, 17), False, 128), ((200, 200), True, 128), ((200, 200), False, 64),
    ((113, 203), True, 64), ((203, 113), True, 128), ((203, 113), False, 64), ((1, 239), True, 128),
    ((113, 203), True, 80), ((200, 200), False, 80),
], ids=str)
def test_emulated_tile_loop_matches_the_reference(seqlens, causal, D):
    """The kernel's blocking, masks (bottom-right causal, keys past seqlen_k, rows past seqlen_q and rows
    that see no key through lse = +inf), shifted accumulators and dQ columns give the float64 gradients."""
    Sq, Sk = seqlens
    q, k, v = _qkv(1, Sq, Sk, 2, D, torch.float64, "cpu")
    dout = torch.randn_like(q)
    scale = D ** -0.5
    out = reference.attention(q, k, v, causal, scale)
    lse = reference.attention_lse(q, k, causal, scale)
    delta = (dout * out).sum(-1).transpose(1, 2)
    ours = _emulated_backward(dout, q, k, v, lse, delta, causal, scale)
    expected = _run(lambda *t: reference.attention(*t, causal, scale), (q, k, v), dout)[1]
    for name, o, r in zip(("dq", "dk", "dv"), ours, expected):
        torch.testing.assert_close(o, r, rtol=1e-9, atol=1e-9, msg=name)


def _far_scores(Sq, Sk, D, dtype, device):
    """q, k, v whose every score is about -1600 (keys near one direction, queries opposite): lse is about
    -1600, so a key past seqlen_k (K = 0, score 0) would get P = exp(1600), inf even in float64."""
    u = torch.randn(D, dtype=torch.float64)
    k = u + 0.1 * torch.randn(1, Sk, 2, D, dtype=torch.float64)
    q = -1600 / (u @ u * D ** -0.5) * u + 0.1 * torch.randn(1, Sq, 2, D, dtype=torch.float64)
    return q.to(dtype).to(device), k.to(dtype).to(device), torch.randn(1, Sk, 2, D, dtype=dtype, device=device)


def test_emulated_tile_loop_keeps_keys_past_the_end_out():
    """Very negative scores: only the mask of the keys past seqlen_k keeps their inf P out of dQ."""
    q, k, v = _far_scores(70, 113, 64, torch.float64, "cpu")
    dout = torch.randn_like(q)
    out = reference.attention(q, k, v, False, 0.125)
    lse = reference.attention_lse(q, k, False, 0.125)
    assert lse.max() < -1000
    ours = _emulated_backward(dout, q, k, v, lse, (dout * out).sum(-1).transpose(1, 2), False, 0.125)
    expected = _run(lambda *t: reference.attention(*t, False, 0.125), (q, k, v), dout)[1]
    for name, o, r in zip(("dq", "dk", "dv"), ours, expected):
        torch.testing.assert_close(o, r, rtol=1e-9, atol=1e-9, msg=name)


def _first_query_block(start_n, Sq, Sk, causal):
    """The kernel's ``_first_query_block``."""
    return (min(max(start_n - Sk + Sq, 0), Sq) // gbwd.BLOCK_M) * gbwd.BLOCK_M if causal else 0


def _turn_keeper(n, Sq, Sk, causal, locks, added):
    """Key block n's turn keeper as the kernel runs it (DETERMINISTIC), one step per yield: True when it
    moved, False when it waits for its turn."""
    wait_from = _first_query_block((n + 1) * gbwd.BLOCK_N, Sq, Sk, causal) if (n + 1) * gbwd.BLOCK_N < Sk else Sq
    for start_m in range(_first_query_block(n * gbwd.BLOCK_N, Sq, Sk, causal), Sq, gbwd.BLOCK_M):
        m = start_m // gbwd.BLOCK_M
        while start_m >= wait_from and locks[m] != n + 2:
            yield False
        added[m].append(n)
        locks[m] = n + 1
        yield True


@pytest.mark.parametrize("Sq, Sk", [(1000, 1000), (300, 1000), (1000, 300), (64, 700)])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("resident", [1, 3])
def test_deterministic_dq_order_is_fixed_and_never_waits_on_a_later_program(Sq, Sk, causal, resident):
    """The turn keepers of one (batch, head), started last key block first with ``resident`` programs at a
    time: all finish (no program waits for one that cannot start), and every query block's parts are added
    by exactly the key blocks that see it, from the last down."""
    num_n = triton.cdiv(Sk, gbwd.BLOCK_N)
    locks, added = [0] * triton.cdiv(Sq, gbwd.BLOCK_M), [[] for _ in range(triton.cdiv(Sq, gbwd.BLOCK_M))]
    waiting = [_turn_keeper(n, Sq, Sk, causal, locks, added) for n in reversed(range(num_n))]
    running = []
    while waiting or running:
        running += [waiting.pop(0) for _ in range(min(resident - len(running), len(waiting)))]
        moved = [next(program, None) for program in running]
        assert any(step is not False for step in moved), f"deadlock: {len(running)} programs wait"
        running = [program for program, step in zip(running, moved) if step is not None]
    for m, order in enumerate(added):
        seen_by = [n for n in range(num_n) if _first_query_block(n * gbwd.BLOCK_N, Sq, Sk, causal) <= m * gbwd.BLOCK_M]
        assert order == sorted(seen_by, reverse=True), (m, order)


# --------------------------------------------------------------------------- numerics (GPU)
def _forward(q, k, v, causal, scale):
    """(out, lse) from the Triton forward."""
    return torch.ops.opt_core.attention_fwd(q, k, v, None, causal, scale, 0.0, 0)


def _delta(dout, out):
    """rowsum(dO * O) in fp32, (batch, heads, seqlen_q), as the preprocess kernel forms it."""
    return (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()


def _check_gradients(grads, q, k, v, dout, causal, scale):
    """grads (dq, dk, dv) against the float64 reference under the rule (one key: dq = dk = 0 up to rounding)."""
    ref_g = _run(lambda *t: reference.attention(*t, causal, scale), (q, k, v), dout, torch.float64)[1]
    plain_g = _run(lambda *t: reference.attention(*t, causal, scale, upcast=False), (q, k, v), dout)[1]
    for name, o, r, p in zip(("dq", "dk", "dv"), grads, ref_g, plain_g):
        assert o.dtype == q.dtype and o.shape == r.shape, name
        if k.shape[1] == 1 and name != "dv":
            _assert_single_key_gradient(name, o, q, k, v, dout, scale)
        else:
            assert_close_to_reference(name, o, r, p, factor=GRADIENT_FACTOR)


def _gluon_gradients(q, k, v, dout, causal, scale, deterministic=True):
    out, lse = _forward(q, k, v, causal, scale)
    assert gbwd.supported(q, k, v, None, 0.0, dout, scale)
    return gbwd.attention_bwd(dout, q, k, v, lse, _delta(dout, out), causal, scale, deterministic)


SEQLENS = [(1, 1), (17, 17), (128, 128), (200, 200), (1000, 1000), (113, 203), (203, 113)]


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("seqlens", SEQLENS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("D", [64, 80, 128])
def test_matches_float64_reference(seqlens, causal, D):
    Sq, Sk = seqlens
    q, k, v = _qkv(2, Sq, Sk, 3, D, torch.bfloat16, "cuda")
    dout = torch.randn_like(q)
    scale = D ** -0.5
    grads = _gluon_gradients(q, k, v, dout, causal, scale)
    _check_gradients(grads, q, k, v, dout, causal, scale)
    if causal and Sq > Sk:  # the first Sq - Sk queries see no key: exactly 0
        assert torch.equal(grads[0][:, :Sq - Sk], torch.zeros_like(grads[0][:, :Sq - Sk]))


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("D", [64, 80, 128])
def test_fp16_matches_float64_reference(causal, D):
    """fp16 at an unequal pair; the non-deterministic dQ adds where not causal."""
    Sq, Sk = 113, 203
    q, k, v = _qkv(2, Sq, Sk, 2, D, torch.float16, "cuda")
    dout = torch.randn_like(q)
    grads = _gluon_gradients(q, k, v, dout, causal, D ** -0.5, deterministic=causal)
    _check_gradients(grads, q, k, v, dout, causal, D ** -0.5)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("D", [64, 80, 128])
def test_keys_past_the_end_stay_out_with_very_negative_scores(D):
    """lse about -1600: a key past seqlen_k unmasked would make P = inf and dQ NaN."""
    q, k, v = _far_scores(70, 113, D, torch.bfloat16, "cuda")
    dout = torch.randn_like(q)
    grads = _gluon_gradients(q, k, v, dout, False, 0.125)
    _check_gradients(grads, q, k, v, dout, False, 0.125)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("D, causal", [(64, True), (80, True), (128, False)])
def test_deterministic_is_bitwise_repeatable(D, causal):
    """Many key blocks add into each query block's dQ: two runs give the same bits."""
    q, k, v = _qkv(2, 1000, 1100, 4, D, torch.bfloat16, "cuda")
    dout = torch.randn_like(q)
    out, lse = _forward(q, k, v, causal, D ** -0.5)
    delta = _delta(dout, out)
    first = gbwd.attention_bwd(dout, q, k, v, lse, delta, causal, D ** -0.5, True)
    second = gbwd.attention_bwd(dout, q, k, v, lse, delta, causal, D ** -0.5, True)
    for name, a, b in zip(("dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), name


def _route_to_gluon(monkeypatch):
    """GLUON_BWD on, with a count of the backwards the Gluon kernel ran (q's shape each)."""
    return routed_calls(monkeypatch, gbwd, "attention_bwd", "GLUON_BWD", 1)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("seqlens", [(200, 200), (113, 203)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("D", [64, 80, 128])
def test_routed_backward_matches_the_triton_kernel(seqlens, D, monkeypatch):
    """The same inputs through the Triton backward and the routed Gluon one: both within the rule."""
    Sq, Sk = seqlens
    q, k, v = _qkv(2, Sq, Sk, 2, D, torch.bfloat16, "cuda")
    dout = torch.randn_like(q)
    scale = D ** -0.5
    out, lse = _forward(q, k, v, True, scale)
    triton_g = torch.ops.opt_core.attention_bwd(dout, q, k, v, out, lse, None, True, scale, 0.0, 0)
    calls = _route_to_gluon(monkeypatch)
    gluon_g = torch.ops.opt_core.attention_bwd(dout, q, k, v, out, lse, None, True, scale, 0.0, 0)
    assert len(calls) == 1
    _check_gradients(triton_g, q, k, v, dout, True, scale)
    _check_gradients(gluon_g, q, k, v, dout, True, scale)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("seqlens", [(200, 200), (203, 113)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("D, dtype", [(64, torch.float16), (80, torch.bfloat16), (128, torch.bfloat16)], ids=str)
def test_functional_attention_through_the_routed_backward(seqlens, D, dtype, monkeypatch):
    Sq, Sk = seqlens
    q, k, v = _qkv(2, Sq, Sk, 2, D, dtype, "cuda")
    grad = torch.randn(2, Sq, 2, D, dtype=torch.float64, device="cuda")
    calls = _route_to_gluon(monkeypatch)
    ours, ours_g = _run(lambda *t: functional.attention(*t, causal=True), (q, k, v), grad)
    assert len(calls) == 1
    ref, ref_g = _run(lambda *t: reference.attention(*t, True), (q, k, v), grad, torch.float64)
    plain, plain_g = _run(lambda *t: reference.attention(*t, True, upcast=False), (q, k, v), grad)
    assert_close_to_reference("out", ours, ref, plain, factor=FORWARD_FACTOR)
    for name, o, r, p in zip(("dq", "dk", "dv"), ours_g, ref_g, plain_g):
        assert_close_to_reference(name, o, r, p, factor=GRADIENT_FACTOR)
