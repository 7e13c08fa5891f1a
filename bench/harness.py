"""Microbenchmark harness: time a kernel and its peers in one process, on one device.

On a GPU: device-side timing with ``triton.testing.do_bench`` (warm-up first,
L2 flushed between calls, median with p20/p80), speed as a ratio to the named
peer, and the fraction of the roofline measured in the same run: GB/s over the
device-to-device copy bandwidth for memory-bound cases, TFLOP/s over a bf16
8192^3 matrix product on random data (cuBLAS) for compute-bound ones.  Beside
the time, each provider's peak memory: ``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats`` over one extra, untimed call (everything
allocated at that moment counts, the case's inputs included, as Liger-Kernel's
harness reports it).

On the CPU: the same cases at small shapes, timed by the wall clock.  The
kernels run under Triton's interpreter there, so those numbers measure numpy,
not kernels; every CPU report says so.

Results files (``<date>-<device-slug>.json`` and ``.md``; ``bench.compare``,
``bench.plots`` and people read them).  The JSON object:

- ``environment``: ``date`` (ISO 8601, UTC), ``device``, ``torch``, ``triton``,
  ``cuda``, ``copy_bandwidth_gbps``, ``gemm_tflops``, ``gemm`` and ``timing``
  (what was measured and how), ``nvml`` (the GPU's name and driver from NVML, or
  the sentence saying why there is none); ``note`` on CPU runs only.
- ``rows``: one object per (case, provider), the fields of ``Row``: ``op``,
  ``shape``, ``dtype``, ``mode``, ``provider``, ``ms``, ``ms_p20``, ``ms_p80``
  (NaN when the provider failed), ``gbps``, ``tflops``, ``roofline`` ("copy" or
  "gemm"), ``fraction_of_roofline``, ``speedup_vs_baseline`` (null when the
  baseline failed), ``baseline``, ``error`` (null, or why the provider failed),
  ``peak_memory_mib`` (null on the CPU or when not measured), ``part`` ("goal":
  the shapes the suite times first, "rest", or "" outside the suite).
- ``telemetry``: one object per op process and moment, ``op``, ``part``,
  ``when`` ("before" or "after" its cases) and ``bench.telemetry.snapshot``'s
  fields (``gpu``, ``driver``, ``sm_clock_mhz``, ``mem_clock_mhz``,
  ``power_w``, ``temperature_c``, ``memory_used_mib``, ``clock_event_reasons``)
  or ``nvml`` with the reason there is none.
- ``compile_cache``: one object per op process: ``op``, ``part``, ``hits``
  (kernels loaded from Triton's on-disk cache), ``misses`` (compiled there),
  ``compile_s``, ``missed`` (kernel name -> count).
Readers must ignore fields they do not know; new fields are only ever added.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib
import itertools
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

OPS = ("layer_norm", "adamw", "attention", "relu_mlp", "mfu")  # each names a bench/<op>.py with smoke, specs, cases
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

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
    part: str = ""                   # "goal" or "rest" in the suite (which pass times it)


@dataclasses.dataclass(frozen=True)
class Target:
    """What a case list depends on about the device: a GPU or the CPU, and TMA (sm_90+) or not."""

    gpu: bool
    tma: bool

    @classmethod
    def of(cls, device: torch.device) -> "Target":
        return cls(device.type == "cuda", has_tma(device))

    @property
    def arch(self) -> int:
        """The compute capability the AOT cases stand for: sm_90 with TMA, else sm_80."""
        return 90 if self.tma else 80


H200 = Target(gpu=True, tma=True)


@dataclasses.dataclass(frozen=True)
class Spec:
    """A case without its tensors: what the plan counts and what ``cases()`` builds.  Specs of one
    ``group`` share their tensors (the modes of one shape), so a module builds them together."""

    op: str
    shape: str
    dtype: torch.dtype
    mode: str
    bytes: int
    flops: int
    providers: tuple                 # the providers a build always has (optional peers come on top)
    baseline: str
    part: str                        # "goal" or "rest"
    group: tuple
    warmup_ms: int = 25
    rep_ms: int = 100

    def case(self, providers: dict, grad_to_none=()) -> "Case":
        return Case(self.op, self.shape, self.dtype, self.mode, self.bytes, providers, self.baseline, self.flops,
                    list(grad_to_none), self.warmup_ms, self.rep_ms, self.part)


PARTS = ("goal", "rest")


def selected(specs: list[Spec], part: str) -> list[Spec]:
    """The specs of one part ("goal", "rest") or all of them ("all"), goal first."""
    if part not in PARTS + ("all",):
        raise ValueError(f"part must be one of {PARTS + ('all',)}, got {part!r}")
    return [s for p in PARTS for s in specs if s.part == p and part in (p, "all")]


def grouped(specs: list[Spec]):
    """(group, its specs) in order; a group's specs are consecutive."""
    return [(key, list(items)) for key, items in itertools.groupby(specs, key=lambda s: s.group)]


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
    peak_memory_mib: float | None = None   # one extra untimed call, after reset_peak_memory_stats (GPU only)
    part: str = ""


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
def switched(module, name: str, value):
    previous = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, previous)


