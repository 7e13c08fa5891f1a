"""opt-core: a thin OPT model and the drop-in layers a trainer touches."""

from opt_core.amp import DynamicLossScaler
from opt_core.config import OPTConfig
from opt_core.layers import FusedLayerNorm, FusedSelfAttention, ReLUMLP
from opt_core.model import OPTForCausalLM
from opt_core.optim import FusedAdamW

__all__ = ["DynamicLossScaler", "FusedAdamW", "FusedLayerNorm", "FusedSelfAttention", "OPTConfig",
           "OPTForCausalLM", "ReLUMLP"]
