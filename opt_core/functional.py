"""The functional ops, as ``torch.nn.functional`` holds torch's: each is defined in its kernel module
(``opt_core.kernels.<op>``) and backed by a ``torch.library`` custom op with its autograd.

    from opt_core import functional as F
    y, h = F.layer_norm(x, weight, bias, residual=r)            # LN(x + r) and x + r, one pass
    o = F.attention(q, k, v, causal=True, key_padding_mask=m)   # (batch, seqlen, heads, head_dim)
    out = F.relu_mlp(x, w1, b1, w2, b2, residual=x, dropout_p=0.1)
"""

from opt_core.kernels.adamw import adamw_step, grad_stats
from opt_core.kernels.attention import attention
from opt_core.kernels.attention import dropout_mask as attention_dropout_mask
from opt_core.kernels.layer_norm import layer_norm
from opt_core.kernels.relu_mlp import relu_mlp
from opt_core.kernels.relu_mlp import dropout_mask as relu_mlp_dropout_mask

__all__ = ["adamw_step", "attention", "attention_dropout_mask", "grad_stats", "layer_norm", "relu_mlp",
           "relu_mlp_dropout_mask"]