@dataclasses.dataclass(frozen=True)
class Variant:
    """An A/B provider: our op with switches of its kernel module set (``TMA="off"``, ``PERSISTENT="off"``,
    ...), timed beside the default in the same run: what a path buys, or what a candidate costs.

    ``modes``: the modes whose rows it joins; ``why``: what the row answers (bench docs, the plan);
    ``unproven``: its kernel has never run on a GPU (the suite's warm-up does not launch it, so a hang
    or a sticky CUDA error costs only its own rows)."""

    name: str
    switches: tuple               # ((switch, value), ...) of the op's kernel module
    modes: tuple = ("fwd", "bwd", "fwd+bwd", "step")
    why: str = ""
    unproven: bool = False

    def runner(self, module, build: Callable[[], Callable[[], object]]) -> Callable[[], object]:
        return with_switches(module, dict(self.switches), build)


def unproven_variants(module, target: "Target", quick: bool, dtypes) -> list[str]:
    """The unproven variants of a bench op module (``bench.<op>``) that some row of this target lists: each
    must pass its proof (the module's ``prove(device, variant)``, run in the smoke stage) to be timed."""
    names = {name for name, v in getattr(module, "VARIANTS", {}).items() if v.unproven}
    listed = {name for spec in module.specs(target, quick, dtypes) for name in spec.providers}
    return sorted(names & listed)


def proof_path(out_dir: Path, op: str, variant: str) -> Path:
    return out_dir / "smoke" / f"{op}~{variant}.json"


def proven(out_dir: Path, op: str, variant: str) -> bool:
    """Whether this run (or the last one in ``out_dir``) proved ``variant`` of ``op`` against float64."""
    path = proof_path(out_dir, op, variant)
    return path.exists() and json.loads(path.read_text())["ok"]


def not_proven(variant: str) -> Callable[[], object]:
    """The provider an unproven variant gets at its rows when its proof did not pass: it raises, so its rows
    say why they hold no time."""
    def run():
        raise RuntimeError(f"{variant} not timed: its proof against float64 did not pass in the smoke stage")
    return run


def add_variants(runners: dict, spec, variants: dict, module, build: Callable[[], Callable[[], object]]) -> dict:
    """``runners`` with a runner for every variant ``spec`` lists, each built by ``build()`` under its
    switches."""
    for name in spec.providers:
        if name in variants:
            runners[name] = variants[name].runner(module, build)
    return runners


def _switch_target(module, name: str) -> tuple:
    """(module, attribute) a variant's switch names: ``NAME`` of the op's kernel module, or
    ``other.NAME`` of ``opt_core.kernels.other`` (a switch of a kernel the op's module routes to)."""
    if "." not in name:
        return module, name
    other, attribute = name.rsplit(".", 1)
    return importlib.import_module(f"opt_core.kernels.{other}"), attribute


def with_switches(module, switches: dict, build: Callable[[], Callable[[], object]]) -> Callable[[], object]:
    """A runner built by ``build()`` and timed with ``module.<name> = value`` for each switch: set while
    building (a "bwd" runner runs its forward then) and around every call."""
    def set_all():
        stack = contextlib.ExitStack()
        for name, value in switches.items():
            stack.enter_context(switched(*_switch_target(module, name), value))
        return stack

    with set_all():
        runner = build()

    def run():
        with set_all():
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
    while len(times) < 2 or (time.perf_counter() < deadline and len(times) < 50):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 5 else [times[0], times[-1]] * 2
    return statistics.median(times), q[0], q[-1]


