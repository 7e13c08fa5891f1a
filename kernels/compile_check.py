"""``python -m opt_core.kernels.compile_check``: the AOT compile check from the command line.

Compiles every kernel case of ``kernels/aot_cases.py`` for sm_80 and sm_90 (no
GPU needed) and prints registers, spills, shared memory, tensor-core use, TMA loads and stores,
the deepest wgmma pipelining, ptxas's notes where it serialised wgmmas, warp specialisation,
persistence and the widest global load per case; exits 1 if any case has a problem.  See ``kernels/aot.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from opt_core.kernels import aot, aot_cases


def _facts(r: dict) -> str:
    flags = [name for name in ("wgmma", "mma", "tma", "tma_store", "persistent", "warp_specialized") if r[name]]
    pending = f" wait<={r['wgmma_max_pending']}" if r["wgmma_max_pending"] is not None else ""
    serialized = f" serialized({','.join(r['wgmma_notes'])})" if r["wgmma_serialized"] else ""
    return (f"REG {r['registers']:3d} STACK {r['stack']:4d} smem {r['shared']:6d} ld{r['max_load_bits']:>4d}b"
            f"{pending} {' '.join(flags)}{serialized}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="AOT compile check of every kernel")
    parser.add_argument("--arch", type=int, nargs="+", default=list(aot.ARCHS), help="compute capabilities")
    parser.add_argument("--filter", default="", help="only cases whose name contains this")
    parser.add_argument("--json", help="write every result to this file")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("opt_core.kernels.compile_check: unset TRITON_INTERPRET; the interpreter compiles nothing", file=sys.stderr)
        return 2

    cases = [c for c in aot_cases.all_cases() if args.filter in c.name]
    results = aot.compile_all(cases, args.arch, args.workers)
    failed = 0
    for r in results:
        issues = aot.problems(r)
        failed += bool(issues)
        facts = "" if r.get("error") else _facts(r)
        print(f"sm_{r['arch']} {r['case']:<60} {facts} {'; '.join(issues) or 'ok'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(f"{len(results)} compiles, {failed} with problems")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
