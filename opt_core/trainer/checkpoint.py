"""Checkpoint I/O of one run folder: atomic saves, checksums, pruning within the run, verified resumes.

Layout (``out`` is the run folder)::

    out/checkpoints/step-00000100.pt    one process: everything in one torch.save file
    out/checkpoints/step-00000100/      a distributed run: a DCP folder (opt_core.dist.checkpoint), whose
                                        own manifest.json holds every shard file's size and SHA-256
    out/checkpoints.json                this run's checkpoints, newest last, each .pt with its size and
                                        SHA-256; rewritten atomically after every save and prune

A save is a temporary file (or folder), fsync, rename, and only then its entry in checkpoints.json, so
the manifest is written last: a checkpoint counts once its entry exists and its bytes match it.
``newest_intact`` walks the entries newest first and falls back past every damaged one, saying which
file it skipped and why; pruning deletes only checkpoints listed in this run's manifest.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from opt_core import dist
from opt_core.dist.checkpoint import file_digest
from opt_core.files import fsync
from opt_core.process_group import local_tensor
from opt_core.trainer.guard import TrainingStopped

MANIFEST = "checkpoints.json"
EXTRA = dist.checkpoint.EXTRA


class RunFolderError(TrainingStopped):
    """A run folder that cannot be used as asked (another run's files, no intact checkpoint, ...)."""

    label = "REFUSED"


def checkpoint_paths(out: Path) -> list[Path]:
    """The single-process checkpoint files in ``out/checkpoints``, oldest first."""
    return sorted((out / "checkpoints").glob("step-*.pt"))


def sharded_checkpoint_paths(out: Path) -> list[Path]:
    """Complete sharded (DCP) checkpoint folders of a distributed run, oldest first."""
    return sorted(p for p in (out / "checkpoints").glob("step-*") if p.is_dir() and dist.checkpoint.is_checkpoint(p))


def write_atomically(path: Path, write: Callable) -> None:
    """``write(file)`` into a temporary file beside ``path``, fsync, rename over ``path``."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def is_finite_state(state) -> bool:
    """Every floating tensor (DTensors: this rank's shard) in a nested dict/list state is finite."""
    if isinstance(state, torch.Tensor):
        t = local_tensor(state)
        return not t.is_floating_point() or bool(torch.isfinite(t).all())
    if isinstance(state, dict):
        return all(is_finite_state(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(is_finite_state(v) for v in state)
    return True


class CheckpointStore:
    """The checkpoints of the run in ``out``; the methods that write run on rank 0 (``main``) only,
    except ``save_sharded`` and ``newest_intact`` of a sharded store, which every rank calls."""

    def __init__(self, out: Path, *, sharded: bool, main: bool = True):
        self.out, self.folder, self.sharded, self.main = out, out / "checkpoints", sharded, main
        self.manifest = out / MANIFEST
        listed = self._read_manifest()
        # This store's kind (a DCP folder's name has no suffix); the other kind's only to refuse them.
        self.entries = [e for e in listed if e["name"].endswith(".pt") != sharded]
        self._listed_other = [e["name"] for e in listed if e["name"].endswith(".pt") == sharded]

    # ----------------------------------------------------------------- the manifest
    def _read_manifest(self) -> list[dict]:
        if not self.manifest.exists():
            return []
        try:
            entries = json.loads(self.manifest.read_text())["checkpoints"]
            if not isinstance(entries, list) or not all(isinstance(e, dict) and "name" in e for e in entries):
                raise ValueError("'checkpoints' is not a list of entries")
            return entries
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise RunFolderError(f"{self.manifest} is damaged ({err}): the run's checkpoints cannot be verified; "
                                 f"move it away to resume without verification at your own risk") from None

    def _write_manifest(self) -> None:
        body = json.dumps({"format": 1, "checkpoints": self.entries}, indent=1).encode()
        write_atomically(self.manifest, lambda f: f.write(body))

    def _record(self, entry: dict, keep: int) -> None:
        """List ``entry`` (replacing one of the same name), then prune this run's oldest beyond ``keep``:
        the manifest first, so a kill between the two leaves unlisted files, never listed missing ones."""
        entries = sorted([e for e in self.entries if e["name"] != entry["name"]] + [entry], key=lambda e: e["step"])
        self.entries, pruned = entries[-keep:], entries[:-keep]
        self._write_manifest()
        for old in pruned:
            path = self.folder / old["name"]
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    # ----------------------------------------------------------------- housekeeping
    def holds_run(self) -> bool:
        """Whether ``out`` already holds a run (its manifest, checkpoints or metrics)."""
        return (self.manifest.exists() or (self.out / "metrics.jsonl").exists()
                or (self.folder.is_dir() and any(self.folder.iterdir())))

    def clean_temporaries(self) -> list[Path]:
        """Remove what killed saves left behind (temporary files and folders); the paths removed."""
        stale = [p for p in (*self.folder.glob(".step-*"), *self.out.glob(f".{MANIFEST}.tmp-*")) if ".tmp" in p.name]
        for p in stale:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        return stale

    def other_kind(self) -> list[str]:
        """Checkpoints of the other kind than this store's (sharded vs single-process), by name."""
        found = checkpoint_paths(self.out) if self.sharded else sharded_checkpoint_paths(self.out)
        return sorted(set(self._listed_other) | {p.name for p in found})

    # ----------------------------------------------------------------- saving
    def save(self, step: int, payload: dict, keep: int) -> Path:
        """One process: ``payload`` to step-N.pt atomically, then its entry; returns the path."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step-{step:08d}.pt"
        write_atomically(path, lambda f: torch.save(payload, f))
        self._record({"name": path.name, "step": step, **file_digest(path)}, keep)
        return path

    def save_sharded(self, step: int, model, optimizer, extra: dict, keep: int, barrier: Callable) -> Path:
        """Every rank writes its shards (dist.save_checkpoint, with its own manifest); rank 0 lists it."""
        path = self.folder / f"step-{step:08d}"
        if self.main and path.exists():  # an unlisted leftover of this run (its entry never written): redo it
            shutil.rmtree(path)
        barrier()
        dist.save_checkpoint(path, model, optimizer, extra=extra)
        if self.main:
            self._record({"name": path.name, "step": step}, keep)
        barrier()
        return path

    # ----------------------------------------------------------------- resuming
    def _problem(self, entry: dict) -> Optional[str]:
        path = self.folder / entry["name"]
        if not path.is_file():
            return "missing"
        if path.stat().st_size != entry.get("bytes"):
            size = path.stat().st_size
            return "empty" if size == 0 else f"{size} bytes, checkpoints.json says {entry.get('bytes')} (truncated)"
        if file_digest(path)["sha256"] != entry.get("sha256"):
            return "its SHA-256 differs from checkpoints.json's (the file is corrupted)"
        return None

    def unlisted(self) -> list[Path]:
        """Checkpoint files or folders of this kind on disk that the manifest does not list."""
        names = {e["name"] for e in self.entries}
        found = sharded_checkpoint_paths(self.out) if self.sharded else checkpoint_paths(self.out)
        return [p for p in found if p.name not in names]

    def newest_intact(self, load: Callable[[Path], dict], say: Callable[[str], None]) -> Optional[tuple[dict, Path]]:
        """``(load(path), path)`` for the newest listed checkpoint that verifies and loads; None when the run
        has none at all.  Every skipped one is reported with ``say``; RunFolderError when none is intact."""
        problems = [f"{p}: not listed in {self.manifest} (its save was interrupted before its checksum was "
                    f"recorded)" for p in self.unlisted()]
        for line in problems:
            say(f"--resume: skipping {line}")
        for entry in reversed(self.entries):
            path = self.folder / entry["name"]
            why = self._verify(entry)
            if why is None:
                try:
                    return load(path), path
                except Exception as err:  # noqa: BLE001 - any failure to read it makes it not intact
                    why = f"cannot be loaded ({type(err).__name__}: {err})"
            problems.append(f"{path}: {why}")
            say(f"--resume: skipping {path}: {why}")
        if problems:
            raise RunFolderError("--resume: no intact checkpoint in " + f"{self.folder}: " + "; ".join(problems))
        return None

    def _verify(self, entry: dict) -> Optional[str]:
        if not self.sharded:
            return self._problem(entry)
        problems = dist.checkpoint.verify_checkpoint(self.folder / entry["name"], require=(EXTRA,))
        return "; ".join(problems) if problems else None