def peak_memory_mib(fn: Callable[[], object], device: torch.device, grad_to_none=None) -> float | None:
    """Peak memory allocated over one call of ``fn`` (everything live counts, inputs included); None off a GPU."""
    if device.type != "cuda":
        return None
    for t in grad_to_none or ():
        t.grad = None  # as before each timed call
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def measure_ceilings(device: torch.device) -> Ceilings:
    """Copy bandwidth (1 GiB on a GPU) and a large matrix product's rate, on random data (zeros run faster)."""
    nbytes = 1 << 30 if device.type == "cuda" else 1 << 24
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms, _, _ = time_ms(lambda: dst.copy_(src), device)
    copy_gbps = 2 * nbytes / (ms * 1e-3) / 1e9
    src = dst = None  # free the 2 GiB before the matrix product
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms, _, _ = time_ms(lambda: a @ b, device)
    return Ceilings(copy_gbps, 2 * n**3 / (ms * 1e-3) / 1e12)


def run_case(case: Case, device: torch.device, ceilings: Ceilings) -> list[Row]:
    timings: dict[str, tuple[float, float, float] | str] = {}
    memory: dict[str, float | None] = {}
    for name, provider in case.providers.items():
        fn = None
        try:
            fn = provider.build() if isinstance(provider, Lazy) else provider
            timings[name] = time_ms(fn, device, case.grad_to_none, warmup_ms=case.warmup_ms, rep_ms=case.rep_ms)
            memory[name] = peak_memory_mib(fn, device, case.grad_to_none)
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
                            roofline, nan, None, case.baseline, t, None, case.part))
            continue
        ms, p20, p80 = t
        gbps = case.bytes / (ms * 1e-3) / 1e9
        tflops = case.flops / (ms * 1e-3) / 1e12
        fraction = tflops / ceilings.gemm_tflops if case.flops else gbps / ceilings.copy_gbps
        speedup = base[0] / ms if isinstance(base, tuple) else None
        rows.append(Row(case.op, case.shape, _dtype(case.dtype), case.mode, name, ms, p20, p80, gbps, tflops,
                        roofline, fraction, speedup, case.baseline, None, memory.get(name), case.part))
    return rows


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def device_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def environment(device: torch.device, ceilings: Ceilings) -> dict:
    import triton

    from bench import telemetry

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        # Four significant digits: a loaded CPU's GEMM rate rounds to 0.0 at one decimal (and the suite's
        # processes read the ceilings back from here).
        "copy_bandwidth_gbps": float(f"{ceilings.copy_gbps:.4g}"),
        "gemm_tflops": float(f"{ceilings.gemm_tflops:.4g}"),
        "gemm": "bf16 8192^3 torch.matmul, random data" if device.type == "cuda" else "fp32 512^3 torch.matmul",
        "timing": "triton.testing.do_bench median (p20/p80), L2 flushed" if device.type == "cuda"
        else "wall clock median on the CPU",
        "nvml": telemetry.describe(telemetry.snapshot()),
    }
    if device.type != "cuda":
        env["note"] = CPU_NOTE
    return env


# --------------------------------------------------------------------------- the report
_EXPLANATION = (
    "GB/s counts the minimal bytes each mode must move, TFLOP/s the FLOPs written down in the op's "
    "bench module; `% roof` is GB/s over the copy bandwidth (memory-bound cases) or TFLOP/s over the "
    "GEMM rate (compute-bound cases), both measured in this run; `x base` is the baseline's time over "
    "this provider's; `peak MiB` is the memory allocated at the peak of one extra call (inputs included).")
_HEADER = "| op | shape | dtype | mode | provider | ms (p20-p80) | GB/s | TFLOP/s | % roof | x base | peak MiB |"


