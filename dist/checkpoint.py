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
overwritten.
"""

from __future__ import annotations

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
    if process_group.rank() == 0:
        os.replace(tmp, path)
    _barrier()
    return path


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module,
                    optimizer: Optional[torch.optim.Optimizer] = None) -> tuple[Optional[dict], Optional[dict]]:
    """Load the folder ``path`` into ``model`` (and ``optimizer``), whatever layout wrote it.

    ``model`` is a parallelized model at any layout, or a plain
    OPTForCausalLM in a process without a process group.  Returns
    ``(extra, rank_state)``: rank_state is this rank's own, or None when the
    checkpoint was written by fewer ranks.
    """
    path = Path(path)
    if not is_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {METADATA})")
    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    extra_path, rank_path = path / EXTRA, path / f"rank-{process_group.rank()}.pt"
    extra = torch.load(extra_path, weights_only=False) if extra_path.exists() else None
    rank_state = torch.load(rank_path, weights_only=False) if rank_path.exists() else None
    return extra, rank_state
