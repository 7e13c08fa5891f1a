"""FusedAdamW against torch.optim.AdamW: every state tensor, step by step.

Under the CPU interpreter these run the real multi-tensor Triton kernels.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import sys

import pytest
import torch

import opt_core.kernels.adamw as adamw_kernels
from opt_core.kernels import dispatch
from opt_core.kernels.testing import FORWARD_FACTOR, assert_close_to_reference
from opt_core import DynamicLossScaler, FusedAdamW

# Odd shapes: a 0-d, an empty, shapes that cross the kernel's chunk and block
# boundaries under the interpreter (CHUNK 4096, BLOCK 512), a long thin one; the
# one whose size is a multiple of 8 (4104) takes the 16-byte vector class, the
# others the scalar one.
SHAPES = [(3, 1501), (), (0,), (4097,), (1, 7), (513, 9), (8, 513), (2, 2, 3)]


def _params(dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device=device, dtype=dtype)) for s in SHAPES]


def _groups(params):
    # Several groups with their own hyper-parameters; the last parameter never gets a gradient.
    return [
        {"params": params[:3], "lr": 3e-3, "weight_decay": 0.1},
        {"params": params[3:5], "betas": (0.8, 0.95), "eps": 1e-6},
        {"params": params[5:], "lr": 1e-2, "weight_decay": 0.0},
    ]


def _set_grads(pairs, step, *, frozen=()):
    gen = torch.Generator().manual_seed(1000 + step)
    for i, (a, b) in enumerate(pairs):
        if i == len(pairs) - 1 or i in frozen:
            a.grad = b.grad = None
            continue
        g = torch.randn(a.shape, generator=gen).to(a.dtype)
        a.grad, b.grad = g.clone(), g.clone().to(b.dtype)


def _assert_same_state(ours, theirs, pairs, *, rtol=2e-6, atol=1e-7):
    for i, (a, b) in enumerate(pairs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=atol, msg=f"param {i}")
        sa, sb = ours.state.get(a, {}), theirs.state.get(b, {})
        assert sa.keys() - {"master_param"} == sb.keys(), (i, sa.keys(), sb.keys())
        for key in sb:
            va, vb = sa[key], sb[key]
            if key == "step":
                assert float(va) == float(vb), (i, key)
            else:
                torch.testing.assert_close(va, vb, rtol=rtol, atol=atol, msg=f"param {i} {key}")


def _run(ours, theirs, pairs, steps, start=0, schedulers=()):
    for step in range(start, start + steps):
        if step == 7:  # a step where no parameter has a gradient: a no-op
            _set_grads(pairs, step, frozen=range(len(pairs)))
        else:  # parameter 1 frozen for steps 10-14, then back
            _set_grads(pairs, step, frozen=(1,) if 10 <= step < 15 else ())
        ours.step()
        theirs.step()
        for s in schedulers:
            s.step()


@pytest.mark.parametrize("options", [
    dict(),
    dict(amsgrad=True),
    dict(maximize=True),
])
def test_matches_torch_adamw_for_30_steps_then_across_state_dicts(options):
    ours_p, theirs_p = _params(), _params()
    pairs = list(zip(ours_p, theirs_p))
    ours = FusedAdamW(_groups(ours_p), **options)
    theirs = torch.optim.AdamW(_groups(theirs_p), foreach=False, **options)
    lam = lambda step: 1.0 / (1 + step)  # noqa: E731
    schedulers = [torch.optim.lr_scheduler.LambdaLR(ours, lam), torch.optim.lr_scheduler.LambdaLR(theirs, lam)]
    _run(ours, theirs, pairs, 30, schedulers=schedulers)
    _assert_same_state(ours, theirs, pairs)
    assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"]

    # Swap state dicts: torch's into a fresh FusedAdamW and ours into a fresh AdamW.
    ours2_p = [torch.nn.Parameter(b.detach().clone()) for b in theirs_p]
    theirs2_p = [torch.nn.Parameter(a.detach().clone()) for a in ours_p]
    ours2 = FusedAdamW(_groups(ours2_p), **options)
    theirs2 = torch.optim.AdamW(_groups(theirs2_p), foreach=False, **options)
    ours2.load_state_dict(copy.deepcopy(theirs.state_dict()))
    theirs2.load_state_dict(copy.deepcopy(ours.state_dict()))
    for p in ours2_p:
        if p in ours2.state:
            assert ours2.state[p]["step"].device == p.device and ours2.state[p]["step"].dtype == torch.float32
    pairs2 = list(zip(ours2_p, theirs2_p))
    _run(ours2, theirs2, pairs2, 10, start=30)
    _assert_same_state(ours2, theirs2, pairs2, rtol=4e-6, atol=2e-7)


# --------------------------------------------------------------------------- every keyword AdamW takes
# Tiny odd-sized parameters in two groups (the last never gets a gradient): cheap under the interpreter.
SMALL_SHAPES = [(5,), (3, 7), (), (2, 1, 3), (1,)]
# The (foreach, fused) values torch.optim.AdamW accepts: our step is fused whatever they say.
IMPLEMENTATION_FLAGS = [(foreach, fused) for foreach in (None, False, True) for fused in (None, False, True)
                        if not (foreach and fused)]
PATHS = ["kernel", "reference"]


def _small_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SMALL_SHAPES]


def _hyper(value, as_tensor):
    return torch.tensor(value) if as_tensor else value


def _small_groups(params, tensor_lr, tensor_betas):
    lr = lambda v: _hyper(v, tensor_lr)  # noqa: E731
    betas = lambda b1, b2: (_hyper(b1, tensor_betas), _hyper(b2, tensor_betas))  # noqa: E731
    return dict(params=[{"params": params[:2]},
                        {"params": params[2:], "lr": lr(1e-2), "betas": betas(0.8, 0.95), "eps": 1e-6,
                         "weight_decay": 0.0}],
                lr=lr(3e-3), betas=betas(0.9, 0.999), weight_decay=0.1)


def _torch_twin_keywords(keywords, tensor_lr, tensor_betas):
    """The keywords a torch.optim.AdamW twin runs with on the CPU: ours, less what torch refuses there
    (capturable needs an accelerator unless fused; foreach takes a tensor lr/betas only when capturable)."""
    twin = dict(keywords)
    if twin["capturable"] and not twin["fused"]:
        twin["capturable"] = False
    if twin["foreach"] and (tensor_lr or tensor_betas) and not twin["capturable"]:
        twin["foreach"] = False
    return twin


def _path(path):
    return dispatch.reference_backend() if path == "reference" else contextlib.nullcontext()


_HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def _no_host_reads(monkeypatch):
    """Inside, reading a tensor's value on the host (a device sync on a GPU) raises AssertionError.

    Not inside the interpreter's launches: it simulates on the host a kernel that a GPU runs
    asynchronously, and reads its arguments to do so."""
    refusing = [True]

    def refuse(name):
        original = getattr(torch.Tensor, name)

        def guarded(self, *args, **kwargs):
            if refusing[0]:
                raise AssertionError(f"Tensor.{name} (a host read) inside a capturable step")
            return original(self, *args, **kwargs)
        return guarded

    def launch(original):
        def run(*args, **kwargs):
            refusing[0] = False
            try:
                return original(*args, **kwargs)
            finally:
                refusing[0] = True
        return run

    with monkeypatch.context() as patch:
        for name in _HOST_READS:
            patch.setattr(torch.Tensor, name, refuse(name))
        for kernel in (adamw_kernels.adamw_kernel, adamw_kernels.grad_stats_kernel):
            patch.setattr(kernel, "run", launch(kernel.run))
        yield


def test_no_host_reads_guard_catches_host_reads(monkeypatch):
    t = torch.ones(())
    with _no_host_reads(monkeypatch):
        for read in (t.item, lambda: bool(t), lambda: float(t), lambda: int(t), t.tolist):
            with pytest.raises(AssertionError, match="host read"):
                read()
    assert t.item() == 1.0  # restored outside


def test_torch_twin_keywords_are_what_torch_adamw_takes_on_the_cpu():
    # The premise of the comparison below, checked against the installed torch: AdamW steps on the CPU
    # with every keyword combination the twin rule keeps, and refuses every one it changes.
    for (foreach, fused), capturable, tensor_lr, tensor_betas in itertools.product(
            IMPLEMENTATION_FLAGS, (False, True), (False, True), (False, True)):
        keywords = dict(foreach=foreach, fused=fused, capturable=capturable)
        p = torch.nn.Parameter(torch.randn(3))
        p.grad = torch.randn(3)
        lr, betas = _hyper(1e-3, tensor_lr), (_hyper(0.9, tensor_betas), _hyper(0.99, tensor_betas))
        accepted = _torch_twin_keywords(keywords, tensor_lr, tensor_betas) == keywords
        try:
            torch.optim.AdamW([p], lr=lr, betas=betas, **keywords).step()
            refused = None
        except (AssertionError, RuntimeError, ValueError) as e:
            refused = e
        assert (refused is None) == accepted, (keywords, tensor_lr, tensor_betas, refused)


def _keyword_cases():
    cases = []
    axes = itertools.product((False, True), (False, True), (False, True), (False, True), (False, True))
    for i, (maximize, amsgrad, tensor_lr, tensor_betas, capturable) in enumerate(axes):
        # Each (foreach, fused) pair meets four different (lr, betas, capturable) kinds.
        foreach, fused = IMPLEMENTATION_FLAGS[(i + i // 8) % len(IMPLEMENTATION_FLAGS)]
        keywords = dict(maximize=maximize, amsgrad=amsgrad, capturable=capturable, foreach=foreach, fused=fused)
        name = "-".join([k for k in ("maximize", "amsgrad", "capturable") if keywords[k]]
                        + ["lr_tensor" if tensor_lr else "lr_float", "betas_tensor" if tensor_betas else "betas_float",
                           f"foreach={foreach}", f"fused={fused}"])
        cases.append(pytest.param(keywords, tensor_lr, tensor_betas, id=name))
    return cases


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("keywords, tensor_lr, tensor_betas", _keyword_cases())
def test_steps_equal_torch_adamw_for_every_keyword_combination(monkeypatch, path, keywords, tensor_lr, tensor_betas):
    ours_p, theirs_p = _small_params(), _small_params()
    pairs = list(zip(ours_p, theirs_p))
    ours = FusedAdamW(**_small_groups(ours_p, tensor_lr, tensor_betas), **keywords)
    theirs = torch.optim.AdamW(**_small_groups(theirs_p, tensor_lr, tensor_betas),
                               **_torch_twin_keywords(keywords, tensor_lr, tensor_betas))
    lam = lambda step: 1.0 / (1 + step)  # noqa: E731  (a tensor lr is updated in place)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(ours, lam), torch.optim.lr_scheduler.LambdaLR(theirs, lam)]
    for step in range(3):
        _set_grads(pairs, step)
        with _path(path), (_no_host_reads(monkeypatch) if keywords["capturable"] else contextlib.nullcontext()):
            ours.step()
        theirs.step()
        _assert_same_state(ours, theirs, pairs)
        for scheduler in schedulers:
            scheduler.step()
    for ours_group, their_group in zip(ours.param_groups, theirs.param_groups):
        assert ours_group.keys() - {"master_weights"} == their_group.keys()
        assert {k: ours_group[k] for k in keywords} == keywords
        assert isinstance(ours_group["lr"], torch.Tensor) == tensor_lr
    assert all(ours.state[p]["step"].device == p.device for p in ours_p if p in ours.state)


@pytest.mark.parametrize("path", PATHS)
def test_capturable_step_with_amp_and_clipping_reads_nothing_on_the_host(monkeypatch, path):
    # The fused extras in a capturable step: grad_scale/found_inf from a scaler, clipping, the
    # non-finite check, tensor lr and betas; against AdamW on gradients unscaled and clipped first.
    ours_p, theirs_p = _small_params(), _small_params()
    pairs = list(zip(ours_p, theirs_p))
    ours = FusedAdamW(**_small_groups(ours_p, True, True), capturable=True, max_grad_norm=0.5, skip_nonfinite=True)
    theirs = torch.optim.AdamW(**_small_groups(theirs_p, False, False), foreach=False)
    scale = 256.0
    for step in range(2):
        _set_grads(pairs, step)
        for p in ours_p:
            if p.grad is not None:
                p.grad.mul_(scale)
        ours.grad_scale, ours.found_inf = torch.full((), scale), torch.zeros(())
        with _path(path), _no_host_reads(monkeypatch):
            ours.step()
        torch.nn.utils.clip_grad_norm_([p for p in theirs_p if p.grad is not None], 0.5)
        theirs.step()
        _assert_same_state(ours, theirs, pairs, rtol=1e-5, atol=1e-6)


def test_fp32_error_is_within_the_rule_against_float64():
    # The numerics rule of DESIGN.md, applied to the optimizer: our fp32 step's
    # error against AdamW in float64 is at most 2x torch's own fp32 step's.
    ours_p, torch_p, oracle_p = _params(), _params(), _params(torch.float64)
    ours = FusedAdamW(_groups(ours_p))
    theirs = torch.optim.AdamW(_groups(torch_p), foreach=False)
    oracle = torch.optim.AdamW(_groups(oracle_p), foreach=False)
    for step in range(20):
        _set_grads(list(zip(ours_p, torch_p)), step)
        for o, q in zip(oracle_p, ours_p):
            o.grad = None if q.grad is None else q.grad.double()
        ours.step(), theirs.step(), oracle.step()
    for i, (a, b, c) in enumerate(zip(ours_p, torch_p, oracle_p)):
        assert_close_to_reference(f"param {i}", a.detach(), c.detach(), b.detach(), factor=FORWARD_FACTOR)


def test_step_without_any_gradient_is_a_noop():
    params = _params()
    opt = FusedAdamW(params)
    before = [p.detach().clone() for p in params]
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params)) and len(opt.state) == 0


def test_closure_is_called_with_grad_enabled():
    p = torch.nn.Parameter(torch.randn(5))
    opt = FusedAdamW([p])

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.requires_grad and int(opt.state[p]["step"]) == 1


@pytest.mark.parametrize("path", PATHS)
def test_found_inf_leaves_every_tensor_unchanged(path):
    params = _params()
    opt = FusedAdamW(params, amsgrad=True)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    snapshot = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    opt.found_inf = torch.ones(())
    opt.grad_scale = torch.full((), 8.0)
    with _path(path):
        opt.step()
    del opt.found_inf, opt.grad_scale
    for a, b in zip(snapshot[1], params):
        assert torch.equal(a, b)
    for pid, st in snapshot[0]["state"].items():
        for key, value in st.items():
            assert torch.equal(value, opt.state_dict()["state"][pid][key]), key


def test_grad_scale_unscales_inside_the_step():
    a, b = _params(), _params()
    oa, ob = FusedAdamW(a), torch.optim.AdamW(b, foreach=False)
    for step in range(3):
        _set_grads(list(zip(a, b)), step)
        for p in a:
            if p.grad is not None:
                p.grad.mul_(1024.0)
        oa.grad_scale, oa.found_inf = torch.full((), 1024.0), torch.zeros(())
        oa.step()
        ob.step()
    _assert_same_state(oa, ob, list(zip(a, b)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_master_weights_track_fp32_adamw(dtype):
    low = [torch.nn.Parameter(p.detach().to(dtype)) for p in _params()]
    ref = [torch.nn.Parameter(p.detach().float()) for p in low]
    ours = FusedAdamW(low, lr=1e-3, master_weights=True)
    theirs = torch.optim.AdamW(ref, lr=1e-3, foreach=False)
    for step in range(10):
        _set_grads(list(zip(low, ref)), step)
        ours.step()
        theirs.step()
    for i, (p, q) in enumerate(zip(low, ref)):
        if q.numel() == 0 or p not in ours.state:
            continue
        master = ours.state[p]["master_param"]
        torch.testing.assert_close(master, q.detach(), rtol=2e-6, atol=1e-7, msg=f"master {i}")
        # The parameter is the master rounded to its dtype: within the rounding of the low-precision copy.
        assert torch.equal(p.detach(), master.to(dtype)), i
        assert ours.state[p]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_memory_efficient_recipe_matches_upcast_step_round(dtype):
    low = [torch.nn.Parameter(p.detach().to(dtype)) for p in _params()]
    ours = FusedAdamW(low, lr=1e-3, weight_decay=0.1)
    # Reference: fp32 copy of the current low-precision value, one AdamW step in fp32, round back.
    shadow = [torch.nn.Parameter(p.detach().float()) for p in low]
    ref = torch.optim.AdamW(shadow, lr=1e-3, weight_decay=0.1, foreach=False)
    for step in range(8):
        _set_grads(list(zip(low, shadow)), step)
        ours.step()
        ref.step()
        with torch.no_grad():
            for s in shadow:
                s.copy_(s.to(dtype).float())  # the reference also keeps only the rounded value
    for i, (p, s) in enumerate(zip(low, shadow)):
        assert torch.equal(p.detach(), s.detach().to(dtype)), i
        assert "master_param" not in ours.state.get(p, {})


def test_launches_do_not_grow_with_the_number_of_parameters(monkeypatch):
    launches = []
    kernel = adamw_kernels.adamw_kernel
    original = kernel.run

    def counting_run(*args, **kwargs):
        launches.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(kernel, "run", counting_run)
    for n in (3, 60):
        launches.clear()
        params = [torch.nn.Parameter(torch.randn(17)) for _ in range(n)]
        opt = FusedAdamW(params)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        assert len(launches) == 1, (n, len(launches))


def _recording_launches(monkeypatch):
    """The ALIGNED flag of every adamw_kernel launch, in order."""
    launches = []
    original = adamw_kernels.adamw_kernel.run

    def run(*args, **kwargs):
        launches.append(kwargs["ALIGNED"])
        return original(*args, **kwargs)

    monkeypatch.setattr(adamw_kernels.adamw_kernel, "run", run)
    return launches


def test_aligned_and_unaligned_tensors_take_their_own_launches(monkeypatch):
    # 16-byte vectors need every address aligned and the size a multiple of 8: a view at an odd
    # offset (4 bytes past an aligned base) and a size of 17 take the scalar class, in a second launch.
    base = torch.randn(20)
    shapes_and_data = [torch.randn(8200), torch.randn(64, 9), torch.randn(17), base[1:9]]
    ours = [torch.nn.Parameter(t) for t in shapes_and_data]
    assert ours[3].data_ptr() % 16 == 4
    theirs = [torch.nn.Parameter(t.detach().clone()) for t in shapes_and_data]
    oa, ob = FusedAdamW(ours, weight_decay=0.1), torch.optim.AdamW(theirs, weight_decay=0.1, foreach=False)
    launches = _recording_launches(monkeypatch)
    for step in range(3):
        _set_grads(list(zip(ours, theirs)) + [(torch.empty(0), torch.empty(0))], step)
        oa.step(), ob.step()
    assert launches == [True, False] * 3
    _assert_same_state(oa, ob, list(zip(ours, theirs)))


def test_step_plan_is_built_once_and_rebuilt_when_a_tensor_moves(monkeypatch):
    """The launch tables persist across steps (new gradient tensors every step, as zero_grad leaves
    them); a parameter whose storage moves (p.data = ...) rebuilds them, and a plan dies with its
    tensors."""
    built = []

    class CountingPlan(adamw_kernels._Plan):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(adamw_kernels, "_Plan", CountingPlan)
    plans_before = len(adamw_kernels._PLANS)
    ours, theirs = _params(), _params()
    pairs = list(zip(ours, theirs))
    oa, ob = FusedAdamW(ours), torch.optim.AdamW(theirs, foreach=False)
    for step in range(3):
        _set_grads(pairs, step)
        oa.step(), ob.step()
    assert len(built) == 1
    moved = torch.randn(ours[6].shape)  # the aligned (8, 513)
    ours[6].data, theirs[6].data = moved.clone(), moved.clone()
    for step in range(3, 5):
        _set_grads(pairs, step)
        oa.step(), ob.step()
    assert len(built) == 2
    _assert_same_state(oa, ob, pairs)
    assert len(adamw_kernels._PLANS) == plans_before + 1
    del oa, ours, pairs
    assert len(adamw_kernels._PLANS) == plans_before


def test_cached_plan_follows_the_switches(monkeypatch):
    params = _params()
    opt = FusedAdamW(params)
    launches = _recording_launches(monkeypatch)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert sorted(launches) == [False, True]
    with dispatch.reference_backend():
        opt.step()
    assert len(launches) == 2
    monkeypatch.setattr(adamw_kernels, "VECTOR_LOADS", "off")  # every tensor in the scalar class
    opt.step()
    assert launches[2:] == [False]
    monkeypatch.setattr(adamw_kernels, "VECTOR_LOADS", "always")
    with pytest.raises(ValueError, match="opt_core.kernels.adamw.VECTOR_LOADS must be one of"):
        opt.step()


def test_non_contiguous_parameter_takes_the_reference_path():
    a = torch.nn.Parameter(torch.randn(9, 5).t())
    b = torch.nn.Parameter(a.detach().clone())
    oa, ob = FusedAdamW([a]), torch.optim.AdamW([b], foreach=False)
    for _ in range(3):
        g = torch.randn(5, 9)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step(), ob.step()
    torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)


def test_float64_parameters_step_like_torch():
    a = torch.nn.Parameter(torch.randn(33, dtype=torch.float64))
    b = torch.nn.Parameter(a.detach().clone())
    oa, ob = FusedAdamW([a]), torch.optim.AdamW([b], foreach=False)
    for _ in range(4):
        g = torch.randn(33, dtype=torch.float64)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step(), ob.step()
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert oa.state[a]["exp_avg"].dtype == torch.float64


# --------------------------------------------------------------------------- clipping and fused checks
def test_fused_clipping_equals_clip_grad_norm_then_step():
    a, b = _params(), _params()
    oa = FusedAdamW(a, max_grad_norm=1.0)
    ob = torch.optim.AdamW(b, foreach=False)
    for step in range(6):
        _set_grads(list(zip(a, b)), step)
        norm_b = torch.nn.utils.clip_grad_norm_([p for p in b if p.grad is not None], 1.0)
        oa.step()
        ob.step()
        torch.testing.assert_close(oa.grad_norm, norm_b, rtol=1e-5, atol=0)
    _assert_same_state(oa, ob, list(zip(a, b)), rtol=1e-5, atol=1e-6)


def test_clip_grad_norm_method_returns_the_norm_and_clips_in_the_step():
    a, b = _params(), _params()
    oa, ob = FusedAdamW(a), torch.optim.AdamW(b, foreach=False)
    for step in range(4):
        _set_grads(list(zip(a, b)), step)
        grads_before = [p.grad.clone() for p in a if p.grad is not None]
        norm_a = oa.clip_grad_norm_(0.5)
        norm_b = torch.nn.utils.clip_grad_norm_([p for p in b if p.grad is not None], 0.5)
        torch.testing.assert_close(norm_a, norm_b, rtol=1e-5, atol=0)
        assert all(torch.equal(g, p.grad) for g, p in zip(grads_before, [p for p in a if p.grad is not None]))
        oa.step()
        ob.step()
    _assert_same_state(oa, ob, list(zip(a, b)), rtol=1e-5, atol=1e-6)


def test_skip_nonfinite_skips_the_whole_step():
    params = _params()
    opt = FusedAdamW(params, skip_nonfinite=True)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    before = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    params[3].grad[17] = float("nan")
    opt.step()
    assert all(torch.equal(x, p) for x, p in zip(before[1], params))
    assert all(int(opt.state[p]["step"]) == 1 for p in params if p in opt.state)


# --------------------------------------------------------------------------- param groups and state dicts
def _same_value(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(map(_same_value, a, b))
    return a == b


def test_param_groups_and_defaults_look_like_torch_adamw():
    keywords = lambda: dict(lr=torch.tensor(2e-3), betas=(torch.tensor([0.8]), torch.tensor([0.99])),  # noqa: E731
                            eps=1e-6, weight_decay=0.05, amsgrad=True, maximize=True, foreach=False, fused=True,
                            capturable=True)
    ours = FusedAdamW([torch.nn.Parameter(torch.randn(3))], **keywords())
    theirs = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))], **keywords())
    for mine, torchs in ((ours.defaults, theirs.defaults), (ours.param_groups[0], theirs.param_groups[0])):
        assert mine.keys() - {"master_weights"} == torchs.keys()
        different = [k for k in torchs if k != "params" and not _same_value(mine[k], torchs[k])]
        assert not different, different
    assert ours.param_groups[0]["betas"][0].shape == ()  # a 1-element beta kept as its 0-d view, as AdamW keeps it


def _checkpoint_params(dtype=torch.float32):
    return [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in ((5,), (6,), (2, 3))]


def _two_groups(params, **options):
    return [{"params": params[:2], **options}, {"params": params[2:]}]


def _torch_checkpoint():
    """torch.optim.AdamW's state dict after one step (amsgrad: every moment key)."""
    params = _checkpoint_params()
    opt = torch.optim.AdamW(_two_groups(params), amsgrad=True, foreach=False)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return opt.state_dict()


