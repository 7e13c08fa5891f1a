"""``python -m bench``: the benchmark suite, every stage (``bench/suite.py``), or its plan.

On a GPU: a smoke check of every kernel against float64, a parallel compile warm-up, the table of
every op against its peers (goal shapes first), a training-step profile, plots and the GPU tests,
each stage within its share of ``--budget`` seconds; results in ``--out`` as
``<date>-<gpu>.{json,md}`` (copy them to ``bench/results/`` and commit them with the code that
produced them, with ``kernels/tuned/<gpu>.json``).  Without one, every stage's orchestration runs on
the interpreter (the table's timings are not kernel timings) or the reference paths, and the GPU
tests skip.  ``--plan`` prints what a run compiles and launches on an H200 and about how long it
takes; ``--dry-run`` prints each stage's time limit and starts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

# Before anything imports Triton: with no GPU, run the real kernels interpreted.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench import suite  # noqa: E402
from bench.harness import DTYPES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", nargs="+", default=["all"],
                        help=f"of {', '.join(suite.STAGES)}; 'table' = goal rest profile plots (default: all)")
    parser.add_argument("--ops", nargs="+", default=list(suite.OPS), choices=suite.OPS)
    parser.add_argument("--dtypes", nargs="+", default=["bf16"], choices=sorted(DTYPES))
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--budget", type=float, help="seconds the whole run may take (default: 450 on a GPU, "
                                                     "900 on the CPU)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes at once (warm-up, smoke)")
    parser.add_argument("--retune", action="store_true", help="tune every kernel again, ignoring kernels/tuned/")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench", help="results folder")
    parser.add_argument("--plan", action="store_true", help="print the plan for an H200 and exit")
    parser.add_argument("--cores", type=int, default=16, help="with --plan: the GPU machine's cores")
    parser.add_argument("--dry-run", action="store_true", help="print each stage's limit, start nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plan:
        from bench import plan

        return plan.main(["--cores", str(args.cores)] + (["--quick"] if args.quick else []))
    budget = args.budget if args.budget is not None else 450.0 if torch.cuda.is_available() else 900.0
    try:
        stages = suite.expand(args.stages)
    except ValueError as e:
        print(f"python -m bench: {e}", file=sys.stderr)
        return 2
    settings = suite.Settings(args.out, tuple(args.ops), tuple(args.dtypes), args.quick, stages, budget,
                              max(1, args.workers), args.retune)
    return suite.dry_run(settings) if args.dry_run else suite.run(settings)


if __name__ == "__main__":
    sys.exit(main())
