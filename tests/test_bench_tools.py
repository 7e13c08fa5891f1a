"""The tools around the benchmark results: bench.compare, bench.plots and bench.profile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import compare, plots, profile
from opt_core.config import OPTConfig
from opt_core.flops import CONVENTION

ROOT = Path(__file__).resolve().parents[1]
ENV = {"device": "NVIDIA H200", "date": "2026-12-01T00:00:00+00:00", "copy_bandwidth_gbps": 3900.0}


def _row(op, shape, mode, provider, ms, *, dtype="bfloat16", tflops=0.0, gbps=0.0, roofline="copy", error=None):
    return {"op": op, "shape": shape, "dtype": dtype, "mode": mode, "provider": provider, "ms": ms,
            "ms_p20": 0.9 * ms, "ms_p80": 1.1 * ms, "gbps": gbps, "tflops": tflops, "roofline": roofline,
            "fraction_of_roofline": gbps / ENV["copy_bandwidth_gbps"] if roofline == "copy" else tflops / 800,
            "speedup_vs_baseline": None, "baseline": "torch", "error": error,
            "peak_memory_mib": 12.5}  # a field another helper adds: readers must ignore what they do not know


def _write(path: Path, rows) -> Path:
    path.write_text(json.dumps({"environment": ENV, "rows": rows}))
    return path


def _random_ms() -> float:
    return 0.05 + float(torch.rand(()))


# --------------------------------------------------------------------------- bench.compare
def _compare_rows():
    rows = []
    for op, shape in (("attention", "b2xs8192xh32xd128 causal"), ("layer_norm", "16384x2560")):
        for mode in ("fwd", "fwd+bwd"):
            for provider in ("opt-core", "opt-core-no-tma", "torch"):
                rows.append(_row(op, shape, mode, provider, _random_ms()))
    return rows


def _scaled(rows, factor, **match):
    return [dict(r, ms=r["ms"] * factor) if all(r[k] == v for k, v in match.items()) else dict(r) for r in rows]


def test_compare_flags_a_planted_regression_and_passes_an_unchanged_run(tmp_path, capsys):
    rows = _compare_rows()
    a = _write(tmp_path / "a.json", rows)
    assert compare.main([str(a), str(a)]) == 0
    # A peer 20% slower (the machine, not our code) and ours 3% slower: under the 5% threshold, no flag.
    noisy = _scaled(_scaled(rows, 1.2, provider="torch"), 1.03, provider="opt-core")
    assert compare.main([str(a), str(_write(tmp_path / "same.json", noisy))]) == 0
    assert "no regression" in capsys.readouterr().out

    planted = _scaled(rows, 1.2, op="attention", mode="fwd+bwd", provider="opt-core-no-tma")
    assert compare.main([str(a), str(_write(tmp_path / "slow.json", planted)), "--threshold", "0.05"]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION: 1 row(s)" in out
    assert "opt-core-no-tma: attention b2xs8192xh32xd128 causal bfloat16 fwd+bwd" in out and "x1.200" in out

    # A row of ours that ran in A and failed in B is flagged too; a 25% threshold passes the 20% slowdown.
    failed = [dict(r, ms=float("nan"), error="RuntimeError: boom") if r["provider"] == "opt-core" and
              r["op"] == "layer_norm" and r["mode"] == "fwd" else r for r in planted]
    assert compare.main([str(a), str(_write(tmp_path / "failed.json", failed)), "--threshold", "0.25"]) == 1
    out = capsys.readouterr().out
    assert "opt-core: layer_norm 16384x2560 bfloat16 fwd" in out and "failed in B" in out
    assert "opt-core-no-tma: attention" not in out


def test_compare_names_a_file_it_cannot_read(tmp_path, capsys):
    good = _write(tmp_path / "good.json", _compare_rows())
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"environment": ENV}))
    for bad in ("missing.json", "broken.json", "other.json"):
        assert compare.main([str(good), str(tmp_path / bad)]) == 2
        assert bad in capsys.readouterr().err


# --------------------------------------------------------------------------- bench.plots
def _plot_rows():
    rows = []
    for seqlen in (2048, 8192):
        for heads, head_dim in ((12, 64), (32, 128)):
            for mode in ("fwd", "bwd", "fwd+bwd"):
                for provider in ("opt-core", "sdpa-flash"):
                    rows.append(_row("attention", f"b{16384 // seqlen}xs{seqlen}xh{heads}xd{head_dim} causal", mode,
                                     provider, _random_ms(), tflops=400 * float(torch.rand(())), roofline="gemm"))
    for width in (768, 2560):
        for mode in ("fwd", "fwd+bwd"):
            for provider in ("opt-core", "torch-unfused"):
                rows.append(_row("relu_mlp", f"16384x{width}x{4 * width}", mode, provider, _random_ms(),
                                 tflops=600 * float(torch.rand(())), roofline="gemm"))
    for op in ("layer_norm", "add+layer_norm"):
        for width in (768, 2560, 5120):
            for mode in ("fwd", "bwd", "fwd+bwd"):
                for provider in ("opt-core", "torch"):
                    rows.append(_row(op, f"16384x{width}", mode, provider, _random_ms(),
                                     gbps=3900 * float(torch.rand(()))))
    for label, dtype in (("opt-125m (125.2M params, 148 tensors)", "float32"),
                         ("opt-125m (125.2M params, 148 tensors) master-weights", "bfloat16")):
        for provider in ("opt-core", "torch-fused"):
            rows.append(_row("adamw_step", label, "step", provider, _random_ms(), dtype=dtype,
                             gbps=3900 * float(torch.rand(()))))
    rows.append(_row("train_step", "opt-125m b8 s2048 (124M matmul params)", "fwd+bwd+adamw", "opt-core",
                     _random_ms(), tflops=300.0, roofline="gemm"))
    rows.append(_row("attention", "b1xs8192xh96xd128 causal", "fwd", "sdpa-cudnn", float("nan"),
                     error="RuntimeError: no kernel"))
    return rows


def _profile_summary(device: str) -> dict:
    """A bench.profile summary built by its own functions from a made-up breakdown (the file plots reads)."""
    config = OPTConfig.from_preset("tiny")
    setup = profile.Setup(config, "tiny", torch.device("cpu"), torch.float32, 2, 64, False)
    shares = torch.rand(len(profile.FAMILIES) + 1)
    ms = (100 * shares / shares.sum()).tolist()
    breakdown = profile.Breakdown(2, 100.0, dict(zip(profile.FAMILIES, ms)), ms[-1], "Python (outside any op)",
                                  "CPU self time of each op")
    work = profile.family_work(config, 2, 64, 4, False, 10**6, 32)
    use = profile.utilisation(setup, 90.0, device)
    return dict(profile.summary(setup, device, breakdown, work, use, Path("trace.json")), device=device)


def test_plots_are_written_from_a_synthetic_results_json(tmp_path):
    results = _write(tmp_path / "2026-12-01-nvidia-h200.json", _plot_rows())
    (tmp_path / "profile-tiny-nvidia-h200.json").write_text(json.dumps(_profile_summary(ENV["device"])))
    (tmp_path / "profile-tiny-other.json").write_text(json.dumps(_profile_summary("another GPU")))
    out = tmp_path / "png"
    written = plots.write_plots(results, out)
    names = ("attention", "mlp", "memory-bound", "step-breakdown")
    assert written == [out / f"2026-12-01-nvidia-h200-{name}.png" for name in names]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000

    # Only attention rows and no summary of this device: one plot, the rest skipped.
    (tmp_path / "sub").mkdir()
    only = _write(tmp_path / "sub" / "run.json", [r for r in _plot_rows() if r["op"] == "attention"])
    assert plots.write_plots(only, tmp_path / "png2") == [tmp_path / "png2" / "run-attention.png"]


# --------------------------------------------------------------------------- bench.profile
def _kernel_name(kernel) -> str:
    """The name a Triton kernel has in a CUDA trace: its Python function's (under any autotune wrapper)."""
    while hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel.__name__


