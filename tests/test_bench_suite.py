"""The benchmark suite: the plan, the FLOP and byte counts of every op's cases, the stage machinery, NVML
telemetry, gpu_suite.sh's dry run, and one quick end-to-end run on the CPU with an op failing on purpose."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import torch

from bench import adamw, attention, harness, layer_norm, mfu, plan, relu_mlp, suite, telemetry, worker
from bench.harness import H200
from opt_core import flops, functional
from opt_core.config import OPTConfig

ROOT = Path(__file__).resolve().parents[1]


def _spec(module, op, shape, mode, target=H200, dtype=torch.bfloat16):
    (found,) = [s for s in module.specs(target, False, (dtype,)) if (s.op, s.shape, s.mode) == (op, shape, mode)]
    return found


# --------------------------------------------------------------------------- FLOPs and bytes, by hand
def test_attention_counts():
    b, s, h, d = 2, 8192, 32, 128
    fwd = _spec(attention, "attention", "b2xs8192xh32xd128 causal", "fwd")
    both = _spec(attention, "attention", "b2xs8192xh32xd128 causal", "fwd+bwd")
    assert fwd.flops == 4 * b * h * s * s * d // 2            # two products of 2*s^2*d, halved for causal
    assert both.flops == 4 * b * h * s * s * d * 7 // 4       # 3.5x the forward, halved
    assert fwd.bytes == 4 * b * s * h * d * 2                 # q, k, v read, out written, bf16
    assert both.bytes == 12 * b * s * h * d * 2               # + q, k, v, out, dout read, dq, dk, dv written
    assert fwd.part == both.part == "goal" and "opt-core-no-tma" in fwd.providers


def test_layer_norm_counts():
    rows, n = 16384, 2048
    fwd = _spec(layer_norm, "add+layer_norm", "16384x2048", "fwd")
    assert fwd.bytes == 2 * (2 * rows * n + 2 * rows * n + 2 * n)   # read x, residual; write y, h; weight, bias
    bwd = _spec(layer_norm, "layer_norm", "16384x2048", "bwd")
    assert bwd.bytes == 2 * (3 * rows * n + n + 2 * n)               # read x, dy, weight; write dx, dweight, dbias
    both = _spec(layer_norm, "layer_norm", "16384x2048", "fwd+bwd")
    assert both.bytes == 2 * (2 * rows * n + 2 * n) + bwd.bytes and both.flops == 0 and both.part == "goal"


def test_relu_mlp_counts():
    m, d, f = 16384, 2048, 8192
    block = _spec(relu_mlp, "relu_mlp", "16384x2048x8192", "fwd")
    assert block.flops == 2 * (2 * m * d * f)                        # fc1 and fc2
    assert block.bytes == 2 * (3 * m * d + 2 * d * f + 2 * m * f)    # x, residual, out; W1, W2; h out and back
    both = _spec(relu_mlp, "relu_mlp", "16384x2048x8192", "fwd+bwd")
    assert both.flops == 6 * (2 * m * d * f) and both.part == "goal"
    assert both.bytes == block.bytes + 2 * (3 * m * d + 4 * d * f + 4 * m * f)
    gemm = _spec(relu_mlp, "relu_mlp gemm dW1 (dh^T@x)", "8192x2048x16384", "fwd")
    assert gemm.flops == 2 * f * d * m and gemm.bytes == 2 * (f * m + m * d + f * d) and gemm.part == "rest"


def test_adamw_counts():
    d, layers, vocab, positions = 2048, 24, 50272, 2050
    n = vocab * d + positions * d + layers * (12 * d * d + 13 * d) + 2 * d   # embeddings, layers, final LN
    label = f"opt-1.3b ({n / 1e6:.1f}M params, {2 + 12 * layers + 2} tensors)"
    assert _spec(adamw, "adamw_step", label, "step", dtype=torch.float32).bytes == 28 * n   # 16 read, 12 written
    by_recipe = {s.shape.rsplit(" ", 1)[-1]: s.bytes for s in adamw.specs(H200, False) if s.dtype == torch.bfloat16
                 and s.shape.startswith("opt-1.3b")}
    assert by_recipe == {"memory-efficient": 22 * n, "master-weights": 30 * n}


def test_train_step_counts():
    config = OPTConfig.from_preset("opt-1.3b")
    (spec,) = [s for s in mfu.specs(H200, False) if s.part == "goal"]
    tokens, L, dm, s = 8 * 2048, 24, 2048, 2048
    assert spec.flops == (6 * flops.matmul_parameters(config) + 12 * L * dm * s) * tokens and spec.bytes == 0


def test_the_specs_are_the_cases_built():
    """On the CPU (tiny shapes): every op's cases are its specs, with at least the providers they name."""
    device = torch.device("cpu")
    for module in (layer_norm, attention, relu_mlp, adamw, mfu):
        specs = module.specs(harness.Target.of(device), True)
        built = list(module.cases(device, True))
        assert len(built) == len(specs) > 0
        for spec, case in zip(specs, built):
            assert (case.op, case.shape, case.mode, case.bytes, case.flops, case.part) == \
                (spec.op, spec.shape, spec.mode, spec.bytes, spec.flops, spec.part)
            assert set(spec.providers) <= set(case.providers)
        assert [s.part for s in specs] == sorted((s.part for s in specs), key=harness.PARTS.index)


