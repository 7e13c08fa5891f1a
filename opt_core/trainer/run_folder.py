"""Which folder a run writes to, so that no run ever destroys another run's files.

Without ``--out`` a run gets a fresh ``runs/demo-N`` (the next free N; ``--resume`` continues the newest).
An explicit ``--out`` that already holds a run is refused unless ``--resume`` continues that run.
What killed saves left behind there (temporary files and folders) is removed at the start.
"""

from __future__ import annotations

from pathlib import Path

from opt_core.trainer.checkpoint import CheckpointStore, RunFolderError
from opt_core.trainer.runtime import Runtime

DEMO_ROOT = Path("runs")
DEMO_PREFIX = "demo-"


def demo_runs(root: Path = DEMO_ROOT) -> list[Path]:
    """The ``runs/demo-N`` folders, by N."""
    found = [p for p in root.glob(f"{DEMO_PREFIX}*") if p.is_dir() and p.name[len(DEMO_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(DEMO_PREFIX):]))


def _fresh_demo_folder(root: Path) -> Path:
    """Create the next free ``runs/demo-N`` (mkdir decides, so two runs starting together get two)."""
    existing = demo_runs(root)
    n = int(existing[-1].name[len(DEMO_PREFIX):]) + 1 if existing else 1
    root.mkdir(parents=True, exist_ok=True)
    while True:
        folder = root / f"{DEMO_PREFIX}{n}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            n += 1


def _what_it_holds(store: CheckpointStore) -> str:
    parts = []
    if store.folder.is_dir():
        parts.append(f"{sum(1 for _ in store.folder.iterdir())} entries in checkpoints/")
    for name in ("metrics.jsonl", "checkpoints.json"):
        if (store.out / name).exists():
            parts.append(name)
    return ", ".join(parts)


def _claim(args) -> Path:
    if args.out is None:
        if not args.resume:
            return _fresh_demo_folder(DEMO_ROOT)
        existing = demo_runs(DEMO_ROOT)
        if not existing:
            raise RunFolderError(f"--resume without --out: there is no {DEMO_ROOT / (DEMO_PREFIX + 'N')} to continue; "
                                 "name the run folder with --out")
        return existing[-1]
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file, not a run folder")
    store = CheckpointStore(out, sharded=False)
    if not args.resume and store.holds_run():
        raise RunFolderError(f"--out {out} already holds a run ({_what_it_holds(store)}); continue it with "
                             f"--resume --out {out}, or write this run elsewhere: another --out, or no --out for a "
                             f"fresh {DEMO_ROOT / (DEMO_PREFIX + 'N')}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def claim_run_folder(args, rt: Runtime) -> Path:
    """The run folder, the same on every rank (rank 0 decides), with stale temporaries removed; or the same
    RunFolderError on every rank."""
    decision = None
    if rt.main:
        try:
            out = _claim(args)
            for stale in CheckpointStore(out, sharded=False).clean_temporaries():
                print(f"removed {stale} (left by a save that was killed)")
            decision = ("ok", str(out))
        except RunFolderError as err:
            decision = ("refused", str(err))
    kind, value = rt.broadcast(decision)
    if kind == "refused":
        raise RunFolderError(value)
    return Path(value)
