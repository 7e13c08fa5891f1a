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

Forward of a pre-LN block on rank r of tp, sequence parallel (the default
with tp > 1; activations between blocks are (tokens/tp, d), a contiguous block
of the batch x sequence tokens)::

    a   = LN1(x)                                    local tokens
    qkv = all_gather(a) @ Wqkv_r.T + b_r            all tokens, heads of rank r
    o   = attention(q, k, v)                        kernels.attention on the local heads
    y   = reduce_scatter(o @ Wout_r.T) + b_out      back to local tokens
    n, h = LN2(dropout(y), residual=x)              kernels.layer_norm, residual fused
    m   = reduce_scatter(relu_mlp(all_gather(n), W1_r, b1_r, W2_r, None)) + b2
    x'  = h + dropout(m)

Without sequence parallelism every rank holds all tokens, the all-gathers
become identities whose backward all-reduces and the reduce-scatters become
all-reduces.  Under sequence parallelism the replicated parameters used on
local tokens (LayerNorms, out_proj/fc2 biases, positions, project_in/out) see
only this rank's tokens, so their gradients are summed over tp
(``collectives.reduce_grad_of``).  The token count is padded to a multiple of
tp with pad tokens at the end; attention only ever sees the real tokens
(padding rows are cut before it, and the causal mask keeps real queries off
the end), and the padded rows are dropped before the LM head.

Dropout: seeds are drawn from torch's generator in the same order on every
rank (so ranks stay in step) and offset by the rank where the data is local
(attention heads of this tp rank, sequence-parallel tokens, this dp rank's
rows), so no two ranks share a mask for different data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor
from torch.utils.checkpoint import checkpoint

from opt_core.dist.collectives import (copy_to_tp, gather_from_sp, global_mean_loss, reduce_from_tp, reduce_grad_of,
                              scatter_to_sp, all_reduce)
from opt_core.dist.mesh import Layout
from opt_core.dist.vocab_parallel import vocab_parallel_cross_entropy, vocab_parallel_embedding, vocab_range
from opt_core.functional import attention, layer_norm, relu_mlp
from opt_core.model import POSITION_OFFSET, CausalLMOutput, OPTDecoderLayer, OPTForCausalLM

IGNORE_INDEX = -100
_MAX_SEED = 2**62

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


