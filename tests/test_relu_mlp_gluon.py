"""The Gluon ping-pong GEMMs for the ReLU-MLP (kernels/relu_mlp_gluon.py, sm_90).

The interpreter cannot run Gluon, so on the CPU these check the AOT compile of its config, the routing
switch, ``supported()``, the host functions' errors (all before any launch) and the arguments a launch
binds (the kernel replaced by a recorder); the numerics (each routed GEMM, dropout's keep-mask, dh's
db1, the whole block forward and backward against float64) are ``gpu`` tests, run on a Hopper GPU.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from triton.runtime.jit import mangle_type

from opt_core.kernels import aot, aot_cases, dispatch
from opt_core.kernels import relu_mlp as mlp
from opt_core.kernels import relu_mlp_gluon
from opt_core.kernels.testing import FORWARD_FACTOR, GRADIENT_FACTOR, assert_close_to_reference
from test_relu_mlp import _check_against_oracle


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


hopper = pytest.mark.skipif(not _hopper(), reason="needs a GPU of compute capability 9.x")


# --------------------------------------------------------------------------- AOT (no GPU)
def test_config_compiles_to_the_ping_pong_schedule(aot_compile):
    """sm_90 compile of dW1 (plain store, A stored transposed), GEMM 1 (bias + ReLU, B stored transposed),
    GEMM 2 (bias, dropout, residual) and dh (ReLU mask, db1 partials): no spills, shared memory within the
    limit, TMA loads and stores, one wgmma in flight in the K loop, producer/consumer partitions with
    register limits, a persistent tile loop."""
    compiled = aot_compile("relu_mlp_gluon")
    results = [compiled[(c.name, 90)] for c in aot_cases.relu_mlp_gluon_cases()]
    assert [r["case"].split(",128x")[0] for r in results] == [
        "relu_mlp_gluon_dw1[d=768,bfloat16,A_T", "relu_mlp_gluon_fc1[d=768,bfloat16,B_T",
        "relu_mlp_gluon_fc2[d=768,bfloat16,B_T", "relu_mlp_gluon_dh[d=768,bfloat16"]
    for r in results:
        assert not aot.problems(r), (r["case"], aot.problems(r))
        assert r["stack"] == 0 and r["shared"] <= r["max_shared"], r
        assert r["wgmma"] and r["tma"] and r["tma_store"] and r["persistent"], r
        assert r["wgmma_max_pending"] >= 1 and r["warp_specialized"], r
        assert not r["wgmma_serialized"], r  # ptxas keeps every wgmma asynchronous as written


def test_aot_descriptors_are_what_a_launch_specialises_to():
    """The AOT cases compile the code a launch gets: the host descriptors' types (block and shared layout)
    for GEMM 1's operands and output equal the case's signature."""
    case = next(c for c in aot_cases.relu_mlp_gluon_cases() if c.name.startswith("relu_mlp_gluon_fc1["))
    x = torch.randn(300, 64, dtype=torch.bfloat16)
    w1 = torch.randn(256, 64, dtype=torch.bfloat16)
    g = relu_mlp_gluon
    w1_storage, transposed = g._stored_as(w1.t())
    assert transposed and w1_storage.data_ptr() == w1.data_ptr() and w1_storage.shape == w1.shape
    assert mangle_type(g._descriptor(x, g.operand_block(g.BLOCK_M, g.BLOCK_K, False))) == case.signature["a_desc"]
    assert mangle_type(g._descriptor(w1_storage, g.operand_block(g.BLOCK_K, g.BLOCK_N, True))) == \
        case.signature["b_desc"]
    h = torch.empty(300, 256, dtype=torch.bfloat16)
    assert mangle_type(g._descriptor(h, (g.BLOCK_M, g.slice_n(False)))) == case.signature["c_desc"]
    fc2 = next(c for c in aot_cases.relu_mlp_gluon_cases() if c.name.startswith("relu_mlp_gluon_fc2["))
    out = torch.empty(300, 64, dtype=torch.bfloat16)
    assert mangle_type(g._descriptor(out, (g.BLOCK_M, g.slice_n(True)))) == fc2.signature["c_desc"]
    # dW1 = dh^T @ x: A is dh^T, read from dh's storage
    dw1 = next(c for c in aot_cases.relu_mlp_gluon_cases() if c.name.startswith("relu_mlp_gluon_dw1["))
    dh_storage, transposed = g._stored_as(torch.empty(300, 256, dtype=torch.bfloat16).t())
    assert transposed and dh_storage.shape == (300, 256)
    assert mangle_type(g._descriptor(dh_storage, g.operand_block(g.BLOCK_M, g.BLOCK_K, True))) == \
        dw1.signature["a_desc"]
    assert mangle_type(g._descriptor(x, g.operand_block(g.BLOCK_K, g.BLOCK_N, False))) == dw1.signature["b_desc"]


# --------------------------------------------------------------------------- routing switch
def test_default_is_off():
    assert mlp.GLUON == "off"


def test_switch_is_validated(monkeypatch):
    a, b = torch.randn(4, 8), torch.randn(8, 8)
    monkeypatch.setattr(mlp, "GLUON", "auto")
    with pytest.raises(ValueError, match=r"opt_core\.kernels\.relu_mlp\.GLUON must be one of"):
        mlp._launch_matmul(a, b, torch.empty(4, 8))


def test_cpu_tensors_never_go_to_gluon(monkeypatch):
    monkeypatch.setattr(mlp, "GLUON", "on")
    a, b = torch.randn(16, 64, dtype=torch.bfloat16), torch.randn(64, 32, dtype=torch.bfloat16)
    assert mlp._gluon(a, b, torch.empty(16, 32, dtype=torch.bfloat16)) is None


# --------------------------------------------------------------------------- supported() and errors
def _gemm_views(T, d, dtype, role):
    """(a, b, c, epilogue) of one routed GEMM of a block of width d over T tokens: the operands as
    relu_mlp's launchers view them (W^T, g^T and dh^T are transposed views of their storage), c empty, and
    the epilogue's tensors by keyword (bias, residual; h for dh)."""
    ffn = 4 * d
    x = torch.randn(T, d, dtype=dtype)
    w1 = torch.randn(ffn, d, dtype=dtype) / d ** 0.5
    w2 = torch.randn(d, ffn, dtype=dtype) / ffn ** 0.5
    hidden = torch.randn(T, ffn, dtype=dtype)  # h, or dh
    g = torch.randn(T, d, dtype=dtype)
    views = {
        "fc1": (x, w1.t(), (T, ffn), dict(bias=torch.randn(ffn, dtype=dtype))),
        "fc2": (hidden, w2.t(), (T, d),
                dict(bias=torch.randn(d, dtype=dtype), residual=torch.randn(T, d, dtype=dtype))),
        "dh": (g, w2, (T, ffn), dict(h=torch.randn(T, ffn, dtype=dtype))),
        "dx": (hidden, w1, (T, d), {}),
        "dw1": (hidden.t(), x, (ffn, d), {}),
        "dw2": (g.t(), hidden, (d, ffn), {}),
    }
    a, b, c_shape, epilogue = views[role]
    return a, b, torch.empty(c_shape, dtype=dtype), epilogue