def test_profile_classifies_gpu_kernels_by_the_ops_that_launched_them():
    """A hand-made CUDA trace: ``fwd_kernel`` is both attention's and LayerNorm's forward, told apart by the op
    above its launch (found through the launch call's correlation id, or the kernel's External id); cuBLAS under
    a plain linear is another GEMM; the optimizer's kernels sit under its range; a kernel linked to nothing is
    known by its own name."""
    from opt_core.kernels import adamw, attention, layer_norm, relu_mlp

    launches = [  # (op stack outermost first, kernel name, its duration in us, how the trace links it)
        (["opt_core::layer_norm_fwd"], _kernel_name(layer_norm.fwd_kernel), 10.0, "launch"),
        (["opt_core::attention_fwd"], _kernel_name(attention.fwd_kernel), 100.0, "external id"),
        (["aten::linear", "aten::addmm"], "nvjet_hsh_256x128_2x1_v_bz_coopA_NTN", 50.0, "launch"),
        (["opt_core::relu_mlp_fwd"], _kernel_name(relu_mlp.fc_kernel), 70.0, "launch"),
        (["autograd::engine::evaluate_function: GeneratedBackwardFor_opt_core_attention_fwd_defaultBackward",
          "opt_core::attention_bwd"], _kernel_name(attention.bwd_dkdv_kernel), 200.0, "launch"),
        ([], _kernel_name(attention.bwd_dq_kernel), 120.0, "none"),
        ([], _kernel_name(layer_norm.bwd_kernel), 15.0, "none"),
        (["Optimizer.step#FusedAdamW.step"], _kernel_name(adamw.adamw_kernel), 40.0, "launch"),
        (["c10d::allreduce_"], "ncclDevKernel_AllReduce_Sum_f32_RING_LL", 30.0, "launch"),
        (["aten::cross_entropy_loss"], "cunn_SoftMaxForward", 20.0, "launch"),
    ]
    expected = {"LayerNorm": 25.0, "attention forward": 100.0, "other GEMMs": 50.0, "MLP GEMMs": 70.0,
                "attention backward": 320.0, "optimizer": 40.0, "communication": 30.0, "other": 20.0}
    step_us = 4000.0
    host = [{"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#3", "pid": 1, "tid": 1, "ts": 0.0,
             "dur": step_us}]
    # A device-side copy of a record_function range: not a kernel, never counted.
    device = [{"ph": "X", "cat": "gpu_user_annotation", "name": "Optimizer.step#FusedAdamW.step", "pid": 0,
               "tid": 7, "ts": 0.0, "dur": step_us}]
    for k, (ops, kernel, dur, link) in enumerate(launches):
        t = 10.0 + 300.0 * k  # one kernel at a time
        for depth, name in enumerate(ops):  # nested ranges, each inside the previous one
            host.append({"ph": "X", "cat": "cpu_op" if "::" in name else "user_annotation", "name": name,
                         "pid": 1, "tid": 1, "ts": t + depth, "dur": 50.0 - 2 * depth,
                         "args": {"External id": 1000 + k}})
        if link == "launch":
            host.append({"ph": "X", "cat": "cuda_driver", "name": "cuLaunchKernel", "pid": 1, "tid": 1,
                         "ts": t + len(ops), "dur": 5.0, "args": {"correlation": 100 + k}})
        args = {"correlation": 100 + k} if link == "launch" else {"External id": 1000 + k} if ops else {}
        device.append({"ph": "X", "cat": "kernel", "name": kernel, "pid": 0, "tid": 7, "ts": t + 20, "dur": dur,
                       "args": args})
    result = profile.analyze({"traceEvents": host + device}, device_time=True)
    assert result.steps == 1 and result.step_ms == step_us / 1e3
    assert result.family_ms == pytest.approx({f: us / 1e3 for f, us in expected.items()})
    # Kernels run one at a time here, so what they leave idle is the step less their sum.
    assert result.uncovered_ms == pytest.approx((step_us - sum(expected.values())) / 1e3)


