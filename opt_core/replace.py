"""``replace_layer_norms``: our LayerNorm kernels in any ``nn.Module`` (GPT-2, BLOOM, a user's own), in place.

    model = transformers.GPT2LMHeadModel(config)
    opt_core.replace_layer_norms(model)      # -> how many nn.LayerNorm became FusedLayerNorm

Only modules whose type is exactly ``nn.LayerNorm`` are replaced: a subclass may have its own
forward (an fp32-upcasting LayerNorm, say), which the kernel would silently drop.  The new module
takes over the old one's ``Parameter`` objects themselves, so their values, device, dtype,
``requires_grad``, sharing (tied weights) and any optimizer already holding them stay as they were.
"""

from __future__ import annotations

from torch import nn

from opt_core.layers import FusedLayerNorm


def fused_layer_norm_like(norm: nn.LayerNorm) -> FusedLayerNorm:
    """A ``FusedLayerNorm`` with ``norm``'s settings, mode and very parameters (affine or not, with or without bias)."""
    # Built on the meta device: its own parameters are placeholders, replaced at once by norm's.
    fused = FusedLayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                           bias=norm.bias is not None, device="meta")
    fused.weight, fused.bias = norm.weight, norm.bias
    return fused.train(norm.training)


def replace_layer_norms(module: nn.Module) -> int:
    """Swap every ``nn.LayerNorm`` inside ``module`` for a ``FusedLayerNorm`` in place; the number swapped.

    A LayerNorm reachable under several names (one module registered twice) becomes one FusedLayerNorm
    under all of them.  ``module`` itself cannot be replaced in place: pass its parent, or use
    ``fused_layer_norm_like``."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if type(module) is nn.LayerNorm:
        raise ValueError("module is itself an nn.LayerNorm, which cannot be replaced in place: pass the module "
                         "that holds it, or use fused_layer_norm_like(module)")
    fused: dict[int, FusedLayerNorm] = {}  # id of a replaced LayerNorm -> its replacement
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.LayerNorm:
                if id(child) not in fused:
                    fused[id(child)] = fused_layer_norm_like(child)
                setattr(parent, name, fused[id(child)])
    return len(fused)