def row_line(r: Row) -> str:
    if r.error:
        return f"| {r.op} | {r.shape} | {r.dtype} | {r.mode} | {r.provider} | failed: {r.error} | | | | | |"
    speed = f"{r.speedup_vs_baseline:.2f} vs {r.baseline}" if r.speedup_vs_baseline is not None else ""
    gbps = f"{r.gbps:.0f}" if r.roofline == "copy" else ""
    tflops = f"{r.tflops:.1f}" if r.roofline == "gemm" else ""
    memory = f"{r.peak_memory_mib:.0f}" if r.peak_memory_mib is not None else ""
    return (f"| {r.op} | {r.shape} | {r.dtype} | {r.mode} | {r.provider} | {r.ms:.4f} ({r.ms_p20:.4f}-{r.ms_p80:.4f}) "
            f"| {gbps} | {tflops} | {100 * r.fraction_of_roofline:.0f}% {r.roofline} | {speed} | {memory} |")


def table_lines(rows: list[Row]) -> list[str]:
    return [_HEADER, "|" + "---|" * (_HEADER.count("|") - 1)] + [row_line(r) for r in rows]


def markdown(env: dict, rows: list[Row], telemetry: list[dict] = (), compile_cache: list[dict] = ()) -> str:
    from bench import telemetry as nvml

    lines = [f"# opt-core microbenchmarks: {env['device']}", ""]
    lines += [f"- {k}: {v}" for k, v in env.items() if k != "note"]
    if "note" in env:
        lines += ["", f"**{env['note']}**"]
    lines += ["", _EXPLANATION, ""] + table_lines(rows)
    if telemetry:
        lines += ["", "## GPU state before and after each op process (NVML)", ""] + nvml.table_lines(telemetry)
    if compile_cache:
        lines += ["", "## Triton's cache in each op process", ""]
        lines += [compile_cache_line(c) for c in compile_cache]
    return "\n".join(lines) + "\n"


def compile_cache_line(c: dict) -> str:
    missed = ", ".join(f"{name} x{n}" for name, n in sorted(c.get("missed", {}).items()))
    return (f"- {c['op']} ({c.get('part') or 'all'}): {c['hits']} loaded from the cache, {c['misses']} compiled"
            f" ({c.get('compile_s', 0.0):.1f} s){': ' + missed if missed else ''}")


def write_results(out_dir: Path, env: dict, rows: list[Row], telemetry: list[dict] = (),
                  compile_cache: list[dict] = ()) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{env['date'][:10]}-{device_slug(env['device'])}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    data = {"environment": env, "rows": [dataclasses.asdict(r) for r in rows], "telemetry": list(telemetry),
            "compile_cache": list(compile_cache)}
    _replace(json_path, json.dumps(data, indent=1, allow_nan=True))
    _replace(md_path, markdown(env, rows, telemetry, compile_cache))
    return json_path, md_path


def _replace(path: Path, text: str) -> None:
    # Write beside, then rename: a process killed mid-write leaves the previous complete file.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- a run's records, across processes
# The suite runs each op in its own process.  Each appends its records (rows, telemetry, cache counts) to
# its own JSON-lines file under <out>/records/ and, after every case, rewrites the results files from
# every record file there: a run killed at any point keeps everything measured before it.
ENVIRONMENT_FILE = "environment.json"
RECORDS_DIR = "records"


def append_records(path: Path, kind: str, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for record in records:
            f.write(json.dumps({"type": kind, **record}, allow_nan=True) + "\n")


def read_records(out_dir: Path) -> dict[str, list[dict]]:
    """Every record under ``out_dir/records``, by type, in file-name then line order."""
    found: dict[str, list[dict]] = {"row": [], "telemetry": [], "compile_cache": []}
    for path in sorted((out_dir / RECORDS_DIR).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # the last line of a process killed while writing it
                continue
            found.setdefault(record.pop("type"), []).append(record)
    return found


def rows_from_records(records: list[dict]) -> list[Row]:
    fields = {f.name for f in dataclasses.fields(Row)}
    return [Row(**{k: v for k, v in r.items() if k in fields}) for r in records]


def collect(out_dir: Path) -> tuple[Path, Path] | None:
    """Rewrite the results files from the run's environment and records; None before the environment exists."""
    env_path = out_dir / ENVIRONMENT_FILE
    if not env_path.exists():
        return None
    records = read_records(out_dir)
    return write_results(out_dir, json.loads(env_path.read_text()), rows_from_records(records["row"]),
                         records["telemetry"], records["compile_cache"])
