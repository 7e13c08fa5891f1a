"""The OPT decoder, as the paper and Hugging Face's OPTForCausalLM define it, over our kernels.

One block (pre-LN, every size but 350M):
    h = x + dropout(out_proj(attention(qkv_proj(LN1(x)))))
    x' = h + dropout(fc2(relu(fc1(LN2(h)))))
350M is post-LN: LN1 and LN2 come after each residual add, there is no final
LayerNorm, and 512-wide token embeddings are projected in and out.

Learned positions are offset by 2 and computed from the attention mask
(``cumsum(mask) * mask - 1 + 2``: left padding gets row 1, the first real
token row 2), token embeddings are not scaled, there is no embedding dropout,
dropout 0.1 follows the attention and the MLP, and the LM head is tied to the
token embedding.  The paper's initialisation: N(0, 0.006) for embeddings,
positions, QKV and fc1; N(0, 0.006/sqrt(2L)) for each residual branch's output
projection (out_proj, fc2); biases 0, LayerNorm 1/0, the pad rows 0.

Kernels: FusedLayerNorm (with the residual add fused into it), the fused
attention and the fused ReLU-MLP (bias, ReLU, dropout, residual in the GEMM
epilogues), each falling back to kernels/reference.py where no kernel runs.

Every module has one forward; where tensor parallelism needs collectives it
goes through the module's ``parallelism`` (``opt_core.parallelism.Parallelism``, one
process unless ``opt_core.dist.parallelize`` attached its own).  ``forward``
never reads device data on the host: it compiles with
``torch.compile(fullgraph=True)``, with or without an attention mask, in
training and in eval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from opt_core import hf
from opt_core.config import OPTConfig
from opt_core.kernels.validation import check_tensor
from opt_core.kv_cache import KVCache, LayerKVCache
from opt_core.layers import FusedLayerNorm, FusedSelfAttention, ReLUMLP
from opt_core.parallelism import ONE_PROCESS, Parallelism
from opt_core.seeds import draw_seed
from opt_core.process_group import is_dtensor

POSITION_OFFSET = 2  # OPT's learned positions start at row 2 (rows 0-1: fairseq's padding convention)
IGNORE_INDEX = -100
TOKEN_DTYPES = (torch.int64, torch.int32)  # what nn.Embedding takes as indices


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None


class OPTDecoderLayer(nn.Module):
    parallelism: Parallelism = ONE_PROCESS

    def __init__(self, config: OPTConfig, device=None, dtype=None):
        super().__init__()
        d = config.hidden_size
        kw = dict(device=device, dtype=dtype)
        self.pre_ln = config.do_layer_norm_before
        self.dropout = config.dropout
        self.self_attn = FusedSelfAttention(d, config.num_heads, dropout=config.attention_dropout, **kw)
        self.self_attn_layer_norm = FusedLayerNorm(d, **kw)
        self.mlp = ReLUMLP(d, config.ffn_dim, dropout=config.dropout, **kw)
        self.final_layer_norm = FusedLayerNorm(d, **kw)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor], batch_shape: tuple[int, int],
                attention_seed=None, kv_cache: Optional[LayerKVCache] = None) -> torch.Tensor:
        """``x``: (batch, seqlen, d), or the token rows under tensor parallelism (``batch_shape`` says which
        tokens they are); ``attention_seed``: the attention dropout's seed (training only)."""
        attn = self.self_attn(self.self_attn_layer_norm(x) if self.pre_ln else x, key_padding_mask,
                              batch_shape=batch_shape, seed=attention_seed, kv_cache=kv_cache)
        attn = self.parallelism.dropout(attn, self.dropout if self.training else 0.0)
        if self.pre_ln:
            normed, h = self.final_layer_norm(attn, x)  # h = x + dropout(attn) and LN2(h) in one pass
            return self.mlp(normed, residual=h)
        h = self.self_attn_layer_norm(x + attn)
        return self.final_layer_norm(self.mlp(h, residual=h))


