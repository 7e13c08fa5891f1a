"""Hugging Face: OPT checkpoints in and out, and our kernels inside a ``transformers`` OPT model.

- ``opt_core.hf.checkpoint``: state-dict conversion both ways and local folders in and out
  (``load_pretrained``, ``save_pretrained``, ``from_hf_state_dict``, ...); imports no ``transformers``.
- ``opt_core.hf.patch``: ``patch_opt`` puts our attention, LayerNorm and ReLU-MLP kernels into a
  ``transformers`` OPT model (or into every one built from then on), ``register_attention`` makes
  ``attn_implementation="opt_core"`` available.  It imports ``transformers``, so it is loaded on
  first use of those names (PEP 562): ``import opt_core.hf`` stays free of it.
"""

from __future__ import annotations

import importlib

from opt_core.hf.checkpoint import (
    WEIGHT_FILES,
    check_hf_state_dict,
    from_hf_state_dict,
    hf_tensor_shapes,
    load_pretrained,
    read_hf_config,
    read_hf_weights,
    save_pretrained,
    to_hf_state_dict,
)

_PATCH_EXPORTS = ("ATTENTION_NAME", "PatchReport", "patch_opt", "register_attention")

__all__ = ["WEIGHT_FILES", "check_hf_state_dict", "from_hf_state_dict", "hf_tensor_shapes", "load_pretrained",
           "read_hf_config", "read_hf_weights", "save_pretrained", "to_hf_state_dict", *_PATCH_EXPORTS]


def __getattr__(name: str):
    if name not in _PATCH_EXPORTS:
        raise AttributeError(f"module 'opt_core.hf' has no attribute {name!r}")
    value = getattr(importlib.import_module("opt_core.hf.patch"), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PATCH_EXPORTS))
