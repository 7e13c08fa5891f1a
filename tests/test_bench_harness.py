"""The benchmark harness: rows, ratios, bandwidth fractions, result files."""

from __future__ import annotations

import json

import pytest
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


def test_with_switches_sets_module_switches_while_building_and_around_each_call():
    import types

    from bench.harness import with_switches

    module = types.SimpleNamespace(TMA="auto", PERSISTENT="auto")
    seen = []

    def build():
        seen.append(("build", module.TMA, module.PERSISTENT))
        return lambda: seen.append(("call", module.TMA, module.PERSISTENT))

    run = with_switches(module, {"TMA": "off", "PERSISTENT": "off"}, build)
    assert (module.TMA, module.PERSISTENT) == ("auto", "auto")
    run()
    run()
    assert seen == [("build", "off", "off"), ("call", "off", "off"), ("call", "off", "off")]
    assert (module.TMA, module.PERSISTENT) == ("auto", "auto")


def test_variants_are_added_where_a_spec_lists_them():
    from bench.harness import Spec, Variant, add_variants

    variants = {"ours-a": Variant("ours-a", (("TMA", "off"),), modes=("fwd",)),
                "ours-b": Variant("ours-b", (("TMA", "on"),), modes=("bwd",))}
    spec = Spec("op", "4", torch.float32, "fwd", 0, 0, ("opt-core", "ours-a"), "opt-core", "rest", ())
    import types

    module = types.SimpleNamespace(TMA="auto")
    runners = add_variants({"opt-core": lambda: module.TMA}, spec, variants, module, lambda: lambda: module.TMA)
    assert sorted(runners) == ["opt-core", "ours-a"] and runners["ours-a"]() == "off" and module.TMA == "auto"


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


def _row(provider, ms, **fields):
    return harness.Row("layer_norm", "64x768", "bfloat16", "fwd", provider, ms, 0.9 * ms, 1.1 * ms, 1.0, 0.0, "copy",
                       0.1, 1.0, "torch", **fields)


def test_results_are_collected_from_every_process_records(tmp_path):
    """Each op process appends records to its own file; the results files hold them all, and a line cut
    short by a killed process is skipped."""
    env = harness.environment(torch.device("cpu"), harness.Ceilings(100.0, 1.0))
    (tmp_path / harness.ENVIRONMENT_FILE).write_text(json.dumps(env))
    first, second = (tmp_path / harness.RECORDS_DIR / name for name in ("0-0-a-goal.jsonl", "1-0-a-rest.jsonl"))
    ms = [float(t) for t in torch.rand(2) + 0.1]
    harness.append_records(first, "row", [_row("opt-core", ms[0], part="goal").__dict__])
    harness.append_records(first, "telemetry", [{"op": "layer_norm", "part": "goal", "when": "before",
                                                 "nvml": "unavailable: test"}])
    harness.append_records(second, "row", [_row("torch", ms[1], part="rest", peak_memory_mib=12.7).__dict__])
    harness.append_records(second, "compile_cache", [{"op": "layer_norm", "part": "rest", "hits": 3, "misses": 1,
                                                      "compile_s": 0.5, "missed": {"layer_norm.fwd_kernel": 1}}])
    with second.open("a") as f:
        f.write('{"type": "row", "op": "cut sh')  # the process was killed mid-line
    json_path, md_path = harness.collect(tmp_path)
    data = json.loads(json_path.read_text())
    assert [(r["provider"], r["ms"], r["part"]) for r in data["rows"]] == [("opt-core", ms[0], "goal"),
                                                                          ("torch", ms[1], "rest")]
    assert data["rows"][1]["peak_memory_mib"] == 12.7 and data["telemetry"][0]["nvml"] == "unavailable: test"
    text = md_path.read_text()
    assert "| 13 |" in text  # the peak-memory column
    assert "- layer_norm (rest): 3 loaded from the cache, 1 compiled (0.5 s): layer_norm.fwd_kernel x1" in text
    assert "NVML unavailable: test" in text


@pytest.mark.gpu
def test_peak_memory_counts_what_a_provider_allocates(device):
    mib = 64 + int(torch.randint(0, 64, ()))
    case = harness.Case(op="alloc", shape=f"{mib}MiB", dtype=torch.uint8, mode="fwd", bytes=mib << 20,
                        providers={"alloc": lambda: torch.empty(mib << 20, dtype=torch.uint8, device=device)},
                        baseline="alloc")
    (row,) = harness.run_case(case, device, harness.Ceilings(copy_gbps=1000.0, gemm_tflops=100.0))
    assert mib <= row.peak_memory_mib < mib + 64
