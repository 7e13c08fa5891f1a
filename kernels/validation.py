"""Input checks every public op runs before it launches anything.

They raise ``TypeError`` / ``ValueError`` naming the argument, what was expected
and what came: never ``assert`` (``python -O`` strips it).
"""

from __future__ import annotations

from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    t: object,
    *,
    dtypes: Iterable[torch.dtype] = FLOAT_DTYPES,
    min_ndim: int = 0,
) -> torch.Tensor:
    """``t`` is a tensor of one of ``dtypes`` with at least ``min_ndim`` dims."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dtypes = tuple(dtypes)
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in ({_names(dtypes)}), got {t.dtype}")
    if t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")
    return t


def check_same_device(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != reference.device:
            raise ValueError(f"{name} is on {t.device} but {reference_name} is on {reference.device}")


def check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_float(name: str, value: object, *, min_value: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if min_value is not None and value < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {value}")
    return value


def check_positive_int(name: str, value: object) -> int:
    """``value`` is an int (a bool is not) >= 1: a size, a head count, a mesh dimension."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_dropout(name: str, value: object) -> float:
    """``value`` is a dropout probability: a float (an int is fine, a bool is not) in [0, 1)."""
    value = check_float(name, value, min_value=0.0)
    if value >= 1.0:
        raise ValueError(f"{name} must be < 1, got {value}")
    return value


# Dropout seeds are 64-bit Philox keys that travel as int64: every op takes them in [0, 2**63).
_SEED_BITS = 63
SEED_LIMIT = 2**_SEED_BITS


def check_seed(name: str, seed: object) -> int:
    """``seed`` is an int (a bool is not) in [0, SEED_LIMIT)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{name} must be an int, got {type(seed).__name__}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{name} must be in [0, 2**{_SEED_BITS}), got {seed}")
    return seed
