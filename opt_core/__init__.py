"""opt-core: Triton kernels for OPT-style training, a thin OPT model over them and the drop-in layers,
optimizer and loss scaler a trainer touches.

The classes below are imported on first use (PEP 562), so ``import opt_core.kernels`` or
``import opt_core.functional`` does not build the model stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from opt_core._checkout import put_checkout_root_last

# Before anything imports transformers, which imports the PyPI package `kernels` (see _checkout).
put_checkout_root_last()

# public name -> the module that defines it
_EXPORTS = {
    "DynamicLossScaler": "opt_core.amp",
    "OPTConfig": "opt_core.config",
    "FusedLayerNorm": "opt_core.layers",
    "FusedSelfAttention": "opt_core.layers",
    "ReLUMLP": "opt_core.layers",
    "OPTForCausalLM": "opt_core.model",
    "FusedAdamW": "opt_core.optim",
    "replace_layer_norms": "opt_core.replace",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from opt_core.amp import DynamicLossScaler
    from opt_core.config import OPTConfig
    from opt_core.layers import FusedLayerNorm, FusedSelfAttention, ReLUMLP
    from opt_core.model import OPTForCausalLM
    from opt_core.optim import FusedAdamW
    from opt_core.replace import replace_layer_norms


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'opt_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
