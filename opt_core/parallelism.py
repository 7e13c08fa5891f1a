"""The seams of a module's forward where tensor parallelism needs a collective.

A column- or row-parallel linear, the MLP's reduction before its bias, a replicated parameter used on
this rank's tokens, dropout that must differ per rank, the vocabulary-parallel embedding, LM head and
loss: each is a method of ``Parallelism``.  This base class is one process, where every seam is the
plain op; ``opt_core.dist.tensor_parallel.TensorParallelism`` overrides each with Megatron's collectives.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from opt_core.functional import relu_mlp
from opt_core.kernels import dispatch, native
from opt_core.kernels.relu_mlp import KERNEL_DTYPES


class Parallelism:
    """How a module's forward runs at its seams; this base class is one process, where every seam is the
    plain op.  ``opt_core.dist.tensor_parallel.TensorParallelism`` overrides each with its collectives.

    Activations in a block's region are what the module is given: (batch, seqlen, d) here, this rank's
    token rows under sequence parallelism."""

    sequence_parallel = False

    def replicated(self, param: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """A parameter every process holds whole, used on the block region's activations."""
        return param

    def column_linear(self, x, weight, bias):
        """``x`` (block region) -> all tokens x this process's output features."""
        return F.linear(x, weight, bias)

    def row_linear(self, x, weight, bias):
        """All tokens x this process's input features -> the full output in the block region."""
        return F.linear(x, weight, bias)

    def relu_mlp(self, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, residual, dropout_p, training):
        """``residual + dropout(fc2(relu(fc1(x))))``; here all of it in the fused kernel's epilogues."""
        return relu_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual=residual, dropout_p=dropout_p,
                        training=training)

    def dropout(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """Dropout on block-region activations (``p`` is 0 outside training): where the ops take the native
        path, its cheaper CPU draw (``opt_core.kernels.native.dropout``); elsewhere ``F.dropout``, which
        compiled and eager graphs draw alike."""
        if p == 0:
            return x
        return native.dropout(x, p) if dispatch.use_native(x, KERNEL_DTYPES) else F.dropout(x, p)

    def attention_seed(self, seed):
        """The attention-dropout seed this process uses for a seed drawn alike everywhere."""
        return seed

    def embed_tokens(self, input_ids: torch.Tensor, weight: torch.Tensor, padding_idx: Optional[int]):
        """Token embeddings, as the block region holds them."""
        return F.embedding(input_ids, weight, padding_idx)

    def token_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Position ids (batch, seqlen) laid out as the block region's tokens."""
        return positions

    def lm_head(self, x: torch.Tensor, weight: torch.Tensor, tokens: int) -> torch.Tensor:
        """Logits of the ``tokens`` tokens from the block region's activations; here (batch, seqlen, vocab)."""
        return F.linear(x, weight)

    def mean_token_loss(self, logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
        """Mean cross entropy over the targets that are not ``ignore_index`` (logits as ``lm_head`` gives them)."""
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                               ignore_index=ignore_index)

    def batch_logits(self, logits: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
        """``lm_head``'s logits as the (batch, seqlen, vocab) a caller reads."""
        return logits


ONE_PROCESS = Parallelism()
