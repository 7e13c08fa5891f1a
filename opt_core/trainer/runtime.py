"""Where a run executes: the device and dtype, one process or one rank of a dp x tp job, RNG states."""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import os
import random
from typing import Any

import numpy as np
import torch

from opt_core import dist

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device_dtype(args) -> tuple[torch.device, torch.dtype]:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, DTYPES[args.dtype]


def wants_distributed(args) -> bool:
    """Launched by torchrun, or asked for a layout: the dist path (sharded model and checkpoints)."""
    return "WORLD_SIZE" in os.environ or args.dp is not None or args.tp is not None


def launched_rank() -> int:
    """This process's global rank as torchrun set it (0 for a plain process), before any process group."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's index on its node (torchrun's LOCAL_RANK; 0 for a plain process)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def keep_freed_memory_on_cpu() -> None:
    """Tell glibc's malloc to keep freed memory instead of unmapping it.

    By default every allocation of 32 MiB or more is its own mmap, returned to the kernel when freed,
    so each training step page-faults its large activations in again (measured: about 10% of a step of
    the tiny preset).  The process's footprint then stays at its peak, which a training run reaches
    every step anyway.  A no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameters from <malloc.h>
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**30)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak: CUDA memory allocated on a GPU, the resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@dataclasses.dataclass
class Runtime:
    """One process, or one rank of a dp x tp job (every rank runs the same loop on its own rows)."""

    device: torch.device
    distributed: bool = False
    coords: Any = None  # dist.RankCoordinates
    owns_process_group: bool = False
    timeout_s: float = 0.0

    @classmethod
    def start(cls, args, device: torch.device) -> "Runtime":
        """The process group (when asked for) with ``--timeout`` on every collective, so a stalled
        rank fails the job instead of blocking the others for torch's default 30 minutes."""
        if not wants_distributed(args):
            return cls(device=device)
        import torch.distributed as c10d

        owns = not c10d.is_initialized()
        mesh = dist.init_mesh(dp=args.dp, tp=args.tp or 1, device_type=device.type,
                              timeout=datetime.timedelta(seconds=args.timeout))
        coords = dist.RankCoordinates.of(mesh)
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        rt = cls(device=device, distributed=True, coords=coords, owns_process_group=owns, timeout_s=args.timeout)
        if args.batch_size % coords.dp:
            rt.close()
            raise ValueError(f"--batch-size {args.batch_size} (the global batch) is not divisible by dp={coords.dp}")
        return rt

    @property
    def rank(self) -> int:
        return torch.distributed.get_rank() if self.distributed else 0

    @property
    def world(self) -> int:
        return torch.distributed.get_world_size() if self.distributed else 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def say(self, *args, **kwargs) -> None:
        """print, on rank 0 only."""
        if self.main:
            print(*args, **kwargs)

    def broadcast(self, value):
        """Rank 0's ``value`` (any picklable object), on every rank."""
        if not self.distributed:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def rows(self, block: torch.Tensor) -> torch.Tensor:
        """This dp rank's contiguous slice of a global batch."""
        if not self.distributed or self.coords.dp == 1:
            return block
        return block.view(self.coords.dp, -1, *block.shape[1:])[self.coords.dp_rank]

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def max(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=dist.mesh.object_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t)

    def all_true(self, flag: bool) -> bool:
        """``flag`` on every rank (the same answer everywhere)."""
        if not self.distributed:
            return flag
        t = torch.tensor([0.0 if flag else 1.0], device=dist.mesh.object_device())
        torch.distributed.all_reduce(t)
        return float(t) == 0.0

    def gather(self, value: float) -> list[float]:
        if not self.distributed:
            return [value]
        device = dist.mesh.object_device()
        out = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(self.world)]
        torch.distributed.all_gather(out, torch.tensor([value], dtype=torch.float64, device=device))
        return [float(t) for t in out]

    def close(self) -> None:
        if self.distributed and self.owns_process_group and torch.distributed.is_initialized():
            # Every rank done with its last collective before any rank tears its sockets down: a gloo
            # peer closing under another's pending receive aborts that process at exit.
            torch.distributed.barrier()
            dist.destroy_process_groups()

    def abandon(self) -> None:
        """Tear the process group down without waiting for the other ranks (one of them stalled)."""
        if self.distributed and self.owns_process_group and torch.distributed.is_initialized():
            dist.destroy_process_groups()