@pytest.mark.parametrize("corrupt, message", [
    (lambda sd: sd["state"][1].update(exp_avg=torch.zeros(4)),
     r"param_groups\[0\]\['params'\]\[1\]: exp_avg has shape \(4,\), the parameter has \(6,\)"),
    (lambda sd: sd["state"][2].update(exp_avg_sq=torch.zeros(2, 3, dtype=torch.int64)),
     r"param_groups\[1\]\['params'\]\[0\]: exp_avg_sq has dtype torch.int64, a floating-point dtype is needed"),
    (lambda sd: sd["state"][0].update(max_exp_avg_sq=torch.zeros(5, 1)),
     r"param_groups\[0\]\['params'\]\[0\]: max_exp_avg_sq has shape \(5, 1\), the parameter has \(5,\)"),
    (lambda sd: sd["state"][2].update(master_param=torch.zeros(3, 2)),
     r"param_groups\[1\]\['params'\]\[0\]: master_param has shape \(3, 2\), the parameter has \(2, 3\)"),
    (lambda sd: sd["state"][0].update(exp_avg=[0.0] * 5), r"\['params'\]\[0\]: exp_avg is a list, not a tensor"),
    (lambda sd: sd["state"][1].pop("exp_avg_sq"), r"param_groups\[0\]\['params'\]\[1\]: the saved state has no 'exp_avg_sq'"),
    (lambda sd: sd["state"][0].update(step=torch.zeros(2)), r"\['params'\]\[0\]: step has shape \(2,\)"),
    (lambda sd: sd["param_groups"][0]["params"].pop(), r"param_groups\[0\] has 1 parameters there, 2 here"),
    (lambda sd: sd["param_groups"].pop(), "different number of parameter groups"),
    (lambda sd: sd["param_groups"][1].update(differentiable=True), "differentiable=True"),
], ids=["shape", "dtype", "amsgrad-shape", "master-shape", "not-a-tensor", "missing-key", "step-shape",
        "group-size", "group-count", "differentiable"])
