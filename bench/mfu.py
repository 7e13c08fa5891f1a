"""Training-step throughput and MFU: our kernels against the same model on plain PyTorch.

One case per model size: a whole training step (forward, backward, clip, AdamW
step) at sequence length 2048, timed with ``do_bench`` like every other case.

- ``opt-core``: OPTForCausalLM with bf16 parameters and our kernels (LayerNorm
  with the residual add fused, the attention kernel, the fused ReLU-MLP),
  FusedAdamW with fp32 master weights and fused clipping.
- ``torch-sdpa``: the same model and weights with each module's forward swapped
  for PyTorch's ops (``F.layer_norm``, ``scaled_dot_product_attention`` with
  ``is_causal``, ``F.linear`` + ``relu`` + ``dropout`` + add), fp32 parameters
  under ``torch.autocast(bfloat16)``, ``clip_grad_norm_`` and
  ``torch.optim.AdamW(fused=True)``: the standard AMP recipe.

FLOPs are the model FLOPs of ``opt_core.flops`` (6N + 12·L·d·s per token, PaLM's
convention, no causal halving, no recompute), so TFLOP/s over the device's
dense bf16 peak is MFU; the harness also reports it against the GEMM rate
measured in the same run.  No byte count (a whole step is compute-bound).  The
goal (timed first): opt-1.3b.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.harness import Lazy, Spec, Target, grouped, selected
from opt_core.kernels.testing import FORWARD_FACTOR, Comparison, compare
from opt_core import flops
from opt_core.config import OPTConfig
from opt_core.layers import FusedLayerNorm, FusedSelfAttention, ReLUMLP
from opt_core.model import OPTForCausalLM
from opt_core.optim import FusedAdamW

SEQ_LEN = 2048
GPU_SIZES = (("opt-125m", 8), ("opt-1.3b", 8), ("opt-2.7b", 4))  # (preset, sequences per step)
GOAL_PRESET = "opt-1.3b"
HYPER = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


# --------------------------------------------------------------------------- the plain-PyTorch peer
class _TorchLayerNorm(FusedLayerNorm):
    def forward(self, input, residual=None):
        h = input if residual is None else input + residual
        y = F.layer_norm(h, self.normalized_shape, self.weight, self.bias, self.eps)
        return y if residual is None else (y, h)


class _TorchAttention(FusedSelfAttention):
    # One process and no KV cache (training steps): batch_shape and kv_cache stay None, and SDPA draws
    # its own dropout mask instead of the decoder's seed.
    def forward(self, hidden_states, key_padding_mask=None, causal=True, *, batch_shape=None, seed=None,
                kv_cache=None):
        B, S, _ = hidden_states.shape
        q, k, v = self.qkv_proj(hidden_states).view(B, S, -1, 3, self.head_dim).unbind(3)
        mask = None
        if key_padding_mask is not None:  # SDPA takes one boolean mask: causal and padding together
            mask = key_padding_mask[:, None, None, :]
            if causal:
                mask = mask & torch.ones(S, S, dtype=torch.bool, device=mask.device).tril()
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0,
                                             is_causal=causal and mask is None)
        return self.out_proj(out.transpose(1, 2).reshape(B, S, self.embed_dim))


class _TorchMLP(ReLUMLP):
    def forward(self, x, residual=None):
        out = F.dropout(self.fc2(F.relu(self.fc1(x))), self.dropout, self.training)
        return out if residual is None else residual + out


def to_plain_pytorch(model: OPTForCausalLM) -> OPTForCausalLM:
    """Swap every fused module's forward for PyTorch's own ops, in place (same parameters)."""
    for module in model.modules():
        for fused, plain in ((FusedLayerNorm, _TorchLayerNorm), (FusedSelfAttention, _TorchAttention),
                             (ReLUMLP, _TorchMLP)):
            if type(module) is fused:
                module.__class__ = plain
    return model


# --------------------------------------------------------------------------- steps
def _ours(config, batch, device):
    model = OPTForCausalLM(config, device=device, dtype=torch.bfloat16 if device.type == "cuda" else None)
    opt = FusedAdamW(model.parameters(), master_weights=True, max_grad_norm=1.0, **HYPER)

    def step():
        loss = model(batch[:, :-1], labels=batch[:, 1:], shift_labels=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _plain(config, batch, device):
    model = to_plain_pytorch(OPTForCausalLM(config, device=device))
    opt = torch.optim.AdamW(model.parameters(), fused=True, **HYPER)
    params = list(model.parameters())

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(batch[:, :-1], labels=batch[:, 1:], shift_labels=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def step_flops(config: OPTConfig, batch_size: int, seq: int) -> int:
    return flops.flops_per_token(config, seq) * batch_size * seq


def _sizes(target: Target, quick: bool) -> list[tuple[str, int, int, str]]:
    """(preset, sequences per step, sequence length, part)."""
    if not target.gpu:
        return [("test", 1, 32, "goal")]  # interpreted: a few programs per kernel
    sizes = [s for s in GPU_SIZES if s[0] == GOAL_PRESET or not quick]
    return [(preset, batch, SEQ_LEN, "goal" if preset == GOAL_PRESET else "rest") for preset, batch in sizes]


def specs(target: Target, quick: bool, dtypes=None, part: str = "all", layers: int | None = None) -> list[Spec]:
    """One whole-training-step case per model size; ``layers`` overrides the presets' layer count (the
    suite's warm-up: the same kernels at the same shapes, in less memory)."""
    out = []
    for preset, batch_size, seq, p in _sizes(target, quick):
        config = OPTConfig.from_preset(preset, **({"num_layers": layers} if layers else {}))
        seq = min(seq, config.max_position_embeddings)
        label = f"{preset} b{batch_size} s{seq} ({flops.matmul_parameters(config) / 1e6:.0f}M matmul params)"
        if layers:
            label += f", {layers} layers"
        out.append(Spec("train_step", label, torch.bfloat16, "fwd+bwd+adamw", 0, step_flops(config, batch_size, seq),
                        ("opt-core", "torch-sdpa"), "torch-sdpa", p, (preset, batch_size, seq, p),
                        warmup_ms=1000, rep_ms=2000))
    return selected(out, part)