@dataclass
class ParallelContext:
    """What a parallel module needs at run time: the layout and whether sequence parallelism is on."""

    layout: Layout
    sequence_parallel: bool

    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def group(self):
        return self.layout.tp_group

    @property
    def sp(self) -> bool:
        return self.sequence_parallel and self.layout.tp > 1

    # ----------------------------------------------------------------- parameters
    @staticmethod
    def local(p: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """This rank's tp shard (inside an FSDP unit's forward the dp dimension is already gathered)."""
        return p.to_local() if isinstance(p, DTensor) else p

    def replicated(self, p: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """A Replicate parameter used in the sequence-parallel region: its gradient is summed over tp."""
        if p is None:
            return None
        local = self.local(p)
        return reduce_grad_of(local, self.group) if self.sp else local

    def layer_norm(self, module, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        return layer_norm(x, self.replicated(module.weight), self.replicated(module.bias), module.eps, residual)

    # ----------------------------------------------------------------- regions
    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """Activations of the block's region -> all tokens, replicated on every tp rank."""
        return gather_from_sp(x, self.group) if self.sp else copy_to_tp(x, self.group)

    def leave(self, partial: torch.Tensor) -> torch.Tensor:
        """Partial outputs over all tokens -> their sum, on this rank's tokens (SP) or on all."""
        return scatter_to_sp(partial, self.group) if self.sp else reduce_from_tp(partial, self.group)

    def rows(self, tokens: int) -> int:
        """Rows of the all-token activations: ``tokens`` padded to a multiple of tp under SP."""
        return math.ceil(tokens / self.tp) * self.tp if self.sp else tokens

    # ----------------------------------------------------------------- randomness
    @staticmethod
    def draw_seed() -> int:
        # From torch's CPU generator: the same draw on every rank, and no GPU sync.
        return int(torch.randint(0, _MAX_SEED, ()))

    def seed_for(self, base: int, tp_local: bool) -> int:
        """``base`` made distinct per dp rank, and per tp rank when the data is tp-local."""
        lay = self.layout
        return base + lay.dp_rank * lay.tp + (lay.tp_rank if tp_local else 0)

    def dropout(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """Dropout on block-region activations (this rank's tokens under SP, replicated otherwise)."""
        if p == 0.0:
            return x
        gen = torch.Generator(device=x.device)
        gen.manual_seed(self.seed_for(self.draw_seed(), tp_local=self.sp))
        keep = torch.empty_like(x).bernoulli_(1.0 - p, generator=gen)
        return x * keep * (1.0 / (1.0 - p))


# --------------------------------------------------------------------------- linear layers
def column_parallel_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           ctx: ParallelContext) -> torch.Tensor:
    """``x`` (block-region rows) -> all rows x this rank's output features (``weight`` is its row shard)."""
    return F.linear(ctx.enter(x), weight, bias)


def row_parallel_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        ctx: ParallelContext) -> torch.Tensor:
    """All rows x this rank's input features -> the reduced output in the block region, plus ``bias``
    (replicated, added once after the reduction)."""
    out = ctx.leave(F.linear(x, weight))
    return out + ctx.replicated(bias) if bias is not None else out


# --------------------------------------------------------------------------- modules
class ParallelDecoderLayer(OPTDecoderLayer):
    """OPTDecoderLayer with tensor-parallel attention and MLP; same submodules and parameter names."""

    _parallel: ParallelContext

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor], batch: int, seqlen: int
                ) -> torch.Tensor:
        ctx = self._parallel
        drop = self.dropout if self.training else 0.0
        if self.pre_ln:
            a = self._attention(ctx.layer_norm(self.self_attn_layer_norm, x), key_padding_mask, batch, seqlen)
            normed, h = ctx.layer_norm(self.final_layer_norm, ctx.dropout(a, drop), residual=x)
            return h + ctx.dropout(self._mlp(normed), drop)
        a = self._attention(x, key_padding_mask, batch, seqlen)
        h = ctx.layer_norm(self.self_attn_layer_norm, x + ctx.dropout(a, drop))
        return ctx.layer_norm(self.final_layer_norm, h + ctx.dropout(self._mlp(h), drop))

    def _attention(self, x, key_padding_mask, batch, seqlen):
        ctx, attn = self._parallel, self.self_attn
        tokens, heads = batch * seqlen, attn.num_heads // ctx.tp
        qkv = column_parallel_linear(x, ctx.local(attn.qkv_proj.weight), ctx.local(attn.qkv_proj.bias), ctx)
        rows = qkv.shape[0]
        q, k, v = qkv[:tokens].view(batch, seqlen, heads, 3, attn.head_dim).unbind(3)
        p = attn.dropout if self.training else 0.0
        seed = ctx.seed_for(ctx.draw_seed(), tp_local=True) if p > 0 else None
        o = attention(q, k, v, causal=True, softmax_scale=attn.head_dim ** -0.5, key_padding_mask=key_padding_mask,
                      dropout_p=p, seed=seed)
        o = o.reshape(tokens, heads * attn.head_dim)
        if rows > tokens:  # sequence-parallel padding rows: zeros into the reduction
            o = F.pad(o, (0, 0, 0, rows - tokens))
        return row_parallel_linear(o, ctx.local(attn.out_proj.weight), attn.out_proj.bias, ctx)

    def _mlp(self, x):
        ctx, mlp = self._parallel, self.mlp
        # fc1 is column parallel, fc2 row parallel: the fused kernel runs on the local
        # ffn slice and gives the partial fc2 output; its bias goes in after the reduction.
        partial = relu_mlp(ctx.enter(x), ctx.local(mlp.fc1.weight), ctx.local(mlp.fc1.bias),
                           ctx.local(mlp.fc2.weight), None, dropout_p=0.0, training=self.training)
        out = ctx.leave(partial)
        return out + ctx.replicated(mlp.fc2.bias) if mlp.fc2.bias is not None else out


