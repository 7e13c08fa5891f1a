"""``python -m bench.compare A.json B.json [--threshold 0.05]``: what changed from run A to run B.

Rows of the two results files (``bench/results/<date>-<gpu>.json``) are matched
by (op, shape, dtype, mode, provider); the table gives each match's median ms
in A and in B and the ratio B/A.  A row of ours (a provider named
``opt-core...``, e.g. ``opt-core-no-tma``) is flagged when it got slower by more
than the threshold (B/A > 1 + threshold) or when it ran in A and failed in B.
Peers' changes are shown and not flagged: a peer that slowed as much as ours
points at the machine rather than the code.  Medians are compared as they are;
look at the p20-p80 spread in the markdown reports before trusting a change of
a few percent.

Exit status: 1 when a row is flagged, 0 when none is, 2 when a file cannot be
read as a results file (the message names it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Optional

KEY = ("op", "shape", "dtype", "mode", "provider")
OURS = "opt-core"


@dataclasses.dataclass
class Change:
    key: tuple[str, ...]
    a_ms: Optional[float]          # None: failed or not timed in that run
    b_ms: Optional[float]
    flag: str = ""                 # "", "slower" or "failed in B" (rows of ours only)

    @property
    def ours(self) -> bool:
        return self.key[-1].startswith(OURS)

    @property
    def ratio(self) -> Optional[float]:
        return self.b_ms / self.a_ms if self.a_ms and self.b_ms else None


def load(path: Path) -> tuple[dict, dict[tuple[str, ...], dict]]:
    """(environment, rows by key) of a results file; ValueError naming the file when it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: cannot read it as JSON ({type(e).__name__}: {e})") from e
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: no 'rows' list, so not a bench results file")
    by_key = {}
    for row in rows:
        if not isinstance(row, dict) or any(k not in row for k in KEY):
            raise ValueError(f"{path}: a row without the fields {', '.join(KEY)}: {str(row)[:200]}")
        by_key[tuple(str(row[k]) for k in KEY)] = row  # a repeated case: the last row stands
    environment = data.get("environment")
    return environment if isinstance(environment, dict) else {}, by_key


def _ms(row: dict) -> Optional[float]:
    """The row's median, or None when it failed or carries no finite positive time."""
    ms = row.get("ms")
    if row.get("error") or not isinstance(ms, (int, float)) or not math.isfinite(ms) or ms <= 0:
        return None
    return float(ms)


def compare(a: dict, b: dict, threshold: float) -> list[Change]:
    """The rows present in both runs, in B's order, flagged as the module docstring says."""
    changes = []
    for key, b_row in b.items():
        if key not in a:
            continue
        change = Change(key, _ms(a[key]), _ms(b_row))
        if change.ours and change.a_ms is not None:
            if change.b_ms is None:
                change.flag = "failed in B"
            elif change.ratio > 1 + threshold:
                change.flag = "slower"
        changes.append(change)
    return changes


def _fmt(ms: Optional[float]) -> str:
    return f"{ms:.4f}" if ms is not None else "failed"


def table(changes: list[Change]) -> list[str]:
    lines = ["| op | shape | dtype | mode | provider | A ms | B ms | B/A | |", "|" + "---|" * 9]
    for c in changes:
        ratio = f"{c.ratio:.3f}" if c.ratio is not None else ""
        lines.append(f"| {' | '.join(c.key)} | {_fmt(c.a_ms)} | {_fmt(c.b_ms)} | {ratio} | "
                     f"{('REGRESSION: ' + c.flag) if c.flag else ''} |")
    return lines


def _describe(label: str, path: Path, env: dict) -> str:
    return f"{label}: {path} ({env.get('device', 'device not recorded')}, {env.get('date', 'no date')})"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path, help="the earlier results JSON")
    parser.add_argument("b", type=Path, help="the later results JSON")
    parser.add_argument("--threshold", type=float, default=0.05,
                        help="flag rows of ours more than this fraction slower (default 0.05)")
    args = parser.parse_args(argv)
    if not math.isfinite(args.threshold) or args.threshold < 0:
        parser.error(f"--threshold must be a fraction >= 0, got {args.threshold}")
    try:
        (env_a, a), (env_b, b) = load(args.a), load(args.b)
    except ValueError as e:
        print(f"bench.compare: {e}", file=sys.stderr)
        return 2

    changes = compare(a, b, args.threshold)
    print(_describe("A", args.a, env_a))
    print(_describe("B", args.b, env_b))
    if env_a.get("device") != env_b.get("device"):
        print("note: the runs are on different devices; the ratios compare the machines as much as the code")
    print()
    print("\n".join(table(changes)))
    only_a, only_b = len(a.keys() - b.keys()), len(b.keys() - a.keys())
    print(f"\n{len(changes)} rows in both runs, {only_a} only in A, {only_b} only in B")
    flagged = [c for c in changes if c.flag]
    if not flagged:
        print(f"no regression: no row of ours is more than {100 * args.threshold:g}% slower or newly failing")
        return 0
    print(f"REGRESSION: {len(flagged)} row(s) of ours over the {100 * args.threshold:g}% threshold:")
    for c in flagged:
        op, shape, dtype, mode, provider = c.key
        change = f"x{c.ratio:.3f}" if c.ratio is not None else "ran in A, failed in B"
        print(f"  {provider}: {op} {shape} {dtype} {mode}: {_fmt(c.a_ms)} -> {_fmt(c.b_ms)} ms ({change})")
    return 1


if __name__ == "__main__":
    sys.exit(main())