def cases(device: torch.device, quick: bool, dtypes=None, part: str = "all", layers: int | None = None):
    """One whole-training-step case per model size; one model in memory at a time."""
    for (preset, batch_size, seq, _), (spec,) in grouped(specs(Target.of(device), quick, dtypes, part, layers)):
        config = OPTConfig.from_preset(preset, **({"num_layers": layers} if layers else {}))
        batch = torch.randint(0, config.vocab_size, (batch_size, seq + 1), device=device)
        yield spec.case({name: Lazy(lambda build=build: build(config, batch, device))
                         for name, build in (("opt-core", _ours), ("torch-sdpa", _plain))})


def warmup_cases(device: torch.device, quick: bool, dtypes=None):
    """The table's steps with two layers per model: every kernel at its table shape, a fraction of the memory."""
    return cases(device, quick, dtypes, "all", layers=2)


# --------------------------------------------------------------------------- smoke
def smoke(device: torch.device) -> list[Comparison]:
    """The peer is the same model: the logits of both, in float32, against the float64 peer."""
    config = OPTConfig.from_preset("test", dropout=0.0)
    ours = OPTForCausalLM(config, device=device).eval()
    plain = to_plain_pytorch(OPTForCausalLM(config, device=device, init=False)).eval()
    plain.load_state_dict(ours.state_dict())
    oracle = to_plain_pytorch(OPTForCausalLM(config, device=device, dtype=torch.float64, init=False)).eval()
    oracle.load_state_dict(ours.state_dict())
    ids = torch.randint(0, config.vocab_size, (2, 48), device=device)
    with torch.no_grad():
        return [compare("model logits, ours vs the plain-PyTorch peer", ours(ids).logits, oracle(ids).logits,
                        plain(ids).logits, factor=FORWARD_FACTOR)]
