"""``python -m bench``: check every kernel against float64, then benchmark it against its peers.

On a GPU the results go to ``bench/results/<date>-<gpu>.{json,md}`` (commit
them with the code that produced them).  Without one, the kernels run under
Triton's interpreter at small shapes: the check is real, the timings are not
kernel timings, and the results go to ``runs/bench/`` instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

import torch

# Before anything imports Triton: with no GPU, run the real kernels interpreted.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench import harness  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OPS = ("layer_norm", "adamw", "attention", "relu_mlp", "mfu")  # each names a bench/<op>.py with check() and cases()
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--dtypes", nargs="+", default=["bf16"], choices=sorted(DTYPES))
    parser.add_argument("--quick", action="store_true", help="fewer shapes (always on without a GPU)")
    parser.add_argument("--skip-check", action="store_true", help="benchmark only")
    parser.add_argument("--out", type=Path, help="results folder (default: bench/results on a GPU, runs/bench on the CPU)")
    args = parser.parse_args(argv)

    from opt_core.kernels import dispatch  # noqa: F401  (imports Triton after the switch above)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type == "cpu"
    modules = {op: importlib.import_module(f"bench.{op}") for op in args.ops}
    print(f"opt-core bench on {harness.device_name(device)}"
          f"{' (Triton interpreter)' if dispatch.INTERPRET else ''}")

    failed = 0
    if not args.skip_check:
        print("\n== correctness: error vs float64 <= 2x (forward) / 3x (gradients) PyTorch's own + 1 ulp")
        for op, module in modules.items():
            results = module.check(device, quick)
            bad = [r for r in results if not r.ok]
            failed += len(bad)
            worst = max(results, key=lambda r: r.error / r.bound if r.bound else 0.0)
            print(f"{op}: {len(results) - len(bad)}/{len(results)} comparisons pass; "
                  f"tightest: {worst}")
            for r in bad:
                print(f"  {r}")

    print("\n== microbenchmarks")
    ceilings = harness.measure_ceilings(device)
    env = harness.environment(device, ceilings)
    if device.type == "cpu":
        print(harness.CPU_NOTE)
    out = args.out or (ROOT / "bench" / "results" if device.type == "cuda" else ROOT / "runs" / "bench")
    rows = []
    for op, module in modules.items():
        started = time.perf_counter()
        for case in module.cases(device, quick, tuple(DTYPES[d] for d in args.dtypes)):
            rows += harness.run_case(case, device, ceilings)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # Written after every op, so a run cut short by a time limit keeps what it measured.
        json_path, md_path = harness.write_results(out, env, rows)
        print(f"{op}: {time.perf_counter() - started:.0f}s", flush=True)
    print(harness.markdown(env, rows))
    print(f"results: {json_path} and {md_path}")
    if failed:
        print(f"\n{failed} correctness comparison(s) FAILED (listed above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
