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

One module per job: ``mesh`` (the mesh and this rank's coordinates), ``collectives`` (Megatron's mappings
as autograd functions), ``vocab_parallel`` (embedding lookup and cross entropy over a split vocabulary),
``tensor_parallel`` (the parallel layer and model over our kernels), ``parallelize`` (TP + FSDP2),
``init`` (sharded initialisation of a meta-built model), ``checkpoint`` (DCP save/load).

Design record (newest last):
2026-11-29  Parameters keep the single-process model's names and GLOBAL shapes and become DTensors
            (tp placements, then FSDP2's dp shard on top), so a state dict means the same tensors at
            every layout and torch.distributed.checkpoint reshards for free.  The TP forward is ours
            (explicit collectives in autograd functions, our kernels on the local shards), not
            torch's parallelize_module: the fused ReLU-MLP and attention kernels take plain tensors.
2026-11-29  Sequence-parallel activations are 2-D (tokens, features) with the batch x sequence tokens
            split into equal contiguous blocks on dim 0: all-gather / reduce-scatter are contiguous
            dim-0 collectives with no re-layout copies, and any token count works (padded to a
            multiple of tp with pad tokens at the end, cut before attention and the LM head).
2026-11-29  Replicated parameters used in the SP region (LayerNorms, out_proj/fc2 biases, positions,
            project_in/out) sum their gradients over tp with an explicit all-reduce in the backward
            (fp32 for bf16/fp16 gradients), so the same code is right with and without FSDP.
2026-11-29  The loss is the mean over the global batch's target tokens (the token count all-reduced
            over dp): every rank reports the same loss, and the gradient is the global mean's even
            when dp ranks hold different numbers of target tokens; FSDP's own 1/dp averaging stays
            untouched (each rank back-propagates dp/count).
2026-11-29  Dropout seeds come from torch's generator in the same order on every rank (ranks stay in
            step; activation checkpointing replays them) and are offset by the global rank where the
            data is rank-local, so no two ranks share a mask for different data.
2026-11-29  FSDP2: one unit per decoder layer plus the root, explicit forward/backward prefetch of
            the neighbouring layer, the root and the last layer kept unsharded between forward and
            backward; parameters sharded in fp32 (the optimizer's master copy), compute in
            param_dtype, gradient reduction in fp32.
"""

from opt_core.dist.checkpoint import load_checkpoint, save_checkpoint
from opt_core.dist.init import init_weights
from opt_core.dist.mesh import Layout, init_mesh
from opt_core.dist.parallelize import parallelize
from opt_core.dist.tensor_parallel import ParallelOPTForCausalLM, check_tp_layout

__all__ = ["Layout", "ParallelOPTForCausalLM", "check_tp_layout", "init_mesh", "init_weights", "load_checkpoint",
           "parallelize", "save_checkpoint"]
