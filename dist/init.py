"""Initialising a parallelized model whose full weights never exist on one device.

A model too large for one GPU is built on the meta device (no memory),
parallelized, given real (empty) shards with ``to_empty``, and initialised
here: ``init_weights(model)`` draws exactly the numbers
``OPTForCausalLM.init_weights`` would draw for the unsharded model, in the same
order from the same generator, one parameter at a time, and each rank keeps
its slice.  The sharded model is therefore the unsharded one, split, at any
layout and on any number of ranks (tests/test_dist.py checks it bit for bit).
The peak extra memory is one full parameter (the embedding: V x d).

The recipe (the paper's, metaseq's Megatron init) must stay the one in
``OPTForCausalLM.init_weights``; the test compares the two.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from opt_core.process_group import is_dtensor, local_tensor


def _fill(param: torch.Tensor, how: Callable[[torch.Tensor], None]) -> None:
    """Run ``how`` on a full-size tensor and keep this rank's slice of it in ``param``."""
    if not is_dtensor(param):
        how(param.data)
        return
    local = local_tensor(param)
    full = torch.empty(param.shape, dtype=param.dtype, device=local.device)
    how(full)
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    index = tuple(slice(o, o + n) for o, n in zip(offset, shape))
    local.copy_(full[index])


@torch.no_grad()
def init_weights(model, generator: Optional[torch.Generator] = None) -> None:
    """``OPTForCausalLM.init_weights(generator)`` for a (parallelized) model, shard by shard."""
    if model.lm_head.weight is not model.decoder.embed_tokens.weight:
        raise ValueError("lm_head.weight is no longer tied to decoder.embed_tokens.weight (a plain module's "
                         "to_empty unties them): re-tie it before init_weights")
    config = model.config
    std = config.init_std
    out_std = std / math.sqrt(2 * config.num_layers)
    dec = model.decoder

    def normal(s, zero_row=None):
        def how(t):
            t.normal_(0.0, s, generator=generator)
            if zero_row is not None:
                t[zero_row].zero_()
        return how

    def const(value):
        return lambda t: t.fill_(value)

    # The draws in init_weights' order: embeddings, positions, project_in/out, then per layer qkv, out_proj,
    # fc1, fc2.  Zeroed rows and constants draw nothing.
    _fill(dec.embed_tokens.weight, normal(std, config.pad_token_id))
    _fill(dec.embed_positions.weight, normal(std, 1))
    for proj in (dec.project_in, dec.project_out):
        if proj is not None:
            _fill(proj.weight, normal(std))
    for layer in dec.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _fill(attn.qkv_proj.weight, normal(std))
        _fill(attn.out_proj.weight, normal(out_std))
        _fill(mlp.fc1.weight, normal(std))
        _fill(mlp.fc2.weight, normal(out_std))
        for linear in (attn.qkv_proj, attn.out_proj, mlp.fc1, mlp.fc2):
            _fill(linear.bias, const(0.0))
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            _fill(module.weight, const(1.0))
            _fill(module.bias, const(0.0))
