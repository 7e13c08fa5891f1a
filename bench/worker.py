"""``python -m bench.worker STAGE --op OP --out DIR``: one op's share of a suite stage, in its own process.

The suite (``bench/suite.py``) starts one of these per op and stage, so a crash, a hang or a sticky
CUDA error costs that op alone.  Stages:

- ``smoke``: the op module's ``smoke(device)`` (small shapes, bf16 and fp16, against float64), with
  the autotuners on their first config (``OPT_CORE_TUNING=first``, set by the suite); writes
  ``smoke/<op>.json``; exit status 1 when a comparison fails or the check raises.
- ``prove``: the op module's ``prove(device, variant)`` for one unproven variant (a kernel never yet run
  on a GPU) against float64; writes ``smoke/<op>~<variant>.json``.  The table times that variant only
  where it passed; elsewhere its rows carry the reason instead of a time.
- ``warmup``: every case the table will time, each ``opt-core`` provider called once, with the
  autotuners compiling their share of the configs without launching (``OPT_CORE_TUNING=compile:I/N``);
  writes ``warmup/<op>-<I>.json`` (what was compiled, Triton's cache hits and misses).
- ``table``: the op's cases of one part ("goal" or "rest"), each timed by ``bench.harness.run_case``;
  after every case its rows go to ``records/`` and the results files are rewritten from every record
  of the run, the choices of the autotuners to ``tuned/<op>-<part>.json``; NVML telemetry before and
  after, Triton's cache counts at the end.

``OPT_CORE_BENCH_FAIL=op[:stage],...`` makes the named ops raise at the start of the named stage (every
stage without one): the suite's test that one failing op costs only its own rows.
"""

from __future__ import annotations

import os

import torch

# Before anything imports Triton: with no GPU, run the real kernels interpreted (the suite sets it too).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import collections  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

from bench import harness, telemetry  # noqa: E402

from bench.harness import DTYPES, OPS  # noqa: E402

FAIL_ENV = "OPT_CORE_BENCH_FAIL"


class CacheCounter:
    """Triton's compilation listener: what each compile request found in the on-disk cache."""

    def __init__(self):
        self.hits = 0
        self.misses = 0
        self.compile_us = 0
        self.missed: collections.Counter = collections.Counter()

    def __call__(self, *, src, metadata, metadata_group, times, cache_hit):
        if cache_hit:
            self.hits += 1
            return
        fn = getattr(src, "fn", None)
        module = getattr(fn, "module", None) or getattr(fn, "__module__", "") or ""
        self.misses += 1
        self.missed[f"{module.rsplit('.', 1)[-1]}.{getattr(src, 'name', '?')}"] += 1
        self.compile_us += times.total

    def install(self) -> "CacheCounter":
        import triton

        triton.knobs.compilation.listener = self
        return self

    def summary(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "compile_s": round(self.compile_us / 1e6, 2),
                "missed": dict(self.missed)}


def failure_requested(op: str, stage: str) -> bool:
    for item in filter(None, os.environ.get(FAIL_ENV, "").split(",")):
        name, _, where = item.partition(":")
        if name == op and where in ("", stage):
            return True
    return False


def _fail_if_asked(op: str, stage: str) -> None:
    if failure_requested(op, stage):
        raise RuntimeError(f"{FAIL_ENV} asks {op} to fail in the {stage} stage")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, allow_nan=True))


# --------------------------------------------------------------------------- smoke
def _check(op: str, label: str, path: Path, run, **extra) -> int:
    """``run()``'s comparisons against float64 (smoke or proof) written to ``path`` and printed; exit
    status 1 when one fails, none ran or it raised."""
    started = time.perf_counter()
    results, error = [], None
    try:
        _fail_if_asked(op, "smoke")
        results = run()
    except Exception:
        error = traceback.format_exc(limit=8)
    bad = [r for r in results if not r.ok]
    ok = error is None and bool(results) and not bad
    worst = max(results, key=lambda r: r.error / r.bound if r.bound else 0.0) if results else None
    _write_json(path, {
        "op": op, **{k: v for k, v in extra.items() if not callable(v)}, "ok": ok,
        "passed": len(results) - len(bad), "compared": len(results), "failed": [str(r) for r in bad],
        "tightest": str(worst) if worst else None, "error": error,
        "seconds": round(time.perf_counter() - started, 1),
        **{k: v() for k, v in extra.items() if callable(v)}})
    print(f"{label}: {len(results) - len(bad)}/{len(results)} comparisons pass"
          f"{'; tightest: ' + str(worst) if worst else ''}")
    for line in [str(r) for r in bad] + ([error] if error else []):
        print(f"  {line}")
    return 0 if ok else 1


def smoke(op: str, out: Path) -> int:
    device = _device()
    counter = CacheCounter().install()
    return _check(op, f"smoke {op}", out / "smoke" / f"{op}.json",
                  lambda: importlib.import_module(f"bench.{op}").smoke(device), compile_cache=counter.summary)


def prove(op: str, variant: str, out: Path) -> int:
    """The op module's ``prove(device, variant)``: an unproven variant's kernel against float64 at small
    shapes (raising where that kernel would not run), before any of its rows; writes
    ``smoke/<op>~<variant>.json``, which decides whether the table times the variant."""
    device = _device()
    return _check(op, f"prove {op} {variant}", harness.proof_path(out, op, variant),
                  lambda: importlib.import_module(f"bench.{op}").prove(device, variant), variant=variant)