def test_load_state_dict_refuses_a_state_that_does_not_fit_and_changes_nothing(corrupt, message):
    params = _checkpoint_params()
    opt = FusedAdamW(_two_groups(params, lr=3e-3), amsgrad=True)
    for p in params:
        p.grad = torch.randn_like(p)
    with dispatch.reference_backend():
        opt.step()
    before = copy.deepcopy(opt.state_dict())
    saved = _torch_checkpoint()
    corrupt(saved)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(saved)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(after["state"][i][k], v) for i, st in before["state"].items() for k, v in st.items())


def test_loading_a_torch_adamw_state_dict_keeps_master_weights():
    # torch's groups have no master_weights key: ours keeps its own, and the masters are made on load.
    saved = _torch_checkpoint()
    params = _checkpoint_params(torch.bfloat16)
    opt = FusedAdamW(_two_groups(params), amsgrad=True, master_weights=True)
    opt.load_state_dict(copy.deepcopy(saved))
    assert all(g["master_weights"] for g in opt.param_groups)
    for i, p in enumerate(params):
        state = opt.state[p]
        assert torch.equal(state["master_param"], p.detach().float())
        assert torch.equal(state["exp_avg"], saved["state"][i]["exp_avg"]) and state["exp_avg"].dtype == torch.float32


