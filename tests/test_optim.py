"""FusedAdamW against torch.optim.AdamW: every state tensor, step by step.

Under the CPU interpreter these run the real multi-tensor Triton kernels.
"""

from __future__ import annotations

import copy

import pytest
import torch

import opt_core.kernels.adamw as adamw_kernels
from opt_core.kernels.testing import FORWARD_FACTOR, assert_close_to_reference
from opt_core import FusedAdamW

# Odd shapes: a 0-d, an empty, shapes that cross the kernel's chunk and block
# boundaries under the interpreter (CHUNK 4096, BLOCK 512), a long thin one.
SHAPES = [(3, 1501), (), (0,), (4097,), (1, 7), (513, 9), (2, 2, 3)]


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


def test_found_inf_leaves_every_tensor_unchanged():
    params = _params()
    opt = FusedAdamW(params, amsgrad=True)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    snapshot = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    opt.found_inf = torch.ones(())
    opt.grad_scale = torch.full((), 8.0)
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
    kernel = adamw_kernels._adamw_kernel
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
    with pytest.raises(TypeError, match="lr must be a float"):
        FusedAdamW(p, lr=torch.tensor(0.1))
    with pytest.raises(TypeError, match="complex"):
        FusedAdamW([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])
    with pytest.raises(TypeError, match="floating-point"):
        FusedAdamW([torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match="one device"):
        FusedAdamW([torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3, device="meta"))])


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
def test_gpu_step_is_capturable_in_a_cuda_graph():
    # No host synchronisation inside step(): after a warm-up step (tables built and cached), the
    # whole step (kernel, bias corrections, step counters) replays from a CUDA graph.
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in ((1000, 33), (7,), ())]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, twins):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opt = FusedAdamW(params, lr=1e-2)
    ref = torch.optim.AdamW(twins, lr=1e-2, foreach=False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        opt.step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    ref.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for _ in range(3):
        graph.replay()
        ref.step()
    torch.cuda.synchronize()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7)
        assert float(opt.state[p]["step"]) == 4.0