# --------------------------------------------------------------------------- warm-up
def _warmup_cases(module, device, quick, dtypes):
    build = getattr(module, "warmup_cases", None)
    return build(device, quick, dtypes) if build else module.cases(device, quick, dtypes, "all")


def warmup(op: str, out: Path, quick: bool, dtypes: tuple, tag: str) -> int:
    """Each opt-core provider of each case called once (but the unproven variants': never run on a GPU, they
    compile at their own rows); the autotuners compile (their share) instead of launching, non-autotuned
    kernels (AdamW's) compile and run."""
    from opt_core.kernels import tuning

    device, started = _device(), time.perf_counter()
    counter = CacheCounter().install()
    errors = []
    try:
        _fail_if_asked(op, "warmup")
        module = importlib.import_module(f"bench.{op}")
        unproven = {name for name, v in getattr(module, "VARIANTS", {}).items() if v.unproven}
        for case in _warmup_cases(module, device, quick, dtypes):
            for name, provider in case.providers.items():
                if not name.startswith("opt-core") or name in unproven:  # those compile at their own rows
                    continue
                try:
                    (provider.build() if isinstance(provider, harness.Lazy) else provider)()
                except Exception as e:  # reported; the table compiles what is missing
                    errors.append(f"{case.op} {case.shape} {case.mode} {name}: {type(e).__name__}: {e}"[:300])
            del case
    except Exception as e:
        errors.append(f"{type(e).__name__}: {e}"[:300])
    _write_json(out / "warmup" / f"{op}-{tag}.json", {
        "op": op, "tag": tag, "compiled": tuning.compiled_counts(), "compile_cache": counter.summary(),
        "errors": errors, "seconds": round(time.perf_counter() - started, 1)})
    return 1 if errors else 0


# --------------------------------------------------------------------------- table
def _environment(out: Path, device: torch.device) -> dict:
    """The run's environment: read, or measured (the ceilings) and written by the first table process."""
    path = out / harness.ENVIRONMENT_FILE
    if path.exists():
        return json.loads(path.read_text())
    env = harness.environment(device, harness.measure_ceilings(device))
    _write_json(path, env)
    return env


def records_path(out: Path, op: str, part: str) -> Path:
    # Named so that file order is the suite's order: goal before rest, ops in OPS order.
    return out / harness.RECORDS_DIR / f"{harness.PARTS.index(part)}-{OPS.index(op)}-{op}-{part}.jsonl"


def _telemetry(path: Path, op: str, part: str, when: str) -> None:
    harness.append_records(path, "telemetry", [{"op": op, "part": part, "when": when, **telemetry.snapshot()}])


def table(op: str, part: str, out: Path, quick: bool, dtypes: tuple) -> int:
    from opt_core.kernels import tuning

    device = _device()
    counter = CacheCounter().install()
    env = _environment(out, device)
    ceilings = harness.Ceilings(env["copy_bandwidth_gbps"], env["gemm_tflops"])
    path = records_path(out, op, part)
    path.unlink(missing_ok=True)  # a rerun of this op and part replaces its rows
    tuned = out / "tuned" / f"{op}-{part}.json"
    _telemetry(path, op, part, "before")
    try:
        _fail_if_asked(op, "table")
        module = importlib.import_module(f"bench.{op}")
        unproven = {name for name, v in getattr(module, "VARIANTS", {}).items() if v.unproven}
        for case in module.cases(device, quick, dtypes, part):
            started = time.perf_counter()
            for name in unproven & case.providers.keys():
                if not harness.proven(out, op, name):
                    case.providers[name] = harness.not_proven(name)
            rows = harness.run_case(case, device, ceilings)
            del case
            harness.append_records(path, "row", [r.__dict__ for r in rows])
            harness.collect(out)
            _write_json(tuned, tuning.choices())
            print(f"{op} {rows[0].shape} {rows[0].mode}: {time.perf_counter() - started:.1f}s", flush=True)
    finally:
        _telemetry(path, op, part, "after")
        harness.append_records(path, "compile_cache", [{"op": op, "part": part, **counter.summary()}])
        harness.collect(out)
    return 0


# --------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("smoke", "prove", "warmup", "table"))
    parser.add_argument("--op", required=True, choices=OPS)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--part", default="goal", choices=harness.PARTS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dtypes", nargs="+", default=["bf16"], choices=sorted(DTYPES))
    parser.add_argument("--tag", default="0", help="warm-up: this process's name among the op's")
    parser.add_argument("--variant", help="prove: the unproven variant to check against float64")
    args = parser.parse_args(argv)
    dtypes = tuple(DTYPES[d] for d in args.dtypes)
    if args.stage == "smoke":
        return smoke(args.op, args.out)
    if args.stage == "prove":
        if not args.variant:
            parser.error("prove needs --variant")
        return prove(args.op, args.variant, args.out)
    if args.stage == "warmup":
        return warmup(args.op, args.out, args.quick, dtypes, args.tag)
    return table(args.op, args.part, args.out, args.quick, dtypes)


if __name__ == "__main__":
    sys.exit(main())