def test_every_variant_a_gpu_spec_lists_is_its_modules_and_the_plan_counts_it():
    """The A/B providers (ours with kernel switches set): each a GPU row lists is in its module's VARIANTS,
    joins only the modes it names, and adds tuning work to the plan (its own key buckets)."""
    for module in (attention, layer_norm, relu_mlp, adamw):
        listed = {(name, s.mode) for s in module.specs(H200, False) for name in s.providers
                  if name.startswith("opt-core-")}
        assert {name for name, _ in listed} == set(module.VARIANTS), module.__name__
        for name, mode in listed:
            assert mode in module.VARIANTS[name].modes
            if name != "opt-core-no-tma":  # counted as the pointer kernels' AOT cases
                (spec,) = [s for s in module.specs(H200, False) if name in s.providers][:1]
                assert plan.VARIANT_WORK[name](spec), name
    assert not [s for s in attention.specs(harness.Target(gpu=True, tma=False), False) if
                any(p.startswith("opt-core-") for p in s.providers)]   # sm_80: no TMA path, no A/B rows


def test_the_warm_up_never_launches_an_unproven_variant(tmp_path, monkeypatch):
    """A variant whose kernel has never run on a GPU (the Gluon forward) is left to its own rows: a hang or a
    sticky CUDA error there must not cost the warm-up stage."""
    called = []
    case = harness.Case("op", "4", torch.float32, "fwd", 0, {"opt-core": lambda: called.append("opt-core"),
                                                             "opt-core-new": lambda: called.append("opt-core-new"),
                                                             "peer": lambda: called.append("peer")}, "peer")
    module = types.SimpleNamespace(VARIANTS={"opt-core-new": harness.Variant("opt-core-new", (), unproven=True)},
                                   warmup_cases=lambda device, quick, dtypes: [case])
    monkeypatch.setattr(worker.importlib, "import_module", lambda name: module)
    assert worker.warmup("op", tmp_path, True, (torch.float32,), "0") == 0
    assert called == ["opt-core"]


def test_an_unproven_variant_is_timed_only_after_its_proof_passes(tmp_path, monkeypatch):
    """The table times a never-run kernel's variant only where the smoke stage's proof of it against
    float64 passed; otherwise its rows say why they hold no time, and the other providers are timed."""
    from opt_core.kernels.testing import compare

    x = torch.randn(5, dtype=torch.float64)
    outcome = {"ours": x.float()}

    def cases(device, quick, dtypes, part):
        yield harness.Case("op", "5", torch.float32, "fwd", 20, {"opt-core": lambda: x * 2,
                                                                 "opt-core-new": lambda: x * 3}, "opt-core")

    module = types.SimpleNamespace(
        VARIANTS={"opt-core-new": harness.Variant("opt-core-new", (), unproven=True)}, cases=cases,
        prove=lambda device, variant: [compare(variant, outcome["ours"], x, x.float(), factor=2.0)])
    monkeypatch.setattr(worker.importlib, "import_module", lambda name: module)
    monkeypatch.setattr(worker, "_environment", lambda out, device: {"copy_bandwidth_gbps": 1.0, "gemm_tflops": 1.0})
    monkeypatch.setattr(worker, "records_path", lambda out, op, part: out / "records" / "op.jsonl")

    def timed() -> dict:
        rows = [r for r in harness.read_records(tmp_path)["row"]]
        return {r["provider"]: r["error"] for r in rows}

    assert worker.table("op", "rest", tmp_path, True, (torch.float32,)) == 0  # no proof ran
    assert timed()["opt-core"] is None and "proof against float64 did not pass" in timed()["opt-core-new"]
    outcome["ours"] = x.float() + 1.0  # a wrong kernel
    assert worker.prove("op", "opt-core-new", tmp_path) == 1 and not harness.proven(tmp_path, "op", "opt-core-new")
    worker.table("op", "rest", tmp_path, True, (torch.float32,))
    assert "did not pass" in timed()["opt-core-new"]
    outcome["ours"] = x.float()
    assert worker.prove("op", "opt-core-new", tmp_path) == 0 and harness.proven(tmp_path, "op", "opt-core-new")
    worker.table("op", "rest", tmp_path, True, (torch.float32,))
    assert timed() == {"opt-core": None, "opt-core-new": None}


