"""bench/scaling_model.py: the ring formula, compute and memory by hand, the OPT-175B check, monotonicity."""

from __future__ import annotations

import json

import pytest

from bench import scaling_model as sm
from opt_core.config import OPTConfig

# The "test" preset: d=64, L=2, 4 heads, FFN 256, vocab 512, 64 positions, pre-LN.
TEST = OPTConfig.from_preset("test")
HW = sm.A100_80GB.with_(achieved_flops=1e12)  # 1 TFLOP/s: seconds = TFLOPs


def _layout(**kw):
    base = dict(tp=1, dp=1, micro_batch=2, global_batch=2, seq_len=64, activation_checkpointing=False)
    return sm.Layout(**{**base, **kw})


# --------------------------------------------------------------------------- ring collectives
def test_ring_formula_by_hand():
    lat = 8.4e-6  # NCCL ring/Simple base latency; hops 3.4 us (NVLink) and 9.6 us (network)
    # all-gather of 1 GB over 8 GPUs at 100 GB/s: 7/8 GB sent per GPU in 7 steps
    assert sm.ring_time(1e9, 8, 100e9, "all_gather") == pytest.approx(0.875e9 / 100e9 + lat + 7 * 3.4e-6)
    assert sm.ring_time(1e9, 8, 100e9, "reduce_scatter") == sm.ring_time(1e9, 8, 100e9, "all_gather")
    # all-reduce = reduce-scatter + all-gather: twice the bytes, 14 steps
    assert sm.ring_time(1e9, 8, 100e9, "all_reduce") == pytest.approx(2 * 0.875e9 / 100e9 + lat + 14 * 3.4e-6)
    # 16 GPUs on 2 nodes: 15 steps of which 1 crosses the network
    assert sm.ring_time(1.6e9, 16, 50e9, "all_gather", nodes=2) == pytest.approx(
        1.5e9 / 50e9 + lat + 14 * 3.4e-6 + 9.6e-6)
    assert sm.ring_time(1e9, 1, 100e9, "all_reduce") == 0.0


def test_group_bandwidth():
    nv = 300e9 * 235 / 300
    ib = 25e9 * 0.86
    assert sm.group_bus_bw(sm.A100_80GB, 8, 1) == pytest.approx(nv)
    assert sm.group_bus_bw(sm.A100_80GB, 1, 124) == pytest.approx(ib)        # OPT's dp group: one GPU per node
    assert sm.group_bus_bw(sm.A100_80GB, 8, 16) == pytest.approx(8 * ib)     # eight NICs per node
    # the paper layout's groups: TP 8 inside a node, DP 124 one GPU per node
    assert sm.tp_group(sm.A100_80GB, sm.PAPER_LAYOUT) == (8, 1)
    assert sm.dp_group(sm.A100_80GB, sm.PAPER_LAYOUT) == (1, 124)


# --------------------------------------------------------------------------- compute by hand
def test_compute_time_by_hand():
    # matmul params: L·(4d² + 2·d·ffn) + vocab·d = 2·(16384 + 32768) + 32768 = 131072
    # model FLOPs/token: 6·131072 + 12·L·d·s = 786432 + 98304 = 884736; 2 x 64 tokens on one GPU
    r = sm.step(TEST, HW, _layout())
    assert r.model_flops_per_gpu == 884736 * 128
    assert r.compute_s == pytest.approx(884736 * 128 / 1e12)
    assert r.tp_comm_s == r.fsdp_comm_s == r.fsdp_exposed_s == 0.0
    # checkpointing: 8·131072 + 16·L·d·s = 1179648 hardware FLOPs per token; model FLOPs unchanged
    r = sm.step(TEST, HW, _layout(activation_checkpointing=True))
    assert r.hw_flops_per_gpu == 1179648 * 128 and r.model_flops_per_gpu == 884736 * 128
    assert r.compute_s == pytest.approx(1179648 * 128 / 1e12)
    assert r.hfu / r.mfu == pytest.approx(1179648 / 884736)
    # TP 2 halves each GPU's share; gradient accumulation does not change the step's FLOPs
    assert sm.step(TEST, HW, _layout(tp=2)).compute_s == pytest.approx(884736 * 64 / 1e12)
    assert sm.step(TEST, HW, _layout(micro_batch=1)).compute_s == pytest.approx(884736 * 128 / 1e12)


def test_tp_communication_by_hand():
    # b·s·d·2 bytes = 2·64·64·2 = 16384 per all-reduce over 2 GPUs on NVLink
    one = 2 * 16384 * (1 / 2) / (300e9 * 235 / 300) + 8.4e-6 + 2 * 3.4e-6
    r = sm.step(TEST, HW, _layout(tp=2))
    assert r.tp_comm_s == pytest.approx(10 * one)      # 2L+1 forward, 2L+1 backward
    assert r.tp_bytes == pytest.approx(10 * 16384)
    r = sm.step(TEST, HW, _layout(tp=2, activation_checkpointing=True))
    assert r.tp_comm_s == pytest.approx(14 * one)      # + 2L in the recomputed forward


