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


def test_mfu_peer_is_the_same_model_on_plain_pytorch():
    """bench/mfu.py's peer (SDPA, F.layer_norm, F.linear) computes what our model computes, padded batch
    included, so the MFU ratio compares kernels, not models."""
    import copy

    from bench.mfu import to_plain_pytorch
    from opt_core.kernels import dispatch
    from opt_core import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    ours = OPTForCausalLM(OPTConfig.from_preset("test")).eval()
    peer = to_plain_pytorch(copy.deepcopy(ours))
    ids = torch.randint(0, ours.config.vocab_size, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding: the real rows must not see the pad keys (pad rows are not compared)
    with torch.no_grad(), dispatch.reference_backend():
        expected = ours(ids, attention_mask=mask).logits
        for attention_mask in (mask, None):
            got = peer(ids, attention_mask=attention_mask).logits
            want = expected if attention_mask is not None else ours(ids).logits
            real = (attention_mask if attention_mask is not None else torch.ones_like(ids)).bool()
            torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-5)
