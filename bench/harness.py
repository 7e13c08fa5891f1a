"""Microbenchmark harness: time a kernel and its peers in one process, on one device.

On a GPU: device-side timing with ``triton.testing.do_bench`` (warm-up first,
L2 flushed between calls, median with p20/p80), speed as a ratio to the named
peer, and the fraction of the roofline measured in the same run: GB/s over the
device-to-device copy bandwidth for memory-bound cases, TFLOP/s over a bf16
8192^3 matrix product on random data (cuBLAS) for compute-bound ones.

On the CPU: the same cases at small shapes, timed by the wall clock.  The
kernels run under Triton's interpreter there, so those numbers measure numpy,
not kernels; every CPU report says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

CPU_NOTE = (
    "CPU run: the Triton kernels ran under the interpreter (numpy) and peers on "
    "the CPU. These timings are not kernel timings and say nothing about GPU speed."
)


@dataclasses.dataclass
class Case:
    """One shape of one op in one mode, and everything that computes it."""

    op: str
    shape: str                       # e.g. "16384x768"
    dtype: torch.dtype
    mode: str                        # "fwd", "bwd" or "fwd+bwd"
    bytes: int                       # minimal bytes moved (read + written) in this mode
    providers: dict[str, Callable[[], object]]
    baseline: str                    # the peer the ratio is taken against
    flops: int = 0                   # for compute-bound ops; 0 for memory-bound ones
    grad_to_none: list = dataclasses.field(default_factory=list)
    warmup_ms: int = 25              # do_bench's warm-up and repeat budgets (longer for whole training steps)
    rep_ms: int = 100


class Lazy:
    """A provider built just before it is timed and dropped right after (a whole model and
    optimizer per provider: the large ones do not leave room for two at once)."""

    def __init__(self, build: Callable[[], Callable[[], object]]):
        self.build = build


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """The two rooflines, measured once per run on the device at hand."""

    copy_gbps: float        # device-to-device copy, bytes read + written
    gemm_tflops: float      # a large matrix product (bf16 on a GPU, fp32 on the CPU)


@dataclasses.dataclass
class Row:
    op: str
    shape: str
    dtype: str
    mode: str
    provider: str
    ms: float
    ms_p20: float
    ms_p80: float
    gbps: float
    tflops: float
    roofline: str                    # "copy" (memory-bound case) or "gemm" (compute-bound case)
    fraction_of_roofline: float
    speedup_vs_baseline: float | None
    baseline: str
    error: str | None = None


def mode_runner(mode: str, fn: Callable[..., object], leaves, grads) -> Callable[[], object]:
    """What to time for one mode of an op ``fn(*leaves) -> output or tuple of outputs``.

    "fwd": the forward without autograd; "bwd": the backward only (the forward
    runs once now, its graph is kept and replayed); "fwd+bwd": both.  ``grads``
    are the upstream gradients, one per output.
    """
    def outputs():
        outs = fn(*leaves)
        return outs if isinstance(outs, tuple) else (outs,)

    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(*leaves)
        return run
    if mode == "bwd":
        outs = outputs()
        return lambda: torch.autograd.backward(outs, list(grads[: len(outs)]), retain_graph=True)
    if mode == "fwd+bwd":
        def run():
            outs = outputs()
            torch.autograd.backward(outs, list(grads[: len(outs)]))
        return run
    raise ValueError(f"mode must be 'fwd', 'bwd' or 'fwd+bwd', got {mode!r}")


def has_tma(device: torch.device) -> bool:
    """A GPU with TMA (sm_90 or newer), where the kernels' descriptor paths run by default."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


@contextlib.contextmanager
def _switched(module, name: str, value):
    previous = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, previous)


def with_switch(module, name: str, value, build: Callable[[], Callable[[], object]]) -> Callable[[], object]:
    """A runner built by ``build()`` and timed with ``module.name = value`` (a kernel module's switch, such
    as ``TMA = "off"`` for an A/B row): set while building (a "bwd" runner runs its forward then) and
    around every call."""
    with _switched(module, name, value):
        runner = build()

    def run():
        with _switched(module, name, value):
            return runner()
    return run


def time_ms(fn: Callable[[], object], device: torch.device, grad_to_none=None, *, warmup_ms: int = 25,
            rep_ms: int = 100) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds per call of ``fn``."""
    if device.type == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                                quantiles=[0.5, 0.2, 0.8])
        return p50, p20, p80
    fn()  # warm-up: first-call work (interpreter rewrite, allocator) is not timed
    times = []
    deadline = time.perf_counter() + rep_ms / 1000
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 5 else [times[0]] * 4
    return statistics.median(times), q[0], q[3]


def measure_ceilings(device: torch.device) -> Ceilings:
    """Copy bandwidth (1 GiB on a GPU) and a large matrix product's rate, on random data (zeros run faster)."""
    nbytes = 1 << 30 if device.type == "cuda" else 1 << 24
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms, _, _ = time_ms(lambda: dst.copy_(src), device)
    copy_gbps = 2 * nbytes / (ms * 1e-3) / 1e9
    del src, dst
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms, _, _ = time_ms(lambda: a @ b, device)
    return Ceilings(copy_gbps, 2 * n**3 / (ms * 1e-3) / 1e12)


