"""What a single-process component (the optimizer, the loss scaler, the trainer, ``opt_core.dist``)
asks of torch.distributed, answered in one place: how many ranks there are, which one this is, and
the local shard of a DTensor.  Everything works, and answers as a world of one, in a torch built
without distributed support and in a process that never started a process group.
"""

from __future__ import annotations

from typing import Optional

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed
    DTensor = None


def initialized() -> bool:
    """A default process group exists."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def world_size(group: Optional[object] = None) -> int:
    """Ranks in ``group`` (the default group when None); 1 without a process group."""
    return torch.distributed.get_world_size(group) if initialized() else 1


def rank(group: Optional[object] = None) -> int:
    """This process's rank in ``group``; 0 without a process group."""
    return torch.distributed.get_rank(group) if initialized() else 0


def distributed() -> bool:
    """More than one rank: collectives are needed to agree on anything."""
    return world_size() > 1


def is_dtensor(t: object) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (what it holds, steps and unscales); any other tensor itself."""
    return t.to_local() if is_dtensor(t) else t