def test_the_suite_proves_every_unproven_variant_an_h200_row_lists():
    """Each unproven variant (the Gluon kernels) that a GPU row lists gets a proof process in the smoke
    stage, and its module can prove it; on the CPU no row lists one."""
    for module in (attention, relu_mlp):
        names = harness.unproven_variants(module, H200, False, (torch.bfloat16,))
        assert names == sorted(n for n, v in module.VARIANTS.items() if v.unproven), module.__name__
        assert names and callable(module.prove)
        assert not harness.unproven_variants(module, harness.Target(gpu=False, tma=False), True, (torch.float16,))
        with pytest.raises(RuntimeError, match="do not take"):  # a proof never passes by falling back
            module.prove(torch.device("cpu"), names[0])


def test_the_proofs_compare_what_they_claim(monkeypatch):
    """The proof code itself (its first real run is on a GPU, with the Gluon kernels): with the Triton
    kernels standing in for them, every proof compares out, lse or gradients against float64 and passes, the
    backward's includes bitwise repeatability, and a wrong stand-in fails it."""
    from opt_core.kernels import attention as at, attention_gluon as ag

    monkeypatch.setattr(attention, "PROOF_SHAPES", ((1, 17, 17, 1, 64),))
    monkeypatch.setattr(attention, "_taken", lambda variant, q, k: True)
    monkeypatch.setattr(ag, "attention_fwd", lambda q, k, v, causal, scale: at._launch_fwd(
        q, k, v, None, causal, scale, 0.0, 0))
    cpu = torch.device("cpu")
    deterministic, real = [], functional.attention
    monkeypatch.setattr(functional, "attention", lambda *a, **kw: (deterministic.append(kw["deterministic"]),
                                                                   real(*a, **kw))[1])
    for variant in ("opt-core-gluon", "opt-core-gluon-bwd", "opt-core-gluon-bwd-atomic"):
        deterministic.clear()
        results = attention.prove(cpu, variant)
        names = " ".join(r.name for r in results)
        assert results and all(r.ok for r in results), [str(r) for r in results if not r.ok]
        assert (" lse " in names) == (variant == "opt-core-gluon") and " dq " in names
        assert ("bitwise repeatable" in names) == (variant == "opt-core-gluon-bwd")
        assert set(deterministic) == {not variant.endswith("-atomic")}  # as the variant's rows run it
    monkeypatch.setattr(ag, "attention_fwd", lambda q, k, v, causal, scale: tuple(
        t * 1.01 for t in at._launch_fwd(q, k, v, None, causal, scale, 0.0, 0)))
    assert not all(r.ok for r in attention.prove(cpu, "opt-core-gluon"))

    monkeypatch.setattr(relu_mlp, "PROOF_SHAPES", ((9, 16),))
    monkeypatch.setattr(relu_mlp, "_gluon_declines", lambda M, d, dtype, device: [])
    results = relu_mlp.prove(cpu, "opt-core-gluon")
    assert len(results) == 2 * len(relu_mlp.NAMES) and all(r.ok for r in results), [str(r) for r in results]


def test_the_last_tests_are_the_gluon_kernels_test_files():
    """The GPU tests run in a second process after the others are the Gluon kernels' (never yet run on a
    GPU): every such file, and only those."""
    gluon_tests = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*gluon*.py"))
    assert sorted(suite.LAST_TESTS) == gluon_tests


def _recorded(module, names, calls):
    return lambda *a, **k: calls.append(tuple(getattr(module, n) for n in names) + tuple(sorted(k.items())))