def run_case(case: Case, device: torch.device, ceilings: Ceilings) -> list[Row]:
    timings: dict[str, tuple[float, float, float] | str] = {}
    for name, provider in case.providers.items():
        try:
            fn = provider.build() if isinstance(provider, Lazy) else provider
            timings[name] = time_ms(fn, device, case.grad_to_none, warmup_ms=case.warmup_ms, rep_ms=case.rep_ms)
        except Exception as e:  # a peer that fails at a shape is reported, not fatal
            timings[name] = f"{type(e).__name__}: {e}"[:200]
        finally:
            fn = None
            if isinstance(provider, Lazy) and device.type == "cuda":
                torch.cuda.empty_cache()
    base = timings.get(case.baseline)
    roofline = "gemm" if case.flops else "copy"
    rows = []
    for name, t in timings.items():
        if isinstance(t, str):
            nan = float("nan")
            rows.append(Row(case.op, case.shape, _dtype(case.dtype), case.mode, name, nan, nan, nan, nan, nan,
                            roofline, nan, None, case.baseline, t))
            continue
        ms, p20, p80 = t
        gbps = case.bytes / (ms * 1e-3) / 1e9
        tflops = case.flops / (ms * 1e-3) / 1e12
        fraction = tflops / ceilings.gemm_tflops if case.flops else gbps / ceilings.copy_gbps
        speedup = base[0] / ms if isinstance(base, tuple) else None
        rows.append(Row(case.op, case.shape, _dtype(case.dtype), case.mode, name, ms, p20, p80, gbps, tflops,
                        roofline, fraction, speedup, case.baseline))
    return rows


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def environment(device: torch.device, ceilings: Ceilings) -> dict:
    import triton

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "copy_bandwidth_gbps": round(ceilings.copy_gbps, 1),
        "gemm_tflops": round(ceilings.gemm_tflops, 1),
        "gemm": "bf16 8192^3 torch.matmul, random data" if device.type == "cuda" else "fp32 512^3 torch.matmul",
        "timing": "triton.testing.do_bench median (p20/p80), L2 flushed" if device.type == "cuda"
        else "wall clock median on the CPU",
    }
    if device.type != "cuda":
        env["note"] = CPU_NOTE
    return env


def markdown(env: dict, rows: list[Row]) -> str:
    lines = [f"# opt-core microbenchmarks: {env['device']}", ""]
    lines += [f"- {k}: {v}" for k, v in env.items() if k != "note"]
    if "note" in env:
        lines += ["", f"**{env['note']}**"]
    lines += ["", "GB/s counts the minimal bytes each mode must move, TFLOP/s the FLOPs written down in the op's "
              "bench module; `% roof` is GB/s over the copy bandwidth (memory-bound cases) or TFLOP/s over the "
              "GEMM rate (compute-bound cases), both measured in this run; `x base` is the baseline's time over "
              "this provider's.", ""]
    header = "| op | shape | dtype | mode | provider | ms (p20-p80) | GB/s | TFLOP/s | % roof | x base |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        if r.error:
            lines.append(f"| {r.op} | {r.shape} | {r.dtype} | {r.mode} | {r.provider} | failed: {r.error} | | | | |")
            continue
        speed = f"{r.speedup_vs_baseline:.2f} vs {r.baseline}" if r.speedup_vs_baseline is not None else ""
        gbps = f"{r.gbps:.0f}" if r.roofline == "copy" else ""
        tflops = f"{r.tflops:.1f}" if r.roofline == "gemm" else ""
        lines.append(
            f"| {r.op} | {r.shape} | {r.dtype} | {r.mode} | {r.provider} | {r.ms:.4f} ({r.ms_p20:.4f}-{r.ms_p80:.4f}) "
            f"| {gbps} | {tflops} | {100 * r.fraction_of_roofline:.0f}% {r.roofline} | {speed} |"
        )
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, env: dict, rows: list[Row]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-").lower()
    stem = out_dir / f"{env['date'][:10]}-{slug}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps({"environment": env, "rows": [dataclasses.asdict(r) for r in rows]},
                                    indent=1, allow_nan=True))
    md_path.write_text(markdown(env, rows))
    return json_path, md_path