class ParallelOPTForCausalLM(OPTForCausalLM):
    """OPTForCausalLM after ``dist.parallelize``: same parameters (as DTensors), same forward contract.

    ``forward(...).loss`` is the mean over every target token of the global
    batch (all dp ranks), the same value on every rank; ``.logits`` is a DTensor
    split by vocabulary over tp (``.full_tensor()`` gathers it).  Every rank of a
    tp group must pass the same ``input_ids``; dp ranks pass their own rows.
    """

    _parallel: ParallelContext
    _gather_logits: bool = False

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, *, shift_labels: bool = True) -> CausalLMOutput:
        positions, key_padding_mask = self.checked_inputs(input_ids, attention_mask, labels)
        batch, seqlen = input_ids.shape
        ctx, dec, lay = self._parallel, self.decoder, self._parallel.layout
        tokens = batch * seqlen
        rows = ctx.rows(tokens)
        ids, pos = input_ids.reshape(tokens), positions.reshape(tokens)
        if rows > tokens:  # pad tokens at the end, on the padding position row
            ids = F.pad(ids, (0, rows - tokens), value=self.config.pad_token_id)
            pos = F.pad(pos, (0, rows - tokens), value=POSITION_OFFSET - 1)

        embed = ctx.local(dec.embed_tokens.weight)  # also the LM head (tied)
        vocab_start, vocab_end = vocab_range(self.config.vocab_size, lay.tp_rank, lay.tp)
        if embed.shape[0] != vocab_end - vocab_start:
            raise RuntimeError(f"embedding shard has {embed.shape[0]} rows, expected {vocab_end - vocab_start}")
        x = vocab_parallel_embedding(ids, embed, vocab_start, padding_idx=self.config.pad_token_id)
        x = ctx.leave(x)
        if ctx.sp:
            pos = pos.view(ctx.tp, -1)[lay.tp_rank]
        if dec.project_in is not None:
            x = F.linear(x, ctx.replicated(dec.project_in.weight))
        x = x + F.embedding(pos, ctx.replicated(dec.embed_positions.weight))

        for layer in dec.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, key_padding_mask, batch, seqlen, use_reentrant=False)
            else:
                x = layer(x, key_padding_mask, batch, seqlen)
        if dec.final_layer_norm is not None:
            x = ctx.layer_norm(dec.final_layer_norm, x)
        if dec.project_out is not None:
            x = F.linear(x, ctx.replicated(dec.project_out.weight))
        logits = F.linear(ctx.enter(x)[:tokens], embed)  # (tokens, vocab / tp): never gathered

        loss = None
        if labels is not None:
            target = labels
            if attention_mask is not None:
                target = target.masked_fill(attention_mask == 0, IGNORE_INDEX)
            if shift_labels:
                target = F.pad(target[:, 1:], (0, 1), value=IGNORE_INDEX)
            target = target.reshape(tokens)
            per_token = vocab_parallel_cross_entropy(logits, target, vocab_start, ctx.group,
                                                     ignore_index=IGNORE_INDEX, vocab_size=self.config.vocab_size)
            count = all_reduce((target != IGNORE_INDEX).sum(), lay.dp_group)
            loss = global_mean_loss(per_token.sum(), count, lay.dp_group)

        logits = DTensor.from_local(logits.view(batch, seqlen, -1), lay.tp_mesh, [Shard(2)], run_check=False)
        if self._gather_logits:
            logits = logits.full_tensor()
        return CausalLMOutput(logits=logits, loss=loss)

    @torch.no_grad()
    def generate(self, *args, **kwargs) -> torch.Tensor:
        """``OPTForCausalLM.generate``; every rank must call it with the same arguments (and generator state)."""
        self._gather_logits = True
        try:
            return super().generate(*args, **kwargs)
        finally:
            self._gather_logits = False


# --------------------------------------------------------------------------- applying it
def apply_tensor_parallel(model: OPTForCausalLM, layout: Layout, sequence_parallel: bool) -> ParallelOPTForCausalLM:
    """Turn ``model`` (in place) into a ParallelOPTForCausalLM with DTensor parameters on ``layout``'s tp mesh.

    Every rank must hold the same full weights (the same seed, or a checkpoint
    loaded afterwards): each keeps its own slice without communication.
    """
    check_tp_layout(model.config, layout.tp)
    tp_mesh = layout.tp_mesh
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
    ctx = ParallelContext(layout=layout, sequence_parallel=sequence_parallel)
    for layer in model.decoder.layers:
        layer.__class__ = ParallelDecoderLayer
        layer._parallel = ctx
    model.__class__ = ParallelOPTForCausalLM
    model._parallel = ctx
    return model
