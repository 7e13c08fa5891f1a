"""Triton kernels for OPT-style training: one module per op family.

Each op is a plain function backed by a ``torch.library`` custom op with its
autograd registered; ``kernels.dispatch`` decides whether a call runs the
Triton kernel (CUDA, or the CPU interpreter) or ``kernels.reference``.
"""

from kernels.adamw import adamw_step, grad_stats
from kernels.attention import attention
from kernels.layer_norm import layer_norm
from kernels.relu_mlp import relu_mlp

__all__ = ["adamw_step", "attention", "grad_stats", "layer_norm", "relu_mlp"]