ROLES = ["fc1", "fc2", "dh", "dx", "dw1", "dw2"]
DROPOUT_ARGS = mlp._dropout_args(torch.tensor(2**40 + 7), 0.1)


def _run_host(role, a, b, c, epilogue, dropout=None):
    """The host function relu_mlp routes ``role`` to, with its epilogue."""
    if role == "dh":
        return relu_mlp_gluon.dh(a, b, c, epilogue["h"], True)
    return relu_mlp_gluon.gemm(a, b, c, relu=role == "fc1", dropout=dropout, **epilogue)


@pytest.mark.parametrize("role", ROLES)
def test_routed_gemms_fail_only_for_the_device(role):
    """Every routed GEMM's views (transposed ones included) at odd sizes suit the kernels in fp16 and
    bf16: the only error left on this machine is the CPU device."""
    for dtype in (torch.float16, torch.bfloat16):
        a, b, c, epilogue = _gemm_views(77, 200, dtype, role)
        with pytest.raises(ValueError, match="must be on one CUDA device"):
            _run_host(role, a, b, c, epilogue, DROPOUT_ARGS if role == "fc2" else None)
        assert not relu_mlp_gluon.supported(a, b, c, **epilogue)


def _misaligned_rows(a):
    # rows of 100 fp16 elements: 200 bytes, not a multiple of 16
    return torch.randn(a.shape[0], 100, dtype=a.dtype)


