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

from opt_core.config import OPTConfig
from opt_core.layers import FusedLayerNorm, FusedSelfAttention, ReLUMLP

POSITION_OFFSET = 2  # OPT's learned positions start at row 2 (rows 0-1: fairseq's padding convention)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None


class OPTDecoderLayer(nn.Module):
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

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        drop = self.dropout if self.training else 0.0
        if self.pre_ln:
            attn = self.self_attn(self.self_attn_layer_norm(x), key_padding_mask)
            # h = x + dropout(attn) and LN2(h) in one LayerNorm pass
            normed, h = self.final_layer_norm(F.dropout(attn, drop, self.training), x)
            return self.mlp(normed, residual=h)
        attn = self.self_attn(x, key_padding_mask)
        h = self.self_attn_layer_norm(x + F.dropout(attn, drop, self.training))
        return self.final_layer_norm(self.mlp(h, residual=h))


class OPTDecoder(nn.Module):
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


class OPTForCausalLM(nn.Module):
    """OPT with its tied LM head; ``forward(input_ids, attention_mask=None, labels=None)``."""

    def __init__(self, config: OPTConfig, *, device=None, dtype=None, init: bool = True):
        super().__init__()
        self.config = config
        self.decoder = OPTDecoder(config, device=device, dtype=dtype)
        self.lm_head = nn.Linear(config.word_embed_proj_dim, config.vocab_size, bias=False, device=device, dtype=dtype)
        self.lm_head.weight = self.decoder.embed_tokens.weight  # tied
        self.activation_checkpointing = False
        if init:
            self.init_weights()

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
    def positions(self, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.long()
        return (torch.cumsum(mask, dim=1) * mask - 1) + POSITION_OFFSET

    def checked_inputs(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                       labels: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(positions, key_padding_mask) for a batch, after checking its shapes (ValueError naming the argument).

        ``key_padding_mask`` is None when nothing is padded, so the attention kernel skips the mask."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seqlen), got shape {tuple(input_ids.shape)}")
        batch, seqlen = input_ids.shape
        if seqlen > self.config.max_position_embeddings:
            raise ValueError(f"input_ids has {seqlen} positions but the model has "
                             f"max_position_embeddings={self.config.max_position_embeddings}")
        for name, t in (("attention_mask", attention_mask), ("labels", labels)):
            if t is not None and tuple(t.shape) != (batch, seqlen):
                raise ValueError(f"{name} must have shape {(batch, seqlen)}, got {tuple(t.shape)}")
        if attention_mask is None:
            positions = torch.arange(POSITION_OFFSET, seqlen + POSITION_OFFSET, device=input_ids.device)
            return positions.expand(batch, -1), None
        key_padding_mask = attention_mask.bool()
        return self.positions(attention_mask), None if bool(key_padding_mask.all()) else key_padding_mask

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        *,
        shift_labels: bool = True,
    ) -> CausalLMOutput:
        """Logits for every position; with ``labels``, the mean next-token cross entropy.

        ``labels`` are Hugging Face style (same positions as ``input_ids``, shifted
        here; pass ``shift_labels=False`` for targets already aligned with the
        logits).  Labels of -100 and positions where ``attention_mask`` is 0 are
        ignored.
        """
        positions, key_padding_mask = self.checked_inputs(input_ids, attention_mask, labels)
        dec = self.decoder
        x = dec.embed_tokens(input_ids)
        if dec.project_in is not None:
            x = dec.project_in(x)
        x = x + dec.embed_positions(positions)
        for layer in dec.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, key_padding_mask, use_reentrant=False)
            else:
                x = layer(x, key_padding_mask)
        if dec.final_layer_norm is not None:
            x = dec.final_layer_norm(x)
        if dec.project_out is not None:
            x = dec.project_out(x)
        logits = self.lm_head(x)

        loss = None
        if labels is not None:
            target = labels.clone()
            if attention_mask is not None:
                target = target.masked_fill(attention_mask == 0, -100)
            pred = logits
            if shift_labels:
                pred, target = logits[:, :-1], target[:, 1:]
            loss = F.cross_entropy(pred.reshape(-1, pred.shape[-1]).float(), target.reshape(-1), ignore_index=-100)
        return CausalLMOutput(logits=logits, loss=loss)

    # ----------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 32,
        *,
        top_k: Optional[int] = None,
        temperature: float = 1.0,
        eos_token_id: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Greedy (``top_k=None``) or top-k sampling, recomputing the prefix each step (no KV cache)."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        was_training = self.training
        self.eval()
        out = input_ids
        done = torch.zeros(out.shape[0], dtype=torch.bool, device=out.device)
        for _ in range(max_new_tokens):
            context = out[:, -self.config.max_position_embeddings:]
            logits = self(context).logits[:, -1].float()
            if top_k is None:
                nxt = logits.argmax(dim=-1)
            else:
                values, idx = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
                probs = torch.softmax(values / temperature, dim=-1)
                nxt = idx.gather(-1, torch.multinomial(probs, 1, generator=generator)).squeeze(-1)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, self.config.pad_token_id), nxt)
                done |= nxt == eos_token_id
            out = torch.cat([out, nxt[:, None]], dim=1)
            if eos_token_id is not None and bool(done.all()):
                break
        self.train(was_training)
        return out

    # ----------------------------------------------------------------- Hugging Face
    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        from opt_core.hf import from_hf_state_dict

        self.load_state_dict(from_hf_state_dict(state_dict, self.config), strict=True)

    def to_hf_state_dict(self) -> dict[str, torch.Tensor]:
        from opt_core.hf import to_hf_state_dict

        return to_hf_state_dict(self.state_dict(), self.config)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device=None, dtype=None) -> "OPTForCausalLM":
        """A local Hugging Face OPT folder (config.json + safetensors or .bin weights); never downloads."""
        from opt_core.hf import load_pretrained

        return load_pretrained(cls, path, device=device, dtype=dtype)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
