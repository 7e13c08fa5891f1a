"""opt-core: a thin OPT model and the drop-in layers a trainer touches."""

from opt_core.layers import FusedLayerNorm

__all__ = ["FusedLayerNorm"]
