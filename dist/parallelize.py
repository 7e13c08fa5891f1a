"""``parallelize(model, mesh)``: tensor parallel over "tp", then FSDP2 over "dp".

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every parameter's
dim 0 over "dp" on top of its tp placement (a (Shard(0), Shard(0)) parameter
becomes a strided 2-D shard; uneven sizes are allowed).  One FSDP unit per
decoder layer plus the root (embeddings, positions, final LayerNorm, tied LM
head).  Mixed precision is FSDP's: parameters stay sharded in their stored
dtype (fp32: the optimizer's master copy), each unit is all-gathered in
``param_dtype`` for its forward and backward, and gradients are reduce-
scattered in ``reduce_dtype`` (fp32).

Overlap: each layer prefetches the next layer's all-gather in the forward and
the previous layer's in the backward (explicit, so the schedule does not
depend on the CPU running ahead), and FSDP's reduce-scatters run on their own
stream while the backward continues.  The root and the last layer are not
resharded after the forward: the backward starts with them, so freeing them
would only mean gathering them again at once.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as c10d
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from opt_core.dist.mesh import RankCoordinates
from opt_core.dist.tensor_parallel import TensorParallelism, apply_tensor_parallel, check_tp_layout
from opt_core.model import OPTForCausalLM


def check_same_weights(model: torch.nn.Module) -> None:
    """ValueError unless every rank holds the same full weights (a cheap fingerprint, compared over the world).

    Sharding keeps each rank's own slice without communication, so ranks built
    from different seeds would silently train a model no rank ever built.
    """
    if c10d.get_world_size() == 1:
        return
    total = torch.zeros(2, dtype=torch.float64)
    for i, p in enumerate(model.parameters()):
        if p.is_meta:
            return  # nothing to compare: the weights come later (a checkpoint load)
        t = p.detach().double()
        total[0] += t.sum().cpu()
        total[1] += (t.abs().sum() * (1 + i % 7)).cpu()  # position-weighted: swapped tensors differ too
    device = next(model.parameters()).device
    lo, hi = total.to(device), total.to(device).clone()
    c10d.all_reduce(lo, op=c10d.ReduceOp.MIN)
    c10d.all_reduce(hi, op=c10d.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise ValueError("the ranks hold different weights before sharding; build the model from the same seed "
                         "on every rank (torch.manual_seed before OPTForCausalLM(...)), or load a checkpoint after "
                         "dist.parallelize")


def parallelize(
    model: OPTForCausalLM,
    mesh: DeviceMesh,
    *,
    sequence_parallel: Optional[bool] = None,
    param_dtype: Optional[torch.dtype] = None,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
    check_weights: bool = True,
) -> OPTForCausalLM:
    """Shard ``model`` in place over ``mesh`` (from ``dist.init_mesh``) and return it.

    - tensor parallel over ``mesh["tp"]`` (see ``dist.tensor_parallel``),
      sequence parallel by default when tp > 1;
    - FSDP2 over ``mesh["dp"]``: one unit per decoder layer and the root,
      ``MixedPrecisionPolicy(param_dtype, reduce_dtype)`` (``param_dtype=None``
      computes in the parameters' own dtype), forward/backward prefetch.

    Bad layouts raise ``ValueError`` here, before any training step: heads,
    vocabulary or FFN width not divisible by tp; a mesh that is not the
    ("dp", "tp") mesh over the whole world.  Data: every tp rank of a dp group
    feeds the same rows; each dp rank its own slice of the global batch.
    """
    if not isinstance(model, OPTForCausalLM) or isinstance(model.parallelism, TensorParallelism):
        what = "already parallelized" if isinstance(model, OPTForCausalLM) else type(model).__name__
        raise TypeError(f"parallelize takes an opt_core.OPTForCausalLM, got {what}")
    coords = RankCoordinates.of(mesh)
    check_tp_layout(model.config, coords.tp)
    if check_weights:
        check_same_weights(model)
    if sequence_parallel is None:
        sequence_parallel = coords.tp > 1

    apply_tensor_parallel(model, coords, sequence_parallel)

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    layers = list(model.decoder.layers)
    for i, layer in enumerate(layers):
        last = i == len(layers) - 1
        fully_shard(layer, mesh=coords.dp_mesh, mp_policy=policy,
                    reshard_after_forward=reshard_after_forward and not last)
    fully_shard(model, mesh=coords.dp_mesh, mp_policy=policy, reshard_after_forward=False)
    for i, layer in enumerate(layers):
        if i + 1 < len(layers):
            layer.set_modules_to_forward_prefetch([layers[i + 1]])
        if i > 0:
            layer.set_modules_to_backward_prefetch([layers[i - 1]])
    return model
