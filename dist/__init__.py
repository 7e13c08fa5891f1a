"""The sharding layer on torch.distributed: a 2-D ("dp", "tp") DeviceMesh, Megatron tensor parallelism
with sequence parallelism, vocabulary-parallel embedding and cross entropy, FSDP2 over "dp", and sharded
checkpoints through torch.distributed.checkpoint that reshard between layouts.

    mesh = dist.init_mesh(dp=2, tp=4)              # under torchrun; a world of one without it
    model = dist.parallelize(OPTForCausalLM(config, device="meta", init=False), mesh,
                             param_dtype=torch.bfloat16)
    model.to_empty(device="cuda")
    dist.init_weights(model)                       # = OPTForCausalLM.init_weights, shard by shard
    optimizer = opt_core.FusedAdamW(model.parameters(), ...)
    dist.save_checkpoint(path, model, optimizer)   # any layout ...
    dist.load_checkpoint(path, model, optimizer)   # ... loads at any other (or into a plain model)

One module per job: ``mesh`` (the mesh and this rank's ``RankCoordinates``), ``collectives`` (Megatron's
mappings as autograd functions), ``vocab_parallel`` (embedding lookup and cross entropy over a split
vocabulary), ``tensor_parallel`` (the parameter placements and the ``TensorParallelism`` seams the model's
modules consult), ``parallelize`` (TP + FSDP2), ``init`` (sharded initialisation of a meta-built model),
``checkpoint`` (DCP save/load).  The decisions behind them, at more length: docs/dist.md.

- Parameters keep the single-process model's names and GLOBAL shapes as DTensors (tp placement, FSDP2's
  dp shard on top): a state dict means the same tensors at every layout, so DCP reshards for free.
- The model has one forward; tensor parallelism enters at its seams (``opt_core.parallelism.Parallelism``)
  with explicit collectives and our kernels on the local shards, not through DTensor ops.
- Sequence-parallel activations are (tokens, features) rows split into equal contiguous dim-0 blocks; the
  token count is padded to a multiple of tp.  Replicated parameters used there get their gradients
  summed over tp in the backward (fp32 for low-precision gradients).
- The loss is the mean over the global batch's target tokens, the same on every rank.
- Dropout seeds come from torch's generator in the same order on every rank, offset by rank where the
  data is rank-local.
- FSDP2: one unit per decoder layer plus the root, explicit prefetch, parameters sharded in fp32 (the
  optimizer's master copy), compute in ``param_dtype``, gradient reduction in fp32.
"""

from opt_core.dist.checkpoint import load_checkpoint, save_checkpoint
from opt_core.dist.init import init_weights
from opt_core.dist.mesh import RankCoordinates, destroy_process_groups, init_mesh
from opt_core.dist.parallelize import parallelize
from opt_core.dist.tensor_parallel import TensorParallelism, check_tp_layout

__all__ = ["RankCoordinates", "TensorParallelism", "check_tp_layout", "destroy_process_groups", "init_mesh",
           "init_weights", "load_checkpoint", "parallelize", "save_checkpoint"]