def test_optimizer_time_by_hand():
    n = TEST.num_parameters()
    r = sm.step(TEST, HW, _layout(dp=2, global_batch=4))
    assert r.optimizer_s == pytest.approx(n / 2 * 24 / (2039e9 * 0.85))  # fp16 recipe: 22 + 2 B/param


# --------------------------------------------------------------------------- memory by hand
def test_memory_by_hand():
    # parameters: embedding 512·64 + positions 66·64 = 36992, final LayerNorm 128;
    # per layer 4d²+4d (attention) + 2·d·ffn + ffn + d (MLP) + 4d (two LayerNorms) = 49984
    assert TEST.num_parameters() == 36992 + 128 + 2 * 49984
    n = 137088
    mem = sm.memory_bytes(TEST, _layout(dp=4, global_batch=8))
    assert mem["sharded params+grads+optimizer"] == pytest.approx(n / 4 * (2 + 2 + 8))
    assert mem["gathered params"] == pytest.approx((37120 + 2 * 49984) * 2)   # root unit + 2 layer units
    assert mem["unsharded grads (2 units)"] == pytest.approx(2 * 49984 * 2)
    assert mem["activations"] == pytest.approx(2 * 64 * 2 * 64 * 34)           # L·s·b·h·34 (flash attention)
    assert mem["logits"] == pytest.approx(4 * 64 * 2 * 512)
    # checkpointing keeps each layer's input (2 bytes) and one layer's activations
    mem = sm.memory_bytes(TEST, _layout(dp=4, global_batch=8, activation_checkpointing=True))
    assert mem["activations"] == pytest.approx(2 * 64 * 2 * 64 * 2 + 64 * 2 * 64 * 34)
    # stored attention scores add 5·a·s/h per token; ZeRO-2 keeps every unit gathered
    mem = sm.memory_bytes(TEST, _layout(dp=4, global_batch=8, flash_attention=False, reshard_after_forward=False))
    assert mem["activations"] == pytest.approx(2 * 64 * 2 * 64 * (34 + 5 * 4 * 64 / 64))
    assert mem["gathered params"] == pytest.approx(n * 2)
    # one GPU: nothing gathered
    assert sm.memory_bytes(TEST, _layout())["gathered params"] == 0.0
    # fits flag
    r = sm.step(TEST, HW, _layout())
    total = sum(r.memory.values())
    assert r.fits
    assert not sm.step(TEST, HW.with_(hbm_bytes=total), _layout()).fits        # 90% usable


def test_layout_validation():
    with pytest.raises(ValueError, match="multiple"):
        sm.Layout(tp=1, dp=3, micro_batch=1, global_batch=8)
    with pytest.raises(ValueError, match="recipe"):
        sm.Layout(tp=1, dp=1, micro_batch=1, global_batch=1, recipe="int8")
    assert sm.Layout(tp=2, dp=4, micro_batch=2, global_batch=64).grad_accumulation == 8


# --------------------------------------------------------------------------- the paper check
def test_paper_check_lands_near_the_paper():
    r = sm.paper_check()
    assert r.layout.gpus == 992 and r.layout.global_batch * r.layout.seq_len == 2_031_616
    assert 0.5 * 147 <= r.hw_tflops_per_gpu <= 2 * 147
    assert 0.25 <= r.mfu <= 0.45
    assert r.fits
    assert r.hfu / r.mfu == pytest.approx(
        sm.flops.hfu_flops_per_token(OPTConfig.from_preset("opt-175b"), 2048)
        / sm.flops.flops_per_token(OPTConfig.from_preset("opt-175b"), 2048))


# --------------------------------------------------------------------------- monotonic sanity
CASES = [
    ("opt-175b", sm.PAPER_LAYOUT),
    ("opt-1.3b", sm.Layout(tp=2, dp=32, micro_batch=4, global_batch=512)),
    ("opt-13b", sm.Layout(tp=4, dp=256, micro_batch=1, global_batch=2048, reshard_after_forward=False)),
    ("opt-125m", sm.Layout(tp=1, dp=64, micro_batch=4, global_batch=256, activation_checkpointing=False)),
]


@pytest.mark.parametrize("name,layout", CASES)
def test_more_bandwidth_is_never_slower(name, layout):
    config = OPTConfig.from_preset(name)
    for field in ("nvlink_bw", "ib_bw", "hbm_bw"):
        times = [sm.step(config, sm.A100_80GB.with_(**{field: getattr(sm.A100_80GB, field) * f}), layout).step_s
                 for f in (0.25, 0.5, 1, 2, 4)]
        assert all(a >= b for a, b in zip(times, times[1:])), (field, times)
    rates = [sm.step(config, sm.A100_80GB.with_(achieved_flops=x), layout).step_s for x in (100e12, 200e12, 400e12)]
    assert rates[0] > rates[1] > rates[2]


