"""The benchmark harness: rows, ratios, bandwidth fractions, result files."""

from __future__ import annotations

import json

import torch

from bench import harness


def test_run_case_and_write_results(tmp_path, device):
    x = torch.randn(1 << 16, device=device)
    case = harness.Case(
        op="copy", shape="65536", dtype=torch.float32, mode="fwd", bytes=2 * x.numel() * 4,
        providers={"clone": lambda: x.clone(), "mul": lambda: x * 1.0, "broken": lambda: 1 / 0},
        baseline="clone",
    )
    ceilings = harness.Ceilings(copy_gbps=100.0, gemm_tflops=1.0)
    rows = harness.run_case(case, device, ceilings)
    by = {r.provider: r for r in rows}
    assert by["clone"].speedup_vs_baseline == 1.0
    assert by["mul"].ms > 0 and by["mul"].ms_p20 <= by["mul"].ms <= by["mul"].ms_p80
    assert by["mul"].roofline == "copy" and abs(by["mul"].fraction_of_roofline - by["mul"].gbps / 100.0) < 1e-12
    assert by["broken"].error.startswith("ZeroDivisionError")

    env = harness.environment(device, ceilings)
    json_path, md_path = harness.write_results(tmp_path, env, rows)
    data = json.loads(json_path.read_text())
    assert {r["provider"] for r in data["rows"]} == {"clone", "mul", "broken"}
    text = md_path.read_text()
    assert "| copy | 65536 | float32 | fwd | mul |" in text and "failed: ZeroDivisionError" in text
    if device.type == "cpu":
        assert "not kernel timings" in text and data["environment"]["note"] == harness.CPU_NOTE


def test_compute_bound_cases_are_measured_against_the_gemm_rate(device):
    a = torch.randn(64, 64, device=device)
    case = harness.Case(op="mm", shape="64^3", dtype=torch.float32, mode="fwd", bytes=3 * 64 * 64 * 4,
                        providers={"mm": lambda: a @ a}, baseline="mm", flops=2 * 64**3)
    (row,) = harness.run_case(case, device, harness.Ceilings(copy_gbps=100.0, gemm_tflops=2.0))
    assert row.roofline == "gemm" and abs(row.fraction_of_roofline - row.tflops / 2.0) < 1e-12


def test_ceilings_are_measured(device):
    c = harness.measure_ceilings(device)
    assert c.copy_gbps > 0 and c.gemm_tflops > 0


def test_with_switch_sets_a_module_switch_while_building_and_around_each_call():
    import types

    from bench.harness import with_switch

    module = types.SimpleNamespace(TMA="auto")
    seen = []

    def build():
        seen.append(("build", module.TMA))
        return lambda: seen.append(("call", module.TMA))

    run = with_switch(module, "TMA", "off", build)
    assert module.TMA == "auto"
    run()
    run()
    assert seen == [("build", "off"), ("call", "off"), ("call", "off")] and module.TMA == "auto"