# --------------------------------------------------------------------------- errors
def test_invalid_arguments_raise_named_errors():
    p = [torch.nn.Parameter(torch.randn(3))]
    for kwargs, message in [
        (dict(lr=-1.0), "Invalid learning rate: -1.0"),
        (dict(weight_decay=-1), "Invalid weight_decay value: -1"),
        (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
        (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1"),
        (dict(eps=-1e-8), "Invalid epsilon value"),
        (dict(max_grad_norm=0.0), "Invalid max_grad_norm"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            FusedAdamW(p, **kwargs)
    for kwargs, error, message in [
        (dict(lr=torch.tensor([0.1, 0.2])), ValueError, "Tensor lr must be 1-element"),
        (dict(lr=torch.tensor(-0.1)), ValueError, "Invalid learning rate"),
        (dict(betas=(torch.tensor(0.9), 0.999)), ValueError, "both floats or both Tensors"),
        (dict(betas=(torch.tensor([0.9, 0.8]), torch.tensor(0.999))), ValueError, r"Tensor betas\[0\] must be 1-element"),
        (dict(betas=(torch.tensor(0.9), torch.tensor(1.0))), ValueError, "Invalid beta parameter at index 1"),
        (dict(betas=(0.9,)), ValueError, "betas must be a pair"),
        (dict(betas=0.9), TypeError, "betas must be a pair"),
        (dict(lr="1e-3"), TypeError, "lr must be a float or a 1-element tensor"),
        (dict(lr=None), TypeError, "lr must be a float or a 1-element tensor"),
        (dict(eps=torch.tensor(1e-8)), TypeError, "eps must be a float"),
        (dict(weight_decay=torch.tensor(0.1)), TypeError, "weight_decay must be a float"),
        (dict(foreach=True, fused=True), ValueError, "`fused` and `foreach` cannot be `True` together"),
        (dict(differentiable=True), ValueError, "differentiable=True"),
    ]:
        with pytest.raises(error, match=message):
            FusedAdamW(p, **kwargs)
    opt = FusedAdamW(p)
    for group, message in [({"differentiable": True}, "differentiable=True"),
                           ({"decoupled_weight_decay": False}, "decoupled_weight_decay must be True"),
                           ({"lr": -1.0}, "Invalid learning rate")]:
        with pytest.raises(ValueError, match=message):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], **group})
    assert len(opt.param_groups) == 1  # a refused group is not kept
    with pytest.raises(TypeError, match="complex"):
        FusedAdamW([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])
    with pytest.raises(TypeError, match="floating-point"):
        FusedAdamW([torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match="one device"):
        FusedAdamW([torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3, device="meta"))])