def _fc2_views():
    a, b, c, epilogue = _gemm_views(33, 64, torch.float16, "fc2")
    return a, b, c, epilogue["bias"], epilogue["residual"]


# (what is wrong, how to make (a, b, c, bias, residual) from fc2's good views, the error and its message)
BAD_INPUTS = [
    ("fp32", lambda a, b, c, s, r: (a.float(), b.float(), c.float(), None, None), TypeError, "float16 or bfloat16"),
    ("mixed dtypes", lambda a, b, c, s, r: (a, b.bfloat16(), c, s, r), TypeError, "b must have a's dtype"),
    ("bias dtype", lambda a, b, c, s, r: (a, b, c, s.float(), r), TypeError, "bias must have a's dtype"),
    ("not a tensor", lambda a, b, c, s, r: (a, b.tolist(), c, s, r), TypeError, "b must be a torch.Tensor"),
    ("3-D a", lambda a, b, c, s, r: (a[None], b, c, s, r), ValueError, "a must be 2-D"),
    ("inner sizes", lambda a, b, c, s, r: (a[:, :8], b, c, s, r), ValueError, "must agree"),
    ("empty", lambda a, b, c, s, r: (a[:0], b, c[:0], s, r[:0]), ValueError, "at least 1"),
    ("bias shape", lambda a, b, c, s, r: (a, b, c, s[:-1], r), ValueError, "bias must be a contiguous"),
    ("residual shape", lambda a, b, c, s, r: (a, b, c, s, r[:-1]), ValueError, "residual must have c's shape"),
    ("a rows", lambda a, b, c, s, r: (_misaligned_rows(a), b[:100], c, s, r), ValueError, "a must suit a TMA"),
    ("c strided", lambda a, b, c, s, r: (a, b, torch.empty(c.shape[1], c.shape[0], dtype=c.dtype).t(), s, r),
     ValueError, "c must be row-major"),
]


@pytest.mark.parametrize("make, error, message", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_host_function_names_what_it_cannot_take(make, error, message):
    a, b, c, bias, residual = make(*_fc2_views())
    with pytest.raises(error, match=message):
        relu_mlp_gluon.gemm(a, b, c, bias=bias, residual=residual)
    assert not relu_mlp_gluon.supported(a, b, c, bias, residual)


def test_epilogue_arguments_are_checked():
    a, b, c, bias, residual = _fc2_views()
    seed, threshold, scale = DROPOUT_ARGS
    for kwargs, error, message in [
        (dict(relu=1), TypeError, "relu must be a bool"),
        (dict(dropout=(seed, threshold)), TypeError, "dropout must be None or a"),
        (dict(dropout=(-1, threshold, scale)), ValueError, "dropout's seed"),
        (dict(dropout=(seed, 2**31, scale)), ValueError, "dropout's threshold"),
        (dict(dropout=(seed, threshold, 1)), TypeError, "dropout's scale"),
    ]:
        with pytest.raises(error, match=message):
            relu_mlp_gluon.gemm(a, b, c, bias=bias, residual=residual, **kwargs)
    a, b, c, epilogue = _gemm_views(33, 64, torch.bfloat16, "dh")
    h = epilogue["h"]
    for args, error, message in [
        ((h[:, :-1], True), ValueError, "h must have c's shape"),
        ((h.half(), True), TypeError, "h must have a's dtype"),
        ((h, 1), TypeError, "with_db must be a bool"),
    ]:
        with pytest.raises(error, match=message):
            relu_mlp_gluon.dh(a, b, c, *args)
    assert not relu_mlp_gluon.supported(a, b, c, h=h[:, :-1])


def _record_launch(monkeypatch, kernel_name):
    """Replaces the module's kernel ``kernel_name`` by a recorder and lets every tensor pass the device check:
    the host then runs to the launch on this machine.  Returns (the kernel's signature, the launches)."""
    kernel = getattr(relu_mlp_gluon, kernel_name)
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, args, kwargs))

    monkeypatch.setattr(relu_mlp_gluon, kernel_name, Recorder())
    monkeypatch.setattr(relu_mlp_gluon, "_problem", lambda *args, **kwargs: None)
    return inspect.signature(kernel.fn), launches


def _bound(signature, launch):
    grid, args, kwargs = launch
    kwargs = dict(kwargs)
    assert kwargs.pop("num_warps") == relu_mlp_gluon.NUM_WARPS
    return grid, signature.bind(*args, **kwargs).arguments