class OPTDecoder(nn.Module):
    """Embeddings and positions, the layers, the final LayerNorm and project_out: hidden states for the LM head."""

    parallelism: Parallelism = ONE_PROCESS

    def __init__(self, config: OPTConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        d, e = config.hidden_size, config.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(config.vocab_size, e, padding_idx=config.pad_token_id, **kw)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, d, **kw)
        self.project_in = nn.Linear(e, d, bias=False, **kw) if e != d else None
        self.project_out = nn.Linear(d, e, bias=False, **kw) if e != d else None
        self.layers = nn.ModuleList(OPTDecoderLayer(config, **kw) for _ in range(config.num_layers))
        self.final_layer_norm = FusedLayerNorm(d, **kw) if config.has_final_layer_norm else None
        self.activation_checkpointing = False

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        """(batch, seqlen, word_embed_proj_dim), or the token rows under tensor parallelism.

        ``attention_mask`` (batch, cached + seqlen) goes to attention whenever it is given (an all-True
        mask gives what no mask gives), so nothing here depends on its values."""
        par = self.parallelism
        batch, seqlen = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        key_padding_mask = attention_mask.bool() if attention_mask is not None else None
        x = par.embed_tokens(input_ids, self.embed_tokens.weight, self.embed_tokens.padding_idx)
        if self.project_in is not None:
            x = F.linear(x, par.replicated(self.project_in.weight))
        positions = par.token_positions(position_ids(attention_mask, past, batch, seqlen, input_ids.device))
        x = x + F.embedding(positions, par.replicated(self.embed_positions.weight))
        checkpointed = self.activation_checkpointing and self.training
        for i, layer in enumerate(self.layers):
            # The attention-dropout seed is drawn here, outside the (checkpointed) layer: a recomputed
            # layer is handed the same one, and under torch.compile the draw is a graph op.
            seed = draw_seed() if self.training and layer.self_attn.dropout > 0 else None
            args = (x, key_padding_mask, (batch, seqlen), seed, kv_cache.layers[i] if kv_cache is not None else None)
            x = checkpoint(layer, *args, use_reentrant=False) if checkpointed else layer(*args)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = F.linear(x, par.replicated(self.project_out.weight))
        return x


def position_ids(attention_mask: Optional[torch.Tensor], past: int, batch: int, seqlen: int,
                 device: torch.device) -> torch.Tensor:
    """OPT's learned-position rows of the ``seqlen`` tokens after ``past`` cached ones: from the mask
    (``cumsum(mask) * mask - 1 + 2``, so padding reads row 1), or consecutive without one."""
    if attention_mask is None:
        return torch.arange(past + POSITION_OFFSET, past + seqlen + POSITION_OFFSET, device=device).expand(batch, -1)
    mask = attention_mask.long()
    return (torch.cumsum(mask, dim=1) * mask - 1)[:, past:] + POSITION_OFFSET


