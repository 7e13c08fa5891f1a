"""Durable file writes, shared by the checkpoint writers (the trainer's, Hugging Face folders)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to the disk: a rename is durable only once the data it
    points at and the directory entry are there."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