def test_functional_adamw_step_names_a_bad_hyperparameter():
    p, g = torch.randn(4), torch.randn(4)
    state = dict(exp_avgs=[torch.zeros(4)], exp_avg_sqs=[torch.zeros(4)], steps=[torch.zeros(())])
    good = dict(lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0)
    for bad, error, message in [(dict(lr=torch.ones(2)), ValueError, "lr as a tensor must have 1"),
                                (dict(beta2=torch.ones((), dtype=torch.int64)), ValueError, "beta2 as a tensor"),
                                (dict(beta1="0.9"), TypeError, "beta1 must be a float or a 1-element tensor"),
                                (dict(eps=torch.tensor(1e-8)), TypeError, "eps must be a float")]:
        with pytest.raises(error, match=message):
            adamw_kernels.adamw_step([p], [g], **state, **{**good, **bad})


def test_sparse_gradients_are_rejected():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = FusedAdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


# --------------------------------------------------------------------------- DTensor, GPU
def test_dtensor_parameters_step_on_their_local_shards(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        dense = [torch.nn.Parameter(torch.randn(s)) for s in ((6, 5), (7,))]
        sharded = [torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)])) for p in dense]
        ours, theirs = FusedAdamW(sharded, lr=1e-2), torch.optim.AdamW(dense, lr=1e-2, foreach=False)
        for _ in range(3):
            for d, s in zip(dense, sharded):
                g = torch.randn(d.shape)
                d.grad = g.clone()
                s.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
            ours.step()
            theirs.step()
        for d, s in zip(dense, sharded):
            torch.testing.assert_close(s.full_tensor(), d.detach(), rtol=2e-6, atol=1e-7)
            assert type(ours.state[s]["exp_avg"]).__name__ == "DTensor"
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_matches_torch_fused_and_loads_cpu_saved_state(dtype):
    cpu_p = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    cpu_opt = torch.optim.AdamW(cpu_p, foreach=False)
    for p in cpu_p:
        p.grad = torch.randn_like(p)
    cpu_opt.step()
    ours_p = [torch.nn.Parameter(p.detach().to("cuda", dtype)) for p in cpu_p]
    ours = FusedAdamW(ours_p, master_weights=dtype != torch.float32)
    ours.load_state_dict(cpu_opt.state_dict())  # CPU-saved state: step tensors must move to the GPU
    assert all(ours.state[p]["step"].is_cuda for p in ours_p if p in ours.state)
    theirs_p = [torch.nn.Parameter(p.detach().to("cuda")) for p in cpu_p]
    theirs = torch.optim.AdamW(theirs_p, fused=True)
    theirs.load_state_dict(cpu_opt.state_dict())
    for _ in range(5):
        for a, b in zip(ours_p, theirs_p):
            g = torch.randn(a.shape, device="cuda")
            a.grad, b.grad = g.to(dtype), g.to(dtype).float()
        ours.step()
        theirs.step()
    for a, b in zip(ours_p, theirs_p):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)
        else:
            torch.testing.assert_close(ours.state[a]["master_param"], b, rtol=1e-2, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("tensor_hyper", [False, True], ids=["float_lr_betas", "tensor_lr_betas"])
def test_gpu_step_is_capturable_in_a_cuda_graph(tensor_hyper):
    # No host synchronisation inside step(): after a warm-up step (tables built and cached), the
    # whole step (kernel, bias corrections, step counters) replays from a CUDA graph.  With device
    # tensors for lr and betas (capturable=True), an lr changed in place between replays (as a
    # scheduler changes a tensor lr) is what every replay reads.
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in ((1000, 33), (7,), ())]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, twins):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()

    def hyper():
        if not tensor_hyper:
            return dict(lr=1e-2, betas=(0.9, 0.999))
        return dict(lr=torch.tensor(1e-2, device="cuda"),
                    betas=(torch.tensor(0.9, device="cuda"), torch.tensor(0.999, device="cuda")))

    opt = FusedAdamW(params, capturable=tensor_hyper, **hyper())
    ref = torch.optim.AdamW(twins, foreach=False, **hyper())
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call in the step raises
        try:
            opt.step()  # warm-up outside the capture
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(stream)
    ref.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for i in range(3):
        if tensor_hyper:
            for o in (opt, ref):
                o.param_groups[0]["lr"].fill_(1e-2 / (2 + i))
        graph.replay()
        ref.step()
    torch.cuda.synchronize()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7)
        assert float(opt.state[p]["step"]) == 4.0


