"""Metrics and logging: metrics.jsonl / metrics.csv row by row, and the terminal's progress bar or lines."""

from __future__ import annotations

import csv
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch


class MetricsLog:
    """metrics.jsonl and metrics.csv, appended row by row (rows past a resumed step are dropped first)."""

    # tokens_per_s: all ranks together; tflops and mfu: per device; peak_mem_gib: the largest rank's,
    # mem_gib_by_rank: every rank's (space-separated, rank order).
    FIELDS = ["step", "tokens", "loss", "val_loss", "val_ppl", "lr", "grad_norm", "loss_scale", "skipped",
              "tokens_per_s", "tflops", "mfu", "seconds", "peak_mem_gib", "mem_gib_by_rank"]

    def __init__(self, out: Path, resume_step: Optional[int], write: bool = True):
        self.jsonl, self.csv = out / "metrics.jsonl", out / "metrics.csv"
        self.write = write  # rank 0 writes; the other ranks of a distributed run only keep the rows
        rows = []
        if resume_step is not None and self.jsonl.exists():
            rows = [r for r in read_rows(self.jsonl) if r["step"] <= resume_step]
        self.rows = rows
        if not write:
            return
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with open(self.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.FIELDS)
            w.writeheader()
            w.writerows(rows)

    def add(self, **row: Any) -> None:
        row = {k: row.get(k) for k in self.FIELDS}
        self.rows.append(row)
        if not self.write:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.csv, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.FIELDS).writerow(row)

    def last(self, field: str) -> Any:
        """The newest row's value of ``field`` that is not None (None when no row has one)."""
        return next((r[field] for r in reversed(self.rows) if r.get(field) is not None), None)

    def first(self, field: str) -> Any:
        return next((r[field] for r in self.rows if r.get(field) is not None), None)


def read_rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl.  A torn last line (a run killed mid-write) is dropped with a warning;
    a bad line before it is damage, reported with its line number."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(f"{path}:{number} is not a JSON row (the file is damaged)") from None
            warnings.warn(f"{path}:{number}: dropping a torn last line (the run was killed while writing it)",
                          stacklevel=2)
    return rows


def step_line(row: dict, distributed_ranks: int) -> str:
    """One training row as the terminal shows it."""
    parts = [f"step {row['step']:6d}", f"loss {row['loss']:.3f}", f"lr {row['lr']:.2e}"]
    if row["grad_norm"] is not None:
        parts.append(f"gnorm {row['grad_norm']:.2f}")
    if row["loss_scale"] is not None:
        parts.append(f"scale {row['loss_scale']:g}")
    parts.append(f"{row['tokens_per_s']:,.0f} tok/s" + (f" (all {distributed_ranks} ranks)" if distributed_ranks else ""))
    parts.append(f"{row['tflops']:.3f} TFLOP/s" + ("/GPU" if distributed_ranks else ""))
    if row["mfu"] is not None:
        parts.append(f"MFU {100 * row['mfu']:.1f}%")
    if distributed_ranks:
        parts.append(f"peak mem GiB by rank {row['mem_gib_by_rank']}")
    return " | ".join(parts)


class TrainingClock:
    """Seconds and tokens of training since the last ``lap``, evaluation and checkpoint time left out
    (``pause`` before them, ``resume`` after); on a GPU each reading waits for the queued work."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds, self.tokens, self.since = 0.0, 0, time.perf_counter()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def pause(self) -> None:
        self.seconds += self._now() - self.since

    def resume(self) -> None:
        self.since = self._now()

    def lap(self) -> tuple[float, int]:
        """(seconds, tokens) of the window that ends now; a new window starts."""
        self.pause()
        window = (self.seconds, self.tokens)
        self.seconds, self.tokens = 0.0, 0
        self.resume()
        return window


class Progress:
    """A tqdm bar with the latest metrics when attached to a terminal; plain log lines otherwise."""

    def __init__(self, total: int, start: int, enabled: bool = True):
        self.bar = None
        self.enabled = enabled  # False on the ranks of a distributed run other than 0
        if enabled and sys.stdout.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
            except ImportError:
                pass

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def metrics(self, line: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(line.split(" | ", 1)[1])
        elif self.enabled:
            print(line)

    def write(self, line: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