def test_gemm_launch_binds_every_kernel_argument(monkeypatch):
    """GEMM 2 with dropout (B = W2^T stored transposed): each kernel argument gets its value, the
    descriptors cover the operands' storage with the config's blocks, one program per SM (4 here)."""
    signature, launches = _record_launch(monkeypatch, "gemm_kernel")
    a, b, c, epilogue = _gemm_views(300, 200, torch.bfloat16, "fc2")
    relu_mlp_gluon.gemm(a, b, c, dropout=DROPOUT_ARGS, **epilogue)
    grid, args = _bound(signature, launches[0])
    g = relu_mlp_gluon
    assert grid == (min(3 * 2, dispatch.num_sms(c.device)),)
    assert args["a_desc"].base is a and list(args["a_desc"].block_shape) == [g.BLOCK_M, g.BLOCK_K]
    assert args["b_desc"].base.data_ptr() == b.data_ptr() and tuple(args["b_desc"].base.shape) == (200, 800)
    assert list(args["b_desc"].block_shape) == [g.BLOCK_N, g.BLOCK_K]
    assert args["c_desc"].base is c and list(args["c_desc"].block_shape) == [g.BLOCK_M, g.slice_n(True)]
    assert args["BIAS"] is epilogue["bias"] and args["RES"] is epilogue["residual"]
    seed, threshold, scale = DROPOUT_ARGS
    assert (args["M"], args["N"], args["K"], args["stride_rm"], args["stride_rn"]) == (300, 200, 800, 200, 1)
    assert (args["seed"], args["drop_threshold"], args["drop_scale"]) == (seed, threshold, scale)
    assert (args["A_T"], args["B_T"], args["HAS_BIAS"], args["RELU"], args["DROPOUT"], args["HAS_RESIDUAL"]) == \
        (False, True, True, False, True, True)
    assert (args["GROUP_M"], args["NUM_STAGES"]) == (g.GROUP_M, g.NUM_STAGES)


def test_dh_launch_binds_every_kernel_argument(monkeypatch):
    """dh: the saved h and db1's partials (one fp32 row per 128-row tile) reach the kernel; db1 is their
    column sums."""
    signature, launches = _record_launch(monkeypatch, "dh_kernel")
    a, b, c, epilogue = _gemm_views(300, 64, torch.bfloat16, "dh")
    db1 = relu_mlp_gluon.dh(a, b, c, epilogue["h"], True)
    _, args = _bound(signature, launches[0])
    assert args["H"] is epilogue["h"] and args["stride_hm"] == 256 and args["HAS_DBIAS"]
    assert args["DB_PART"].shape == (3, 256) and args["DB_PART"].dtype == torch.float32
    assert (args["M"], args["N"], args["K"], args["A_T"], args["B_T"]) == (300, 256, 64, False, False)
    torch.testing.assert_close(db1, args["DB_PART"].sum(0), rtol=0, atol=0, equal_nan=True)
    assert relu_mlp_gluon.dh(a, b, c, epilogue["h"], False) is None
    _, args = _bound(signature, launches[1])
    assert args["DB_PART"] is None and not args["HAS_DBIAS"]


# --------------------------------------------------------------------------- numerics (GPU)
def _route_to_gluon(monkeypatch):
    """GLUON on, with a list of the GEMMs (M, N, K) the Gluon kernels ran."""
    calls = []
    for name in ("gemm", "dh"):
        def counted(a, b, c, *args, _real=getattr(relu_mlp_gluon, name), **kwargs):
            calls.append((a.shape[0], b.shape[1], a.shape[1]))
            return _real(a, b, c, *args, **kwargs)

        monkeypatch.setattr(relu_mlp_gluon, name, counted)
    monkeypatch.setattr(mlp, "GLUON", "on")
    return calls


def _launch(role, a, b, c, epilogue, seed, p):
    """The relu_mlp launcher of ``role`` on the GEMM's views (fc1 and fc2 take the weights as stored): dh's
    db1, or None."""
    if role == "fc1":
        return mlp._launch_fc1(a, b.t(), epilogue["bias"], c)
    if role == "fc2":
        return mlp._launch_fc2(a, b.t(), epilogue["bias"], epilogue["residual"], torch.tensor(seed), p, c)
    if role == "dh":
        return mlp._launch_dh(a, b, epilogue["h"], c, True)
    return mlp._launch_matmul(a, b, c)


