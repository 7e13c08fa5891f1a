"""DynamicLossScaler against torch.amp.GradScaler on the same scripts (CPU).

Modelled on PyTorch's own GradScaler tests (test_grad_scaling_*): two copies of
a small model, infs planted in a gradient on chosen steps, the scale
trajectory, the skipped steps and the final parameters compared.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from opt_core import DynamicLossScaler, FusedAdamW

INF_STEPS = (2, 5, 6)


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))


def _train(scaler, make_opt, *, steps=10, inf_steps=INF_STEPS, clip=None, seed=0, explicit_unscale=False):
    """Run the canonical AMP loop; returns (scales after each update, skipped flags, model)."""
    model = _model(seed)
    opt = make_opt(model.parameters())
    data = torch.Generator().manual_seed(42)
    scales, skipped = [], []
    for step in range(steps):
        x = torch.randn(4, 8, generator=data)
        opt.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        scaler.scale(loss).backward()
        if step in inf_steps:
            model[2].weight.grad[0, 0] = float("inf") if step % 2 else float("nan")
        before = [p.detach().clone() for p in model.parameters()]
        if explicit_unscale or clip is not None:
            scaler.unscale_(opt)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        skipped.append(all(torch.equal(b, p) for b, p in zip(before, model.parameters())))
    return scales, skipped, model


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, foreach=False)


@pytest.mark.parametrize("make_opt", [_sgd, _adamw, FusedAdamW], ids=["sgd", "adamw", "fused_adamw"])
@pytest.mark.parametrize("explicit_unscale", [False, True])
def test_same_trajectory_skips_and_parameters_as_grad_scaler(make_opt, explicit_unscale):
    kwargs = dict(init_scale=128.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=2)
    ours = _train(DynamicLossScaler("cpu", **kwargs), make_opt, explicit_unscale=explicit_unscale)
    theirs = _train(torch.amp.GradScaler("cpu", **kwargs), make_opt, explicit_unscale=explicit_unscale)
    assert ours[0] == theirs[0]
    assert ours[1] == theirs[1] == [s in INF_STEPS for s in range(10)]
    for a, b in zip(ours[2].parameters(), theirs[2].parameters()):
        assert torch.equal(a, b)


def test_grad_scaler_drives_fused_adamw_like_adamw():
    kwargs = dict(init_scale=2.0**10, growth_interval=3)
    fused = _train(torch.amp.GradScaler("cpu", **kwargs), lambda p: FusedAdamW(p, lr=1e-2), steps=12)
    plain = _train(torch.amp.GradScaler("cpu", **kwargs), _adamw, steps=12)
    assert fused[0] == plain[0] and fused[1] == plain[1]
    for a, b in zip(fused[2].parameters(), plain[2].parameters()):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)


def test_fused_unscale_check_and_clip_equal_the_unfused_sequence():
    # Ours: scaler.step hands the scale to FusedAdamW, which checks, unscales and
    # clips in its passes.  Theirs: unscale_, clip_grad_norm_, step.
    kwargs = dict(init_scale=2.0**12, growth_interval=3)
    ours = _train(DynamicLossScaler("cpu", **kwargs), lambda p: FusedAdamW(p, lr=1e-2, max_grad_norm=0.05), steps=12)
    theirs = _train(torch.amp.GradScaler("cpu", **kwargs), _adamw, steps=12, clip=0.05)
    assert ours[0] == theirs[0] and ours[1] == theirs[1]
    for a, b in zip(ours[2].parameters(), theirs[2].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_explicit_unscale_with_fused_adamw_unscales_in_place_like_grad_scaler():
    grads = []
    for scaler in (DynamicLossScaler("cpu", init_scale=64.0), torch.amp.GradScaler("cpu", init_scale=64.0)):
        model = _model()
        opt = FusedAdamW(model.parameters())
        scaler.scale(model(torch.ones(2, 8)).sum()).backward()
        scaler.unscale_(opt)
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- misuse
def _ready(scaler, opt_factory=_sgd):
    model = _model()
    opt = opt_factory(model.parameters())
    scaler.scale(model(torch.ones(2, 8)).sum()).backward()
    return model, opt


@pytest.mark.parametrize("cls", [DynamicLossScaler, torch.amp.GradScaler], ids=["ours", "torch"])
def test_misuse_raises_what_grad_scaler_raises(cls):
    scaler = cls("cpu")
    _, opt = _ready(scaler)
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match=r"unscale_\(\) has already been called on this optimizer"):
        scaler.unscale_(opt)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match=r"unscale_\(\) is being called after step\(\)"):
        scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match=r"step\(\) has already been called since the last update\(\)"):
        scaler.step(opt)
    with pytest.raises(RuntimeError, match="Closure use is not currently supported"):
        scaler.step(opt, closure=lambda: 0.0)
    scaler.update()

    fresh = cls("cpu")
    with pytest.raises(AssertionError, match="Attempted update but _scale is None"):
        fresh.update()
    model = _model()
    opt = _sgd(model.parameters())
    fresh.scale(torch.ones(()))
    with pytest.raises(AssertionError, match="No inf checks were recorded for this optimizer"):
        fresh.step(opt)  # no parameter has a gradient
    half = torch.nn.Linear(2, 2).half()
    opt_half = _sgd(half.parameters())
    for p in half.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        _unscale_after_scale(cls("cpu"), opt_half)
    with pytest.raises(AssertionError, match="growth factor must be > 1.0"):
        cls("cpu", growth_factor=1.0)
    with pytest.raises(AssertionError, match="backoff factor must be < 1.0"):
        cls("cpu", backoff_factor=1.0)


def _unscale_after_scale(scaler, opt):
    scaler.scale(torch.ones(()))
    scaler.unscale_(opt)


def test_disabled_scaler_is_transparent():
    scaler = DynamicLossScaler("cpu", enabled=False)
    loss = torch.ones(())
    assert scaler.scale(loss) is loss and scaler.get_scale() == 1.0 and not scaler.is_enabled()
    assert scaler.state_dict() == {}
    with pytest.raises(RuntimeError, match="source state dict is empty"):
        DynamicLossScaler("cpu").load_state_dict({})


def test_scale_accepts_nested_outputs():
    scaler = DynamicLossScaler("cpu", init_scale=4.0)
    out = scaler.scale([torch.ones(2), (torch.ones(1), torch.full((3,), 2.0))])
    assert torch.equal(out[0], torch.full((2,), 4.0)) and isinstance(out[1], tuple)
    assert torch.equal(out[1][1], torch.full((3,), 8.0))
    with pytest.raises(ValueError, match="outputs must be a Tensor or an iterable of Tensors"):
        scaler.scale(3.0)


# --------------------------------------------------------------------------- growth, floors, ceilings
def _updates(scaler, overflows):
    scaler.scale(torch.ones(()))
    model = torch.nn.Linear(1, 1)
    opt = _sgd(model.parameters())
    trajectory = []
    for overflow in overflows:
        model.weight.grad = torch.full_like(model.weight, float("inf") if overflow else 1.0)
        model.bias.grad = torch.zeros_like(model.bias)
        scaler.step(opt)
        scaler.update()
        trajectory.append(scaler.get_scale())
    return trajectory


@pytest.mark.parametrize("cls", [DynamicLossScaler, torch.amp.GradScaler], ids=["ours", "torch"])
def test_growth_never_overflows_to_inf(cls):
    trajectory = _updates(cls("cpu", init_scale=2.0**127, growth_interval=1), [False] * 3)
    assert trajectory == [2.0**127] * 3


def test_growth_never_overflows_with_the_extra_options():
    scaler = DynamicLossScaler("cpu", init_scale=2.0**127, growth_interval=1, min_scale=1.0)
    assert _updates(scaler, [False] * 3) == [2.0**127] * 3


def test_min_scale_raise_restores_the_scale_and_raises():
    scaler = DynamicLossScaler("cpu", init_scale=1.0, min_scale=0.25, on_min_scale="raise")
    assert _updates(scaler, [True]) == [0.5]
    with pytest.raises(FloatingPointError, match=r"Minimum loss scale reached \(0.25\)"):
        _updates(scaler, [True])
    assert scaler.get_scale() == 0.5


def test_min_scale_clamp_keeps_skipping_at_the_floor():
    scaler = DynamicLossScaler("cpu", init_scale=1.0, min_scale=2.0**-5)
    trajectory = _updates(scaler, [True] * 8)
    assert trajectory == [0.5, 0.25, 0.125, 2**-4, 2**-5, 2**-5, 2**-5, 2**-5]
    assert scaler.skipped_steps == 8 and scaler.skip_streak == 8


def test_max_scale_caps_growth():
    scaler = DynamicLossScaler("cpu", init_scale=4.0, growth_interval=1, max_scale=16.0)
    assert _updates(scaler, [False] * 4) == [8.0, 16.0, 16.0, 16.0]


def test_growth_interval_follows_the_scale_like_metaseq():
    scaler = DynamicLossScaler("cpu", init_scale=4.0, growth_interval=2, growth_interval_follows_scale=True)
    clean, overflow = False, True
    # interval 2: two clean steps double the scale and the interval (4), four more double again (8) ...
    steps = [clean] * 2 + [clean] * 4 + [overflow] + [clean] * 4
    assert _updates(scaler, steps) == [4, 8, 8, 8, 8, 16, 8, 8, 8, 8, 16]
    assert scaler.get_growth_interval() == 8


def test_counters_track_skips_and_streaks():
    scaler = DynamicLossScaler("cpu", init_scale=8.0, growth_interval=100)
    _updates(scaler, [True, True, False, True])
    assert scaler.skipped_steps == 3 and scaler.skip_streak == 1


# --------------------------------------------------------------------------- state
@pytest.mark.parametrize("src_cls, dst_cls", [
    (DynamicLossScaler, DynamicLossScaler), (DynamicLossScaler, torch.amp.GradScaler),
    (torch.amp.GradScaler, DynamicLossScaler),
], ids=["ours-ours", "ours-torch", "torch-ours"])
@pytest.mark.parametrize("lazy", [True, False], ids=["before-first-scale", "after-first-scale"])
def test_state_dict_round_trips(src_cls, dst_cls, lazy):
    s0 = src_cls("cpu", init_scale=3.0, growth_factor=4.0, backoff_factor=0.5, growth_interval=2)
    s1 = dst_cls("cpu", init_scale=6.0, growth_factor=7.0, backoff_factor=0.8, growth_interval=1)
    s1._init_growth_tracker = 7
    if not lazy:
        s1.scale(torch.ones(()))
        s1._growth_tracker.fill_(7)
    s1.load_state_dict(s0.state_dict())
    assert s1.get_scale() == 3.0 and s1.get_growth_factor() == 4.0
    assert s1.get_backoff_factor() == 0.5 and s1.get_growth_interval() == 2
    assert s1._init_growth_tracker == 0


def test_pickles_between_iterations_only():
    scaler = DynamicLossScaler("cpu", init_scale=32.0, min_scale=1.0)
    _updates(scaler, [True, False])
    clone = pickle.loads(pickle.dumps(scaler))
    assert clone.get_scale() == 16.0 and clone.skipped_steps == 1 and clone.state_dict() == scaler.state_dict()
    _, opt = _ready(scaler)
    scaler.unscale_(opt)
    with pytest.raises(AssertionError, match="may only be pickled at the beginning"):
        pickle.dumps(scaler)


def test_bad_options_raise_named_errors():
    with pytest.raises(ValueError, match="on_min_scale"):
        DynamicLossScaler("cpu", on_min_scale="ignore")
    with pytest.raises(ValueError, match="min_scale"):
        DynamicLossScaler("cpu", min_scale=0.0)
    with pytest.raises(ValueError, match="max_scale"):
        DynamicLossScaler("cpu", min_scale=2.0, max_scale=1.0)
    with pytest.raises(ValueError, match="growth_interval"):
        DynamicLossScaler("cpu", growth_interval=0)
    for init_scale in (0.0, -1.0, float("nan"), float("inf"), 1e39, True, "65536"):
        with pytest.raises(ValueError, match="init_scale"):
            DynamicLossScaler("cpu", init_scale=init_scale)
    with pytest.raises(AssertionError, match="growth factor must be > 1.0"):
        DynamicLossScaler("cpu", growth_factor=float("nan"))
    with pytest.raises(AssertionError, match="backoff factor must be < 1.0"):
        DynamicLossScaler("cpu", backoff_factor=float("nan"))
    with pytest.raises(ValueError, match="growth_factor must be finite"):
        DynamicLossScaler("cpu", growth_factor=float("inf"))
    for backoff in (0.0, -0.5):
        with pytest.raises(ValueError, match="backoff_factor must be > 0"):
            DynamicLossScaler("cpu", backoff_factor=backoff)
    for init_scale in (1, 2.0**24, np.float32(4.0)):  # any real number in range
        assert DynamicLossScaler("cpu", init_scale=init_scale, growth_factor=1.5, backoff_factor=0.25).get_scale() \
            == float(init_scale)


@pytest.mark.gpu
def test_gpu_same_trajectory_as_grad_scaler_with_fused_adamw():
    kwargs = dict(init_scale=2.0**10, growth_interval=2)

    def run(scaler):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8)).cuda()
        opt = FusedAdamW(model.parameters(), lr=1e-2, max_grad_norm=1.0)
        scales = []
        for step in range(8):
            opt.zero_grad()
            scaler.scale(model(torch.ones(4, 8, device="cuda") * step).square().mean()).backward()
            if step in (3, 4):
                model[2].weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        return scales, [p.detach().clone() for p in model.parameters()]

    ours, theirs = run(DynamicLossScaler("cuda", **kwargs)), run(torch.amp.GradScaler("cuda", **kwargs))
    assert ours[0] == theirs[0]
    for a, b in zip(ours[1], theirs[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
