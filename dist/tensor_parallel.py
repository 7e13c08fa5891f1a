"""Megatron tensor parallelism (with sequence parallelism) for OPTForCausalLM, over our kernels.

Parameters keep the fully qualified names and GLOBAL shapes of the
single-process model and become DTensors on the mesh's "tp" dimension, so a
``state_dict`` is the same set of global tensors at every layout and
``torch.distributed.checkpoint`` reshards between layouts:

=================================================  ===========  ======================================
parameter                                          placement    why
=================================================  ===========  ======================================
``self_attn.qkv_proj.weight`` / ``.bias``          Shard(0)     column parallel; rows are grouped
                                                                (heads, 3, head_dim), so a row block
                                                                is whole heads with their q, k, v
``self_attn.out_proj.weight``                      Shard(1)     row parallel (input features)
``mlp.fc1.weight`` / ``.bias``                     Shard(0)     column parallel
``mlp.fc2.weight``                                 Shard(1)     row parallel
``decoder.embed_tokens.weight`` (= ``lm_head``)    Shard(0)     vocabulary parallel, tied head
everything else (positions, LayerNorms,            Replicate    used after the reduction
``out_proj.bias``, ``fc2.bias``, project_in/out)
=================================================  ===========  ======================================

The modules keep their one forward.  ``apply_tensor_parallel`` attaches a
``TensorParallelism`` to each module with a seam (``opt_core.parallelism.Parallelism``:
the model, the decoder, its layers, attention, MLP and LayerNorms), and the
seams run the collectives.  A pre-LN block on rank r of tp, sequence parallel
(the default with tp > 1; activations between blocks are (tokens/tp, d), a
contiguous block of the batch x sequence tokens)::

    a   = LN1(x)                                    local tokens
    qkv = all_gather(a) @ Wqkv_r.T + b_r            column_linear: all tokens, heads of rank r
    o   = attention(q, k, v)                        kernels.attention on the local heads
    y   = reduce_scatter(o @ Wout_r.T) + b_out      row_linear: back to local tokens
    n, h = LN2(dropout(y), residual=x)              kernels.layer_norm, residual fused
    m   = reduce_scatter(relu_mlp(all_gather(n), W1_r, b1_r, W2_r, None)) + b2
    x'  = h + dropout(m)                            relu_mlp: bias, dropout, residual after the sum

Without sequence parallelism every rank holds all tokens, the all-gathers
become identities whose backward all-reduces and the reduce-scatters become
all-reduces.  Under sequence parallelism the replicated parameters used on
local tokens (LayerNorms, out_proj/fc2 biases, positions, project_in/out) see
only this rank's tokens, so their gradients are summed over tp
(``collectives.reduce_grad_of``).  The token count is padded to a multiple of
tp with pad tokens at the end; attention only ever sees the real tokens (the
first batch x seqlen rows of the gathered activations), and the padded rows are
dropped before the LM head, whose logits stay split by vocabulary (the loss is
``vocab_parallel_cross_entropy``).

Dropout: seeds are drawn from torch's generator in the same order on every
rank (so ranks stay in step) and offset by the rank where the data is local
(attention heads of this tp rank, sequence-parallel tokens, this dp rank's
rows), so no two ranks share a mask for different data.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor

from opt_core.dist.collectives import (all_reduce, copy_to_tp, gather_from_sp, global_mean_loss, reduce_from_tp,
                                       reduce_grad_of, scatter_to_sp)
from opt_core.dist.mesh import RankCoordinates
from opt_core.dist.vocab_parallel import vocab_parallel_cross_entropy, vocab_parallel_embedding, vocab_range
from opt_core.functional import relu_mlp
from opt_core.parallelism import Parallelism
from opt_core.seeds import draw_seed
from opt_core.model import POSITION_OFFSET, OPTForCausalLM
from opt_core.process_group import local_tensor

# Placement on the "tp" mesh dimension by parameter name (within a decoder layer, or the full name).
_SHARDED = {
    "self_attn.qkv_proj.weight": Shard(0),
    "self_attn.qkv_proj.bias": Shard(0),
    "self_attn.out_proj.weight": Shard(1),
    "mlp.fc1.weight": Shard(0),
    "mlp.fc1.bias": Shard(0),
    "mlp.fc2.weight": Shard(1),
    "decoder.embed_tokens.weight": Shard(0),
    "lm_head.weight": Shard(0),
}


def tp_placement(fqn: str) -> Placement:
    """The "tp" placement of the parameter named ``fqn`` in OPTForCausalLM."""
    for suffix, placement in _SHARDED.items():
        if fqn == suffix or fqn.endswith("." + suffix):
            return placement
    return Replicate()


def check_tp_layout(config, tp: int) -> None:
    """ValueError unless tensor parallelism of size ``tp`` splits the model into whole heads and equal slices."""
    problems = []
    if config.num_heads % tp:
        problems.append(f"num_heads ({config.num_heads}) is not divisible by tp={tp} (a rank must hold whole heads)")
    if config.vocab_size % tp:
        problems.append(f"vocab_size ({config.vocab_size}) is not divisible by tp={tp} (vocabulary-parallel "
                        f"embedding and cross entropy; pad the vocabulary to a multiple of tp)")
    if config.ffn_dim % tp:
        problems.append(f"ffn_dim ({config.ffn_dim}) is not divisible by tp={tp}")
    if problems:
        raise ValueError("bad tensor-parallel layout: " + "; ".join(problems))


class TensorParallelism(Parallelism):
    """The seams of ``opt_core.parallelism.Parallelism`` with Megatron's collectives over ``coords``' tp group.

    Parameters arrive as DTensors (the tp shard; inside an FSDP unit's forward the dp dimension is
    already gathered) or as plain tensors that are already this rank's shard."""

    def __init__(self, coords: RankCoordinates, sequence_parallel: bool):
        self.coords = coords
        self.sequence_parallel = sequence_parallel and coords.tp > 1

    @property
    def group(self):
        return self.coords.tp_group

    # ----------------------------------------------------------------- parameters and regions
    def local(self, param):
        return local_tensor(param) if param is not None else None

    def replicated(self, param):
        """A Replicate parameter used in the block region: under SP each rank sees only its tokens, so its
        gradient is summed over tp."""
        if param is None:
            return None
        local = local_tensor(param)
        return reduce_grad_of(local, self.group) if self.sequence_parallel else local

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """Activations of the block region -> all tokens, replicated on every tp rank."""
        return gather_from_sp(x, self.group) if self.sequence_parallel else copy_to_tp(x, self.group)

    def leave(self, partial: torch.Tensor) -> torch.Tensor:
        """Partial outputs over all tokens -> their sum, on this rank's tokens (SP, after padding the rows
        to a multiple of tp with zeros) or on all."""
        if not self.sequence_parallel:
            return reduce_from_tp(partial, self.group)
        rows = self.rows(partial.shape[0])
        if rows > partial.shape[0]:
            partial = F.pad(partial, (0, 0, 0, rows - partial.shape[0]))
        return scatter_to_sp(partial, self.group)

    def rows(self, tokens: int) -> int:
        """Rows of the all-token activations: ``tokens`` padded to a multiple of tp under SP."""
        tp = self.coords.tp
        return math.ceil(tokens / tp) * tp if self.sequence_parallel else tokens

    # ----------------------------------------------------------------- layers
    def column_linear(self, x, weight, bias):
        return F.linear(self.enter(x), self.local(weight), self.local(bias))

    def row_linear(self, x, weight, bias):
        """``bias`` is replicated and added once, after the reduction."""
        out = self.leave(F.linear(x, self.local(weight)))
        return out + self.replicated(bias) if bias is not None else out

    def relu_mlp(self, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, residual, dropout_p, training):
        # fc1 is column parallel, fc2 row parallel: the fused kernel runs on the local ffn slice and gives
        # the partial fc2 output; its bias, the dropout and the residual go in after the reduction.
        partial = relu_mlp(self.enter(x), self.local(fc1_weight), self.local(fc1_bias), self.local(fc2_weight), None,
                           dropout_p=0.0, training=training)
        out = self.leave(partial)
        if fc2_bias is not None:
            out = out + self.replicated(fc2_bias)
        out = self.dropout(out, dropout_p if training else 0.0)
        return out if residual is None else residual + out

    # ----------------------------------------------------------------- randomness
    def seed_for(self, base, tp_local: bool):
        """``base`` made distinct per dp rank, and per tp rank when the data is tp-local."""
        c = self.coords
        return base + c.dp_rank * c.tp + (c.tp_rank if tp_local else 0)

    def attention_seed(self, seed):
        return self.seed_for(seed, tp_local=True)  # this rank's heads

    def dropout(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """Dropout on block-region activations (this rank's tokens under SP, replicated otherwise)."""
        if p == 0.0:
            return x
        gen = torch.Generator(device=x.device)
        # The seed from torch's CPU generator: the same draw on every rank, and no GPU sync.
        gen.manual_seed(self.seed_for(draw_seed(), tp_local=self.sequence_parallel))
        keep = torch.empty_like(x).bernoulli_(1.0 - p, generator=gen)
        return x * keep * (1.0 / (1.0 - p))

    # ----------------------------------------------------------------- embeddings and head
    def _token_rows(self, t: torch.Tensor, pad_value: int) -> torch.Tensor:
        """(batch, seqlen) -> the flat tokens, padded at the end to ``rows``."""
        flat = t.reshape(-1)
        return F.pad(flat, (0, self.rows(flat.numel()) - flat.numel()), value=pad_value)

    def embed_tokens(self, input_ids, weight, padding_idx):
        """Every rank looks up all tokens in its vocabulary slice; the sum over tp lands on its tokens."""
        local = local_tensor(weight)
        start, end = vocab_range(weight.shape[0], self.coords.tp_rank, self.coords.tp)
        if local.shape[0] != end - start:
            raise RuntimeError(f"embedding shard has {local.shape[0]} rows, expected {end - start}")
        ids = self._token_rows(input_ids, padding_idx if padding_idx is not None else 0)
        return self.leave(vocab_parallel_embedding(ids, local, start, padding_idx=padding_idx))

    def token_positions(self, positions):
        rows = self._token_rows(positions, POSITION_OFFSET - 1)  # pad tokens read the padding position row
        return rows.view(self.coords.tp, -1)[self.coords.tp_rank] if self.sequence_parallel else rows

    def lm_head(self, x, weight, tokens):
        """(tokens, vocab / tp): this rank's vocabulary slice, never gathered."""
        return F.linear(self.enter(x)[:tokens], local_tensor(weight))

    def mean_token_loss(self, logits, target, ignore_index):
        """The mean over the global batch's target tokens (every dp rank): the same value on every rank."""
        c = self.coords
        target = target.reshape(-1)
        start, _ = vocab_range(logits.shape[-1] * c.tp, c.tp_rank, c.tp)
        per_token = vocab_parallel_cross_entropy(logits, target, start, self.group, ignore_index=ignore_index,
                                                 vocab_size=logits.shape[-1] * c.tp)
        count = all_reduce((target != ignore_index).sum(), c.dp_group)
        return global_mean_loss(per_token.sum(), count, c.dp_group)

    def batch_logits(self, logits, batch, seqlen):
        """A (batch, seqlen, vocab) DTensor split by vocabulary over tp (``.full_tensor()`` gathers it)."""
        return DTensor.from_local(logits.view(batch, seqlen, -1), self.coords.tp_mesh, [Shard(2)], run_check=False)


def apply_tensor_parallel(model: OPTForCausalLM, coords: RankCoordinates, sequence_parallel: bool) -> OPTForCausalLM:
    """Shard ``model`` in place: DTensor parameters on ``coords``' tp mesh and a ``TensorParallelism`` on every
    module with a seam.

    Every rank must hold the same full weights (the same seed, or a checkpoint
    loaded afterwards): each keeps its own slice without communication.
    """
    check_tp_layout(model.config, coords.tp)
    tp_mesh = coords.tp_mesh
    converted: dict[int, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in converted:  # tied weights (lm_head = embed_tokens) stay one parameter
                fqn = f"{module_name}.{name}" if module_name else name
                dt = distribute_tensor(param.detach(), tp_mesh, [tp_placement(fqn)], src_data_rank=None)
                converted[id(param)] = nn.Parameter(dt, requires_grad=param.requires_grad)
            module._parameters[name] = converted[id(param)]
    parallelism = TensorParallelism(coords, sequence_parallel)
    for module in model.modules():
        if isinstance(getattr(module, "parallelism", None), Parallelism):
            module.parallelism = parallelism
    return model