def _check_input_types(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> None:
    """What forward and generate both take: token ids of an integer dtype, a mask that is a tensor or None."""
    check_tensor("input_ids", input_ids, dtypes=TOKEN_DTYPES)
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor or None, got {type(attention_mask).__name__}")


def next_token_targets(labels: torch.Tensor, attention_mask: Optional[torch.Tensor], shift: bool) -> torch.Tensor:
    """Labels aligned with the logits: -100 where the mask is 0, moved one position left when ``shift``
    (the last position then has no target)."""
    target = labels.long()  # cross_entropy takes int64 class indices; int32 labels are accepted too
    if attention_mask is not None:
        target = target.masked_fill(attention_mask[:, -labels.shape[1]:] == 0, IGNORE_INDEX)
    if shift:
        target = F.pad(target[:, 1:], (0, 1), value=IGNORE_INDEX)
    return target


class OPTForCausalLM(nn.Module):
    """OPT with its tied LM head; ``forward(input_ids, attention_mask=None, labels=None)``.

    After ``opt_core.dist.parallelize`` the same forward runs tensor parallel: ``.loss`` is then the mean
    over every target token of the global batch (the same value on every rank) and ``.logits`` a DTensor
    split by vocabulary over tp (``.full_tensor()`` gathers it)."""

    parallelism: Parallelism = ONE_PROCESS

    def __init__(self, config: OPTConfig, *, device=None, dtype=None, init: bool = True):
        super().__init__()
        self.config = config
        self.decoder = OPTDecoder(config, device=device, dtype=dtype)
        self.lm_head = nn.Linear(config.word_embed_proj_dim, config.vocab_size, bias=False, device=device, dtype=dtype)
        self.lm_head.weight = self.decoder.embed_tokens.weight  # tied
        if init:
            self.init_weights()

    @property
    def activation_checkpointing(self) -> bool:
        """Recompute each decoder layer in the backward (training only)."""
        return self.decoder.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, on: bool) -> None:
        self.decoder.activation_checkpointing = on

    # ----------------------------------------------------------------- init
    @torch.no_grad()
    def init_weights(self, generator: Optional[torch.Generator] = None) -> None:
        """The paper's initialisation (metaseq's Megatron init, sigma 0.006)."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.num_layers)
        dec = self.decoder

        def normal(t, s):
            t.normal_(0.0, s, generator=generator)

        normal(dec.embed_tokens.weight, std)
        normal(dec.embed_positions.weight, std)
        dec.embed_tokens.weight[self.config.pad_token_id].zero_()
        dec.embed_positions.weight[1].zero_()  # the row padding positions read
        for proj in (dec.project_in, dec.project_out):
            if proj is not None:
                normal(proj.weight, std)
        for layer in dec.layers:
            normal(layer.self_attn.qkv_proj.weight, std)
            normal(layer.self_attn.out_proj.weight, out_std)
            normal(layer.mlp.fc1.weight, std)
            normal(layer.mlp.fc2.weight, out_std)
            for linear in (layer.self_attn.qkv_proj, layer.self_attn.out_proj, layer.mlp.fc1, layer.mlp.fc2):
                linear.bias.zero_()
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                module.reset_parameters()

    # ----------------------------------------------------------------- forward
    def check_inputs(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                     labels: Optional[torch.Tensor], kv_cache: Optional[KVCache]) -> None:
        """TypeError or ValueError naming the argument for dtypes and shapes that do not fit (from metadata only,
        never from values: a check of the token ids' range would wait on the GPU every step)."""
        _check_input_types(input_ids, attention_mask)
        if labels is not None:
            check_tensor("labels", labels, dtypes=TOKEN_DTYPES)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seqlen), got shape {tuple(input_ids.shape)}")
        batch, seqlen = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if past + seqlen > self.config.max_position_embeddings:
            raise ValueError(f"input_ids has {past + seqlen} positions{' with the cached ones' if past else ''} but "
                             f"the model has max_position_embeddings={self.config.max_position_embeddings}")
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, past + seqlen):
            raise ValueError(f"attention_mask must have shape {(batch, past + seqlen)}, got "
                             f"{tuple(attention_mask.shape)}")
        if labels is not None and tuple(labels.shape) != (batch, seqlen):
            raise ValueError(f"labels must have shape {(batch, seqlen)}, got {tuple(labels.shape)}")
        if kv_cache is not None and torch.is_grad_enabled():
            raise ValueError("kv_cache is for inference: call forward under torch.no_grad() (generate does)")

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        *,
        shift_labels: bool = True,
        kv_cache: Optional[KVCache] = None,
    ) -> CausalLMOutput:
        """Logits for every position; with ``labels``, the mean next-token cross entropy.

        ``labels`` are Hugging Face style (same positions as ``input_ids``, shifted
        here; pass ``shift_labels=False`` for targets already aligned with the
        logits).  Labels of -100 and positions where ``attention_mask`` is 0 are
        ignored.  With a ``kv_cache`` (inference), ``input_ids`` continue the
        cached positions and ``attention_mask`` covers the cached ones too.
        """
        self.check_inputs(input_ids, attention_mask, labels, kv_cache)
        par = self.parallelism
        logits = par.lm_head(self.decoder(input_ids, attention_mask, kv_cache), self.lm_head.weight, input_ids.numel())
        loss = None
        if labels is not None:
            target = next_token_targets(labels, attention_mask, shift_labels)
            loss = par.mean_token_loss(logits, target, IGNORE_INDEX)
        return CausalLMOutput(logits=par.batch_logits(logits, *input_ids.shape), loss=loss)

    # ----------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        *,
        max_new_tokens: int = 32,
        top_k: Optional[int] = None,
        temperature: float = 1.0,
        eos_token_id: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Greedy (``top_k=None``) or top-k sampling with a KV cache: the prompt in one forward, then one
        token per step reading the cached keys and values.

        ``attention_mask`` (batch, prompt) marks real tokens, for left-padded batches: each row then
        generates what it would alone.  Rows that produced ``eos_token_id`` continue with pad tokens, and
        generation stops when every row has.  Returns the prompt and the new tokens.  A tensor-parallel
        model generates too (every rank with the same arguments and generator state; the last position's
        logits are gathered)."""
        self._check_generate_args(input_ids, attention_mask, max_new_tokens, top_k, temperature)
        was_training = self.training
        self.eval()
        try:
            cache = KVCache(self.config.num_layers, input_ids.shape[1] + max_new_tokens)
            out, step_ids, mask = input_ids, input_ids, attention_mask
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            for _ in range(max_new_tokens):
                logits = self(step_ids, attention_mask=mask, kv_cache=cache).logits[:, -1]
                nxt = _pick(logits.full_tensor() if is_dtensor(logits) else logits, top_k, temperature, generator)
                if eos_token_id is not None:
                    nxt = torch.where(done, torch.full_like(nxt, self.config.pad_token_id), nxt)
                    done |= nxt == eos_token_id
                out, step_ids = torch.cat([out, nxt[:, None]], dim=1), nxt[:, None]
                if mask is not None:
                    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                if eos_token_id is not None and bool(done.all()):
                    break
        finally:
            self.train(was_training)
        return out

    def _check_generate_args(self, input_ids, attention_mask, max_new_tokens, top_k, temperature) -> None:
        _check_input_types(input_ids, attention_mask)
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be (batch, prompt length >= 1), got shape {tuple(input_ids.shape)}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if input_ids.shape[1] + max_new_tokens > self.config.max_position_embeddings:
            raise ValueError(f"max_new_tokens={max_new_tokens} after a prompt of {input_ids.shape[1]} tokens "
                             f"exceeds max_position_embeddings={self.config.max_position_embeddings}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")

    # ----------------------------------------------------------------- Hugging Face
    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(hf.from_hf_state_dict(state_dict, self.config), strict=True)

    def to_hf_state_dict(self) -> dict[str, torch.Tensor]:
        return hf.to_hf_state_dict(self.state_dict(), self.config)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device=None, dtype=None) -> "OPTForCausalLM":
        """A local Hugging Face OPT folder (config.json + safetensors or .bin weights); never downloads."""
        return hf.load_pretrained(cls, path, device=device, dtype=dtype)

    def save_pretrained(self, path: str | Path) -> None:
        """A Hugging Face OPT folder (config.json + model.safetensors) that transformers loads."""
        hf.save_pretrained(self, path)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _pick(logits: torch.Tensor, top_k: Optional[int], temperature: float,
          generator: Optional[torch.Generator]) -> torch.Tensor:
    """The next token of each row from its (batch, vocab) logits: the argmax, or a top-k sample."""
    logits = logits.float()
    if top_k is None:
        return logits.argmax(dim=-1)
    values, idx = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
    probs = torch.softmax(values / temperature, dim=-1)
    return idx.gather(-1, torch.multinomial(probs, 1, generator=generator)).squeeze(-1)