def test_variants_run_their_op_with_their_switches_set(monkeypatch):
    """Built on the CPU, each A/B provider calls our op with its switches set (and only while it runs)."""
    from opt_core.kernels import attention as at, attention_gluon as ag, layer_norm as ln, relu_mlp as rm

    calls = []
    names = ("TMA", "WARP_SPECIALIZE", "FUSED_DQ", "GLUON")
    defaults = {n: getattr(at, n) for n in names}
    record = _recorded(at, names, calls)
    gluon_grids = []  # a switch of the module the op routes to (attention_gluon.PERSISTENT)
    monkeypatch.setattr(attention.functional, "attention",
                        lambda q, k, v, **kw: (record(**kw), gluon_grids.append(ag.PERSISTENT), q * 1)[2])
    shape = (1, 16, 2, 64)
    group = [harness.Spec("attention", "tiny", torch.float32, "fwd+bwd", 0, 0,
                          ("opt-core", *attention.VARIANTS), "opt-core", "rest", (shape, torch.float32, "rest"))]
    (case,) = attention._cases_for(group, shape, torch.float32, torch.device("cpu"))
    for name in attention.VARIANTS:
        calls.clear()
        case.providers[name]()
        switches = {**defaults, **dict(attention.VARIANTS[name].switches)}
        assert calls[-1][:len(names)] == tuple(switches[n] for n in names), name
        assert dict(calls[-1][len(names):])["deterministic"] == (not name.endswith("-atomic"))
        assert gluon_grids[-1] == switches.get("attention_gluon.PERSISTENT", "off"), name
    assert {n: getattr(at, n) for n in names} == defaults == {"TMA": "auto", "WARP_SPECIALIZE": "auto",
                                                               "FUSED_DQ": False, "GLUON": "off"}
    assert ag.PERSISTENT == "off"

    calls.clear()
    monkeypatch.setattr(rm, "_launch_matmul", _recorded(rm, ("TMA", "PERSISTENT", "GLUON"), calls))
    specs = [s for s in relu_mlp.specs(H200, False) if s.op == "relu_mlp gemm dx (dh@W1)" and "768x" in s.shape]
    plain, gluon = [dataclasses.replace(s, group=("gemm", 8, 16, torch.float32, s.group[-1])) for s in specs]
    assert gluon.shape.endswith("(gluon A/B)") and gluon.providers == ("opt-core", "opt-core-gluon")
    (case,) = [c for c in relu_mlp._gemm_cases([plain], 8, 16, torch.float32, torch.device("cpu"))]
    case.providers["opt-core-no-persistent"]()
    case.providers["opt-core"]()
    (case,) = [c for c in relu_mlp._gemm_cases([gluon], 8, 16, torch.float32, torch.device("cpu"))]
    assert set(case.providers) == {"opt-core", "opt-core-gluon"}
    case.providers["opt-core-gluon"]()
    assert calls == [("auto", "off", "off"), ("auto", "auto", "off"), ("auto", "auto", "on")]

    calls.clear()
    monkeypatch.setattr(layer_norm.functional, "layer_norm",
                        lambda x, w, b, eps: (calls.append((ln.BWD_PIPELINE, ln.WIDE_BWD)), x * w + b)[1])
    spec = harness.Spec("layer_norm", "tiny", torch.float32, "bwd", 0, 0, ("opt-core", *layer_norm.VARIANTS),
                        "opt-core", "rest", (False, 4, 8, torch.float32, "rest"))
    (case,) = layer_norm._plain_cases([spec], 4, 8, torch.float32, torch.device("cpu"))
    assert calls == [("auto", "auto"), ("off", "auto"), ("auto", "off")]  # a bwd runner runs its forward once
    case.providers["opt-core-two-pass"]()
    assert (ln.BWD_PIPELINE, ln.WIDE_BWD) == ("auto", "auto")