# --------------------------------------------------------------------------- backends
def test_backend_is_checked_when_the_optimizer_is_built(monkeypatch, tmp_path):
    """backend="cuda" without the CMake-built library and without CuPy fails at construction, naming both
    ways to get one; an unknown backend is a ValueError naming the argument."""
    from opt_core.kernels import cuda_backend

    params = [torch.nn.Parameter(torch.randn(5))]
    with pytest.raises(ValueError, match="backend must be one of"):
        FusedAdamW(params, backend="cpp")
    monkeypatch.delenv("OPT_CORE_CUDA_LIB", raising=False)
    monkeypatch.delenv("OPT_CORE_CUDA_LOADER", raising=False)
    monkeypatch.setattr(cuda_backend, "library_path", lambda: tmp_path / "missing.so")
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    with pytest.raises(cuda_backend.BackendUnavailable) as err:
        FusedAdamW(params, backend="cuda")
    assert "cmake" in str(err.value) and "cupy" in str(err.value).lower()
    assert FusedAdamW(params).backend == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("master_weights", [False, True], ids=["memory_efficient", "master_weights"])
def test_gpu_cuda_backend_steps_equal_the_triton_backend_under_the_loss_scaler(master_weights):
    """FusedAdamW(backend="cuda") with DynamicLossScaler (unscale, inf check, clipping on the CUDA C++
    kernels) against backend="triton" on the same bf16 parameters and fp16-scaled gradients."""
    from opt_core.kernels import cuda_backend

    try:
        cuda_backend.loader()
    except cuda_backend.BackendUnavailable as e:
        pytest.skip(str(e))
    sizes = [(33, 17), (1,), (0,), (4099,)]
    base = [torch.randn(s, device="cuda").to(torch.bfloat16) for s in sizes]
    runs = {}
    for backend in ("triton", "cuda"):
        params = [torch.nn.Parameter(b.clone()) for b in base]
        opt = FusedAdamW(params, lr=1e-2, weight_decay=0.1, master_weights=master_weights, max_grad_norm=1.0,
                         backend=backend)
        scaler = DynamicLossScaler(init_scale=2.0 ** 10)
        gen = torch.Generator(device="cuda").manual_seed(0)
        for step in range(4):
            loss = sum((p.float() * torch.randn(p.shape, device="cuda", generator=gen)).sum() for p in params)
            if step == 2:
                loss = loss * float("inf")  # a skipped step: scale backs off, state unchanged
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        runs[backend] = ([p.detach().clone() for p in params], scaler.get_scale())
    for ours, theirs in zip(runs["cuda"][0], runs["triton"][0]):
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=0, atol=2 ** -7 * theirs.abs().max().item())
    assert runs["cuda"][1] == runs["triton"][1]