@pytest.mark.slow
def test_profile_tiny_on_the_cpu_prints_every_family_and_writes_the_trace(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the reference paths: fast
    proc = subprocess.run([sys.executable, "-m", "bench.profile", "--preset", "tiny", "--steps", "2", "--warmup", "1",
                           "--seq-len", "64", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for family in profile.FAMILIES:
        assert any(line.startswith(family + " ") and line.split()[len(family.split())].replace(".", "").isdigit()
                   for line in lines), (family, proc.stdout)
    mfu = next(line for line in lines if line.startswith("MFU:"))
    hfu = next(line for line in lines if line.startswith("HFU:"))
    assert "no peak on a CPU" in mfu and CONVENTION in mfu and profile.HFU_CONVENTION in hfu

    (trace_path,) = tmp_path.glob("trace-tiny-*.json")
    trace = json.loads(trace_path.read_text())
    assert sum(1 for e in trace["traceEvents"] if str(e.get("name", "")).startswith("ProfilerStep#")) == 2
    (summary_path,) = tmp_path.glob("profile-tiny-*.json")
    summary = json.loads(summary_path.read_text())
    ms = {f["family"]: f["ms"] for f in summary["families"]}
    for family in ("attention forward", "attention backward", "MLP GEMMs", "other GEMMs", "LayerNorm", "optimizer"):
        assert ms[family] > 0, (family, ms)
    assert ms["communication"] == 0
    total = sum(ms.values()) + summary["uncovered"]["ms"]
    assert total == pytest.approx(summary["traced_step_ms"], rel=1e-3)