# --------------------------------------------------------------------------- the plan
def test_the_plan_fits_eight_minutes_on_an_h200(capsys):
    assert plan.main(["--gpu", "nvidia-h200", "--cores", "16"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    match = re.fullmatch(r"plan: (\d+) compiles, (\d+) launches, about (\d+) s on nvidia-h200 with 16 cores", last)
    assert match, last
    assert int(match.group(3)) <= 480 and int(match.group(1)) > 0 and int(match.group(2)) > 0

    stages = plan.plan(plan.Settings(tuned=None))
    by_name = {s.name: s for s in stages}
    # The warm-up compiles the union of the AOT cases every op's table cases launch: counted, not written down.
    union = set()
    for op in plan.OPS:
        union |= plan.op_work(op, plan._specs(op, H200, False, (torch.bfloat16,), "all"), H200).compiles
    assert by_name["warmup"].compiles == len(union) and int(match.group(1)) == sum(s.compiles for s in stages)


def test_a_tuned_table_cuts_the_compiles_and_the_tuning():
    entry = {"kwargs": {"BLOCK_M": 128, "BLOCK_N": 64}, "num_warps": 8, "num_stages": 3}
    table = {"kernels": {"attention.fwd_kernel": {
        "key": ["HEAD_DIM", "CAUSAL", "HAS_KPM", "HAS_DROPOUT", "TMA", "seqlen_bucket"], "buckets": ["seqlen_bucket"],
        "entries": {f"128|True|False|False|True|{s}|torch.bfloat16": entry for s in (2048, 8192)}}}}
    untuned = {s.name: s for s in plan.plan(plan.Settings(tuned=None))}
    tuned = {s.name: s for s in plan.plan(plan.Settings(tuned=table))}
    adamw_compiles = len(plan.adamw_compiles({"float32", "bfloat16", "bfloat16,master", "clip"}))
    assert tuned["warmup"].compiles == 1 + adamw_compiles < untuned["warmup"].compiles  # two buckets, one compile
    assert tuned["goal"].seconds < untuned["goal"].seconds


# --------------------------------------------------------------------------- the machinery
def test_stage_limits_keep_the_floors_of_later_stages():
    clock = suite.Clock(100.0)
    later = ("plots", "tests")
    floors = sum(suite.LIMITS[s][1] for s in later)
    assert clock.limit("rest", later) == pytest.approx(100.0 - floors, abs=0.5)   # no cap: all but the floors
    assert suite.Clock(1000.0).limit("smoke", ("warmup", "goal")) == suite.LIMITS["smoke"][0]  # its cap
    assert suite.Clock(suite.LIMITS["goal"][1] - 1).limit("goal", ()) is None      # under its floor: skipped
    assert suite.expand(["table", "smoke"]) == ("smoke", "goal", "profile", "rest", "plots")
    with pytest.raises(ValueError, match="unknown stage"):
        suite.expand(["bench"])


def test_a_task_past_its_limit_is_stopped(tmp_path):
    sleeper = suite.Task("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ),
                         tmp_path / "sleeper.log")
    quick = suite.Task("quick", [sys.executable, "-c", "print('done')"], dict(os.environ), tmp_path / "quick.log")
    started = time.monotonic()
    results = suite.run_tasks([sleeper, quick], workers=2, timeout=2.0)
    assert time.monotonic() - started < 20
    assert results["sleeper"].rc is None and results["sleeper"].status == "timed out"
    assert results["quick"].rc == 0 and (tmp_path / "quick.log").read_text().strip() == "done"
    assert sleeper.proc.poll() is not None


def test_failure_requests_name_an_op_and_a_stage(monkeypatch):
    monkeypatch.setenv(worker.FAIL_ENV, "relu_mlp:table,adamw")
    assert worker.failure_requested("relu_mlp", "table") and not worker.failure_requested("relu_mlp", "smoke")
    assert worker.failure_requested("adamw", "warmup") and not worker.failure_requested("attention", "table")


def test_the_cache_counter_sees_a_compile_then_a_load(tmp_path):
    """Triton's compilation listener, as each worker installs it (a subprocess: compiling needs the
    interpreter off)."""
    script = textwrap.dedent("""
        import json, sys
        from bench.worker import CacheCounter
        from opt_core.kernels import adamw, aot, aot_cases
        counter = CacheCounter().install()
        case = [c for c in aot_cases.adamw_cases() if c.name.startswith("grad_stats")][0]
        for _ in range(2):
            assert aot.compile_case(case, 80)["error"] is None
        print(json.dumps(counter.summary()))
    """)
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["misses"] == 1 and summary["hits"] == 1 and summary["compile_s"] > 0
    assert list(summary["missed"]) == ["adamw.grad_stats_kernel"]


# --------------------------------------------------------------------------- telemetry
def _fake_nvml(reasons: int, fail_init: bool = False):
    class NVMLError(Exception):
        pass

    def init():
        if fail_init:
            raise NVMLError("Driver Not Loaded")

    memory = types.SimpleNamespace(used=3 * 2**30, total=140 * 2**30)
    return types.SimpleNamespace(
        NVMLError=NVMLError, NVML_CLOCK_SM=0, NVML_CLOCK_MEM=1, NVML_TEMPERATURE_GPU=0,
        nvmlInit=init, nvmlShutdown=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: "gpu0",
        nvmlDeviceGetName=lambda h: b"NVIDIA H200", nvmlSystemGetDriverVersion=lambda: "580.159",
        nvmlDeviceGetClockInfo=lambda h, which: (1980, 3201)[which],
        nvmlDeviceGetPowerUsage=lambda h: 350_500, nvmlDeviceGetTemperature=lambda h, which: 45,
        nvmlDeviceGetMemoryInfo=lambda h: memory, nvmlDeviceGetCurrentClocksEventReasons=lambda h: reasons,
    )


def test_telemetry_reads_nvml_and_flags_throttling(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(reasons=0x4 | 0x1))
    state = telemetry.snapshot()
    assert state["gpu"] == "NVIDIA H200" and state["sm_clock_mhz"] == 1980 and state["mem_clock_mhz"] == 3201
    assert state["power_w"] == 350.5 and state["memory_used_mib"] == 3072
    assert state["clock_event_reasons"] == ["gpu_idle", "sw_power_cap"]
    assert "THROTTLED (sw_power_cap)" in telemetry.line(state)
    lines = telemetry.table_lines([{"op": "attention", "part": "goal", "when": "before", **state}])
    assert "| attention | goal | before | 1980 | 3201 | 350.5 | 45 | 3072 | gpu_idle, sw_power_cap |" in lines


def test_telemetry_without_nvml_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(0, fail_init=True))
    assert telemetry.snapshot() == {"nvml": "unavailable: NVMLError: Driver Not Loaded"}
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: the import fails
    state = telemetry.snapshot()
    assert state["nvml"].startswith("unavailable") and telemetry.line(state).startswith("NVML unavailable")


# --------------------------------------------------------------------------- gpu_suite.sh and a whole run
def test_gpu_suite_dry_run(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, RESULTS=str(tmp_path / "results"), OUT=str(tmp_path / "out"))
    out = subprocess.run(["bash", "bench/gpu_suite.sh", "--dry-run", "--time-left", "300"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "dry run: " in out.stdout and "pip install -q --no-deps --no-build-isolation --no-index -e ." in out.stdout
    limits = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+limit\s+(\d+) s", out.stdout, re.M)}
    budget = int(re.search(r"dry run: budget (\d+) s", out.stdout).group(1))
    assert budget <= 300 - 15 and set(limits) == set(suite.STAGES) and max(limits.values()) <= budget
    assert "packed 1 files" in out.stdout and (tmp_path / "out" / "bundle.tar.gz").exists()


@pytest.mark.slow
def test_quick_run_end_to_end_and_one_failing_op_loses_only_its_rows(tmp_path):
    """``python -m bench --quick``, every stage, on the CPU; relu_mlp's table process raises on purpose."""
    env = dict(os.environ, **{worker.FAIL_ENV: "relu_mlp:table"})
    out = subprocess.run([sys.executable, "-m", "bench", "--quick", "--workers", "2", "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]  # the failed op fails the run
    summary = out.stdout[out.stdout.index("== summary"):out.stdout.index("== short table")]
    for stage in ("smoke", "warmup", "profile", "plots"):
        assert re.search(rf"^{stage}\s+ok\b", summary, re.M), summary
    assert re.search(r"^goal\s+failed .* relu_mlp$", summary, re.M), summary
    assert re.search(r"^tests\s+skipped .*no CUDA device", summary, re.M), summary

    (results,) = tmp_path.glob("????-??-??-cpu-*.json")
    data = json.loads(results.read_text())
    ops = {r["op"].split(" ")[0] for r in data["rows"]}
    assert ops == {"layer_norm", "add+layer_norm", "adamw_step", "attention", "train_step"}  # no relu_mlp rows
    assert {r["part"] for r in data["rows"]} == {"goal", "rest"}
    assert all(r["peak_memory_mib"] is None for r in data["rows"])  # the CPU has no peak-memory counter
    assert {(t["op"], t["when"]) for t in data["telemetry"]} >= {("relu_mlp", "before"), ("relu_mlp", "after")}
    assert all(json.loads(p.read_text())["ok"] for p in (tmp_path / "smoke").glob("*.json"))
    assert len(list((tmp_path / "warmup").glob("relu_mlp-*.json"))) == 2
    markdown = results.with_suffix(".md").read_text()
    assert "not kernel timings" in markdown and "| peak MiB |" in markdown and "NVML" in markdown
    assert list(tmp_path.glob("profile-test-*.json")) and list(tmp_path.glob("*-memory-bound.png"))
    assert "== short table" in out.stdout and out.stdout.rstrip().endswith(harness.CPU_NOTE)
