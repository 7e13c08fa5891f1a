"""The 2-D device mesh ("dp", "tp") that every other piece of ``dist`` works on.

``init_mesh(dp=..., tp=...)`` reads what ``torchrun`` puts in the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``),
starts the default process group if nobody has (NCCL for CUDA tensors with gloo
beside it for CPU-side objects, gloo alone on a CPU machine) and returns
``init_device_mesh(device, (dp, tp), mesh_dim_names=("dp", "tp"))``.  A plain
``python`` process (no ``torchrun``) gets a world of one on an in-memory store,
so the same code runs unlaunched.

Rank order: ``tp`` is the inner (fastest-varying) dimension, so the ranks of a
tensor-parallel group are consecutive and, with ``--nproc-per-node`` a
multiple of ``tp``, on one node: TP's per-layer collectives stay on NVLink
while FSDP's larger, overlappable ones cross the network.
"""

from __future__ import annotations

import datetime
import gc
import os
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as c10d
# Its signatures default to ``group=dist.group.WORLD``, which Python evaluates once, at import: imported after
# the default group exists (torch._dynamo imports it, and so does the first functional collective, DTensor's
# redistribute among them), it would keep that group alive past ``destroy_process_group`` (see
# destroy_process_groups).  Imported here, before init_mesh starts a group, its defaults are None.
import torch.distributed.nn.functional  # noqa: F401
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from opt_core.kernels.validation import check_positive_int

MESH_DIM_NAMES = ("dp", "tp")


def default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# The root meshes init_mesh built, whose process groups destroy_process_groups lets go of; keyed by id, since
# meshes over the same ranks compare (and hash) equal, so a WeakSet would keep only the first of them.
_MESHES: "weakref.WeakValueDictionary[int, DeviceMesh]" = weakref.WeakValueDictionary()


def init_mesh(dp: Optional[int] = None, tp: int = 1, *, device_type: Optional[str] = None,
              timeout: Optional[datetime.timedelta] = None) -> DeviceMesh:
    """A ``("dp", "tp")`` DeviceMesh over every process of this job.

    ``dp`` defaults to ``world_size // tp``.  Raises ``ValueError`` at once when
    ``dp * tp`` is not the world size (the job was launched with the wrong
    ``--nproc-per-node`` / ``--nnodes``), before any collective could hang.
    ``timeout`` bounds every collective of the process group it starts (torch's
    default: 30 minutes), so a stalled rank fails the others with an error; a
    process group that already exists keeps its own.
    """
    tp = check_positive_int("tp", tp)
    if timeout is not None and (not isinstance(timeout, datetime.timedelta) or timeout.total_seconds() <= 0):
        raise ValueError(f"timeout must be a positive datetime.timedelta or None, got {timeout!r}")
    if dp is not None:
        dp = check_positive_int("dp", dp)
    device_type = device_type or default_device_type()
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")

    if c10d.is_initialized():
        world = c10d.get_world_size()
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    if dp is None:
        if world % tp:
            raise ValueError(f"world size {world} is not divisible by tp={tp}; launch dp x tp processes")
        dp = world // tp
    if dp * tp != world:
        raise ValueError(f"world size {world} != dp x tp = {dp} x {tp} = {dp * tp}; launch exactly dp x tp "
                         f"processes (torchrun --nnodes N --nproc-per-node P with N x P = {dp * tp})")

    if device_type == "cuda":
        # Before the process group exists, so NCCL binds each rank to its own GPU.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not c10d.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
        options = {"timeout": timeout} if timeout is not None else {}
        if "RANK" in os.environ or "MASTER_ADDR" in os.environ:
            c10d.init_process_group(backend, **options)  # env:// from torchrun
        else:
            c10d.init_process_group(backend, store=c10d.HashStore(), rank=0, world_size=1, **options)
    mesh = init_device_mesh(device_type, (dp, tp), mesh_dim_names=MESH_DIM_NAMES)
    _MESHES[id(mesh)] = mesh
    return mesh


def destroy_process_groups() -> None:
    """``torch.distributed.destroy_process_group()``, made to free the groups.  A DeviceMesh keeps its
    process groups (the root mesh's ``_pg_registry``), and torch keeps meshes past any use of them: DTensor's
    sharding and redistribution caches and every DTensor parameter still alive hold one.  So the backends
    would outlive a plain destroy and their gloo threads run into interpreter shutdown, where a rank can
    abort ("terminate called without an active exception") after a finished run.  Emptying the registry of
    every mesh ``init_mesh`` built drops those references whoever holds the mesh.  A no-op without a
    process group."""
    if not c10d.is_initialized():
        return
    c10d.destroy_process_group()
    for mesh in list(_MESHES.values()):
        mesh._pg_registry.clear()  # private, present in torch 2.11 to 2.13; the mesh is unusable now anyway
    # What else held the groups (a model's FSDP and TP states) sits in reference cycles once dropped: collect
    # now, so the backends' threads are joined here and not somewhere in interpreter shutdown.
    gc.collect()


def object_device() -> torch.device:
    """Where small control tensors (flags, timings) go for a collective on the default group: the CPU
    (gloo, also beside NCCL as init_mesh sets it up), or this rank's GPU when the group is NCCL only."""
    if c10d.is_initialized() and str(c10d.get_backend()) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_mesh(mesh: DeviceMesh) -> None:
    """``mesh`` must be the 2-D ("dp", "tp") mesh over the whole world that ``init_mesh`` builds."""
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a DeviceMesh (from dist.init_mesh), got {type(mesh).__name__}")
    if tuple(mesh.mesh_dim_names or ()) != MESH_DIM_NAMES:
        raise ValueError(f"mesh must have dimensions named {MESH_DIM_NAMES}, got {mesh.mesh_dim_names}")
    if mesh.size() != c10d.get_world_size():
        raise ValueError(f"mesh covers {mesh.size()} ranks but the world has {c10d.get_world_size()}; "
                         "dist.parallelize needs a mesh over every process")


@dataclass(frozen=True)
class RankCoordinates:
    """Where this rank sits in the mesh: the dp and tp sizes, its coordinate on each, and the process
    groups the collectives of each dimension use."""

    mesh: DeviceMesh
    dp: int
    tp: int
    dp_rank: int
    tp_rank: int
    dp_group: c10d.ProcessGroup
    tp_group: c10d.ProcessGroup

    @classmethod
    def of(cls, mesh: DeviceMesh) -> "RankCoordinates":
        check_mesh(mesh)
        dp_mesh, tp_mesh = mesh["dp"], mesh["tp"]
        return cls(mesh=mesh, dp=dp_mesh.size(), tp=tp_mesh.size(), dp_rank=dp_mesh.get_local_rank(),
                   tp_rank=tp_mesh.get_local_rank(), dp_group=dp_mesh.get_group(), tp_group=tp_mesh.get_group())

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self.mesh["tp"]

    @property
    def dp_mesh(self) -> DeviceMesh:
        return self.mesh["dp"]