def _expected(role, a, b, epilogue, keep=None, p=0.0):
    """What the GEMM computes, in a's dtype and precision (float64: the reference; 16 bits: plain PyTorch);
    ``keep``: the dropout's keep-mask."""
    out = a @ b
    if "bias" in epilogue:
        out = out + epilogue["bias"]
    if role == "fc1":
        out = torch.relu(out)
    if role == "dh":
        out = torch.where(epilogue["h"] <= 0, 0.0, out)
    if keep is not None:
        out = out * keep.to(out.dtype) * (1.0 / (1.0 - p))
    if "residual" in epilogue:
        out = out + epilogue["residual"]
    return out


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("T, d, dtype", [(77, 200, torch.float16), (4001, 768, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("role, p", [(r, 0.0) for r in ROLES] + [("fc2", 0.1)], ids=ROLES + ["fc2-dropout"])
def test_routed_gemm_matches_float64_reference(role, p, T, d, dtype, monkeypatch):
    """Each routed GEMM at odd sizes (M, N, K not multiples of the tiles, a partial last K slice; 4001
    tokens give each consumer several tiles) against float64, its output poisoned first; GEMM 2's dropout
    against ``dropout_mask`` (a single differing keep bit is an error of a whole element); dh's db1."""
    a, b, _, epilogue = _gemm_views(T, d, dtype, role)
    a, b = a.cuda(), b.cuda()  # .cuda() keeps a transposed view's strides
    epilogue = {k: t.cuda() for k, t in epilogue.items()}
    c = dispatch.empty((a.shape[0], b.shape[1]), dtype=dtype, device=a.device)
    seed = int(torch.randint(0, 2**62, ()))
    keep = mlp.dropout_mask(seed, p, c.shape, c.device) if p > 0 else None
    calls = _route_to_gluon(monkeypatch)
    db1 = _launch(role, a, b, c, epilogue, seed, p)
    assert calls == [(a.shape[0], b.shape[1], a.shape[1])]
    ref = _expected(role, a.double(), b.double(), {k: t.double() for k, t in epilogue.items()}, keep, p)
    plain = _expected(role, a, b, epilogue, keep, p)
    assert_close_to_reference(role, c, ref, plain, factor=FORWARD_FACTOR)
    if role == "dh":
        assert db1.dtype == torch.float32
        assert_close_to_reference("db1", db1, ref.sum(0), plain.sum(0), factor=GRADIENT_FACTOR)


@pytest.mark.gpu
@hopper
def test_relu_keeps_nan(monkeypatch):
    """GEMM 1's ReLU is a select: a NaN pre-activation stays NaN (the rule checks NaN positions)."""
    a, b, _, epilogue = _gemm_views(200, 64, torch.bfloat16, "fc1")
    a, b, bias = a.cuda(), b.cuda(), epilogue["bias"].cuda()
    a[3, 5] = float("nan")
    c = dispatch.empty((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)
    calls = _route_to_gluon(monkeypatch)
    _launch("fc1", a, b, c, dict(bias=bias), 0, 0.0)
    assert len(calls) == 1 and bool(c[3].isnan().all()) and not bool(c[:3].isnan().any())
    assert_close_to_reference("h", c, _expected("fc1", a.double(), b.double(), dict(bias=bias.double())),
                              _expected("fc1", a, b, dict(bias=bias)), factor=FORWARD_FACTOR)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("M, d, dtype, p, gluon_gemms", [
    (77, 200, torch.bfloat16, 0.0, 6),     # fc1, fc2, dh, dW2, dx, dW1
    (1000, 768, torch.float16, 0.0, 6),
    (300, 768, torch.bfloat16, 0.1, 6),    # GEMM 2 with dropout
    (77, 100, torch.float16, 0.0, 0),      # rows of 200 bytes: TMA cannot read x, g or write out
], ids=str)
def test_block_forward_and_backward_with_gluon_on(M, d, dtype, p, gluon_gemms, monkeypatch):
    """The whole functional.relu_mlp forward and backward against float64 with GLUON on: every output and
    gradient by the project's rule, and the GEMMs the Gluon kernels took counted."""
    calls = _route_to_gluon(monkeypatch)
    _check_against_oracle(M, d, dtype, "cuda", p=p)
    assert len(calls) == gluon_gemms, calls
