"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP): save at one layout, load at another.

Every rank writes its own shards (no gather on one rank); a checkpoint is a
folder.  The model and optimizer state dicts are keyed by parameter name with
GLOBAL shapes (``get_model_state_dict`` / ``get_optimizer_state_dict``): a
parallelized model's DTensor shards and a plain model's full tensors describe
the same global tensors, so DCP reshards at load time between any two layouts,
dp2 x tp2 -> dp4, -> tp4, or -> one process with an ordinary OPTForCausalLM.

Beside the shards, ``extra.pt`` (written by rank 0) holds small Python state
that is the same on every rank (step counters, LR schedule, loss scaler, data
position), and ``rank-<r>.pt`` optional per-rank state (RNG).

Writing is atomic: the shards go to a hidden temporary folder that is renamed
to ``path`` only after every rank finished, so a killed save leaves no
half-written checkpoint under the final name; an existing checkpoint is never
overwritten.  The last file written before the rename is ``manifest.json``:
every other file's size and SHA-256 (each rank hashes a share of the files).
``load_checkpoint`` verifies it before it reads anything, so a flipped bit,
a truncated shard or a missing file is an error naming the file instead of
wrong weights or a half-loaded state; ``verify_checkpoint`` answers the same
question without loading.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as c10d
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from opt_core import process_group
from opt_core.dist.mesh import object_device

EXTRA = "extra.pt"
METADATA = ".metadata"  # DCP's index, written last by its coordinator
MANIFEST = "manifest.json"  # every other file's size and SHA-256, written last of all
_HASH_CHUNK = 2**22


def _barrier() -> None:
    if process_group.initialized():
        c10d.barrier()


def _state(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> dict[str, Any]:
    # Full names, global shapes; DTensor shards stay shards (no gather).
    options = StateDictOptions(full_state_dict=False)
    state: dict[str, Any] = {"model": get_model_state_dict(model, options=options)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer, options=options)
    return state


def is_checkpoint(path: str | os.PathLike) -> bool:
    """A complete checkpoint folder (DCP's index present)."""
    return (Path(path) / METADATA).is_file()


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    *, extra: Optional[dict] = None, rank_state: Optional[dict] = None) -> Path:
    """Write ``model`` (and ``optimizer``) shards to the folder ``path``; every rank calls it.

    ``extra`` (rank 0's copy is written) and ``rank_state`` (each rank's own)
    are small picklable dicts.  Raises ``FileExistsError`` if ``path`` exists.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    exists = torch.tensor([int(path.exists())], device=object_device())
    if process_group.initialized():  # the same decision on every rank, or some would wait in a barrier forever
        c10d.broadcast(exists, src=0)
    if exists.item():
        raise FileExistsError(f"checkpoint {path} already exists; not overwriting it")
    if process_group.rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # a save that was killed before its rename
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save(_state(model, optimizer), checkpoint_id=str(tmp))
    if rank_state is not None:
        torch.save(rank_state, tmp / f"rank-{process_group.rank()}.pt")
    if process_group.rank() == 0 and extra is not None:
        torch.save(extra, tmp / EXTRA)
    _barrier()
    _write_manifest(tmp)
    _barrier()
    if process_group.rank() == 0:
        os.replace(tmp, path)
    _barrier()
    return path


def file_digest(path: Path) -> dict[str, Any]:
    """{"bytes": size, "sha256": hex digest} of one file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _all_ranks(mine: list) -> list:
    """The concatenation of every rank's ``mine`` (rank order), on every rank."""
    if not process_group.initialized():
        return list(mine)
    gathered: list = [None] * process_group.world_size()
    c10d.all_gather_object(gathered, mine)
    return [item for part in gathered for item in part]


def _write_manifest(folder: Path) -> None:
    """Every rank hashes its share of the folder's files; rank 0 writes the manifest (atomically)."""
    names = [sorted(p.name for p in folder.iterdir())] if process_group.rank() == 0 else [None]
    if process_group.initialized():
        c10d.broadcast_object_list(names, src=0)
    share = names[0][process_group.rank()::process_group.world_size()]
    digests = dict(_all_ranks([(name, file_digest(folder / name)) for name in share]))
    if process_group.rank() == 0:
        tmp = folder / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps({"format": 1, "files": digests}, indent=1, sort_keys=True))
        os.replace(tmp, folder / MANIFEST)


def _file_problem(folder: Path, name: str, expected: dict) -> Optional[str]:
    path = folder / name
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    if size != expected["bytes"]:
        return f"{path}: {size} bytes, the manifest says {expected['bytes']} (truncated or overwritten)"
    if file_digest(path)["sha256"] != expected["sha256"]:
        return f"{path}: its SHA-256 differs from the manifest's (the file is corrupted)"
    return None


def _read_manifest(folder: Path) -> tuple[dict, Optional[str]]:
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        if not isinstance(files, dict):
            raise ValueError("'files' is not an object")
        return files, None
    except FileNotFoundError:
        return {}, f"{folder / MANIFEST}: missing (not a complete checkpoint)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return {}, f"{folder / MANIFEST}: unreadable ({err})"


def verify_checkpoint(path: str | os.PathLike, require: tuple[str, ...] = ()) -> list[str]:
    """What is wrong with the checkpoint folder ``path``, one line per bad file naming it and why (empty
    when every file its manifest lists is there with its size and SHA-256, and every name in ``require``
    is listed).  Under a process group every rank calls it (each checks a share) and gets the same list."""
    folder = Path(path)
    files, problem = _read_manifest(folder)
    mine = [problem] if problem and process_group.rank() == 0 else []
    mine += [f"{folder / name}: not in the checkpoint (its manifest does not list it)"
             for name in require if not problem and name not in files and process_group.rank() == 0]
    names = sorted(files)[process_group.rank()::process_group.world_size()]
    mine += [p for p in (_file_problem(folder, name, files[name]) for name in names) if p]
    return _all_ranks(mine)


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    *, verify: bool = True) -> tuple[Optional[dict], Optional[dict]]:
    """Load the folder ``path`` into ``model`` (and ``optimizer``), whatever layout wrote it.

    ``model`` is a parallelized model at any layout, or a plain
    OPTForCausalLM in a process without a process group.  The files are
    verified against the manifest first (ValueError naming each bad one, before
    anything is loaded; ``verify=False`` when the caller just ran
    ``verify_checkpoint``).  Returns
    ``(extra, rank_state)``: rank_state is this rank's own, or None when the
    checkpoint was written by fewer ranks.
    """
    path = Path(path)
    if not is_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {METADATA})")
    problems = verify_checkpoint(path) if verify else []
    if problems:
        raise ValueError(f"checkpoint {path} is damaged; nothing was loaded: " + "; ".join(problems))
    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    extra_path, rank_path = path / EXTRA, path / f"rank-{process_group.rank()}.pt"
    extra = torch.load(extra_path, weights_only=False) if extra_path.exists() else None
    rank_state = torch.load(rank_path, weights_only=False) if rank_path.exists() else None
    return extra, rank_state
