"""FLOP and MFU accounting (DESIGN.md: PaLM's convention, as nanoGPT and torchtitan use it).

Model FLOPs per training token = 6·N + 12·L·d·s, where

- N counts the parameters of every matrix multiply: per layer the Q, K, V and
  output projections (4·d²) and the two MLP matrices (2·d·ffn), the LM head
  (vocab x embedding width: tied to the token embedding, it is still a matmul
  on every token), and 350M's project_in/project_out.  Embedding lookups,
  biases and LayerNorms are not matmuls and are not counted.  The factor 6 is
  2 FLOPs per multiply-add times (1 forward + 2 backward) passes.
- 12·L·d·s is the attention scores and the weighted sum (2 matmuls x 2 FLOPs x
  3 passes, over d = heads x head_dim, against s keys), over the full s x s
  square: no halving for causal masking, by convention.
- No activation recomputation is counted: that would be hardware FLOPs (HFU),
  not model FLOPs.  The OPT paper's 147 TFLOP/s per A100 matches a
  recompute-inclusive count (OPT_SPEC.md §8), i.e. HFU; ``hfu_flops_per_token``
  gives that number for comparison.

MFU = model FLOPs per token x tokens per second / the device's dense peak.
"""

from __future__ import annotations

from typing import Optional

from opt_core.config import OPTConfig

CONVENTION = "MFU: 6N+12·L·d·s FLOPs/token (PaLM; N = matmul params incl. LM head; no causal halving, no recompute)"

# Dense bf16/fp16 tensor-core peaks, FLOP/s, from the vendors' data sheets (SXM parts).
PEAK_FLOPS = {
    "A100": 312e12,
    "H100": 989e12,
    "H200": 989e12,
    "B200": 2250e12,
}


def matmul_parameters(config: OPTConfig) -> int:
    d, f, e = config.hidden_size, config.ffn_dim, config.word_embed_proj_dim
    n = config.num_layers * (4 * d * d + 2 * d * f) + config.vocab_size * e
    if e != d:
        n += 2 * d * e
    return n


def flops_per_token(config: OPTConfig, seq_len: int) -> int:
    """Model FLOPs to train on one token at sequence length ``seq_len`` (forward + backward)."""
    return 6 * matmul_parameters(config) + 12 * config.num_layers * config.hidden_size * seq_len


def hfu_flops_per_token(config: OPTConfig, seq_len: int) -> int:
    """Hardware FLOPs with full activation recomputation (one more forward: 8N + 16·L·d·s)."""
    return 8 * matmul_parameters(config) + 16 * config.num_layers * config.hidden_size * seq_len


def peak_flops(device_name: str) -> Optional[float]:
    """Dense bf16 peak of a GPU from its name, or None when unknown (a CPU, say)."""
    name = device_name.upper()
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None


def mfu(tokens_per_second: float, config: OPTConfig, seq_len: int, peak: Optional[float]) -> Optional[float]:
    if not peak:
        return None
    return tokens_per_second * flops_per_token(config, seq_len) / peak
