"""Dropout seeds drawn without a host sync or a graph break."""

from __future__ import annotations

import torch

# Drawn seeds stay below 2**62, so a rank offset added under tensor parallelism keeps them in the
# ops' [0, 2**63).
SEED_DRAW_LIMIT = 2**62


@torch.library.custom_op("opt_core::seed_value", mutates_args=())
def seed_value(seed: torch.Tensor) -> int:
    """The int in a 0-dim int64 CPU tensor, as an op: under ``torch.compile`` it is a symbolic int, so a seed
    drawn with ``torch.randint`` reaches ``attention(seed=...)`` without the graph break an ``.item()`` is.
    Reading a CPU tensor never waits for a GPU."""
    return int(seed)


@seed_value.register_fake
def _(seed):
    return torch.library.get_ctx().new_dynamic_size(min=0, max=SEED_DRAW_LIMIT - 1)


def draw_seed():
    """A dropout seed from torch's CPU generator (``torch.manual_seed`` reproduces it), as an int (a
    symbolic one under ``torch.compile``)."""
    return seed_value(torch.randint(0, SEED_DRAW_LIMIT, (), dtype=torch.int64))