def test_tp_across_nodes_is_slower_than_within():
    config = OPTConfig.from_preset("opt-175b")
    within = sm.step(config, sm.A100_80GB, sm.PAPER_LAYOUT)
    across = sm.step(config, sm.A100_80GB.with_(gpus_per_node=4), sm.PAPER_LAYOUT)  # TP 8 spans two nodes
    assert across.tp_comm_s > within.tp_comm_s and across.step_s > within.step_s


# --------------------------------------------------------------------------- layouts, results files, CLI
def test_layout_choice():
    small = sm.best_step(OPTConfig.from_preset("opt-125m"), sm.A100_80GB, 8, 256)
    assert small.layout.tp == 1 and small.fits
    big = sm.best_step(OPTConfig.from_preset("opt-175b"), sm.A100_80GB, 8, 1024)
    assert not big.fits and big.layout.tp == 8              # the least-memory layout, flagged
    assert sm.best_step(OPTConfig.from_preset("opt-125m"), sm.A100_80GB, 1024, 64) is None  # batch too small


def _results(tmp_path, rows, env=None):
    path = tmp_path / "2026-01-01-nvidia-h200.json"
    path.write_text(json.dumps({"environment": env or {"device": "NVIDIA H200"}, "rows": rows}))
    return path


def _row(op, provider, tflops, mode="fwd+bwd", gain=None, error=None):
    return {"op": op, "shape": "s", "mode": mode, "provider": provider, "tflops": tflops,
            "speedup_vs_baseline": gain, "error": error}


def test_measured_rate_from_results(tmp_path):
    path = _results(tmp_path, [
        _row("train_step", "opt-core", 300.0, "fwd+bwd+adamw", 1.3),
        _row("train_step", "opt-core", 420.0, "fwd+bwd+adamw", 1.15),
        _row("train_step", "torch-sdpa", 380.0, "fwd+bwd+adamw", 1.0),
        _row("train_step", "opt-core", float("nan"), "fwd+bwd+adamw", error="OOM"),
        _row("relu_mlp", "opt-core", 600.0),
    ])
    m = sm.measured_rate(path)
    assert m.flops == 420e12 and m.gain == 1.15 and "H200" in m.source
    assert sm.measured_rate(path, "torch-sdpa").flops == 380e12
    # fall back to the MLP block, then to the GEMM ceiling
    assert sm.measured_rate(_results(tmp_path, [_row("relu_mlp", "opt-core", 600.0)])).flops == 600e12
    m = sm.measured_rate(_results(tmp_path, [], {"device": "NVIDIA H200", "gemm_tflops": 700.0}))
    assert m.flops == 700e12 and m.gain is None
    with pytest.raises(ValueError):
        sm.measured_rate(_results(tmp_path, []))
    path = _results(tmp_path, [_row("train_step", "opt-core", 420.0, "fwd+bwd+adamw", 1.15)])
    assert sm.find_results(sm.H200_SXM, tmp_path) == path
    assert sm.find_results(sm.A100_80GB, tmp_path) is None


def test_cli_prints_the_three_parts(tmp_path, capsys):
    path = _results(tmp_path, [_row("train_step", "opt-core", 420.0, "fwd+bwd+adamw", 1.15)])
    assert sm.main(["--gpu", "h200", "--results", str(path), "--gpus", "8", "64", "--gains", "1.2"]) == 0
    out = capsys.readouterr().out
    assert "(a) OPT-175B on 992 A100s" in out and "(b)" in out and "(c)" in out
    assert out.count("| opt-") >= 2 * 9 and "g=1.15" in out and "420 TFLOP/s achieved" in out
    # the paper check stays on A100s whatever the table's GPU
    assert "A100-SXM4-80GB: peak 312" in out


def test_presets_are_consistent():
    for hw in sm.HARDWARE.values():
        assert hw.achieved_flops < hw.peak_flops
        assert hw.nvlink_bw * hw.nvlink_efficiency > hw.ib_bw * hw.ib_efficiency
        assert hw.hbm_efficiency <= 1 and hw.nvlink_efficiency <= 1 and hw.ib_efficiency <= 1


def test_dominant_term():
    config = OPTConfig.from_preset("opt-175b")
    assert sm.paper_check().dominant == "compute"
    slow_ib = sm.A100_80GB.with_(ib_bw=1e9)  # 8 Gb/s per GPU: FSDP traffic outlasts the compute hiding it
    r = sm.step(config, slow_ib, sm.PAPER_LAYOUT)
    assert r.dominant == "FSDP traffic" and r.fsdp_exposed_s > 0.5 * r.fsdp_comm_s
