"""Keys and values of the positions decoded so far, for incremental generation."""

from __future__ import annotations

from typing import Optional

import torch


class LayerKVCache:
    """One layer's keys and values of the positions seen so far: (batch, max_len, heads, head_dim) buffers,
    allocated at the first write with the keys' dtype, device and (local) head count."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this call's (batch, seqlen, heads, head_dim) keys and values; all of them so far, as views."""
        start, end = self.length, self.length + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; {start} are filled and "
                             f"{k.shape[1]} more came")
        if self.keys is None:
            shape = (k.shape[0], self.max_len, *k.shape[2:])
            self.keys, self.values = k.new_empty(shape), v.new_empty(shape)
        elif self.keys.shape[0] != k.shape[0]:
            raise ValueError(f"the KV cache holds a batch of {self.keys.shape[0]}, got {k.shape[0]} rows")
        self.keys[:, start:end] = k
        self.values[:, start:end] = v
        self.length = end
        return self.keys[:, :end], self.values[:, :end]


class KVCache:
    """Every layer's ``LayerKVCache`` for incremental decoding (``OPTForCausalLM.generate``); inference only."""

    def __init__(self, num_layers: int, max_len: int):
        self.layers = [LayerKVCache(max_len) for _ in range(num_layers)]

    @property
    def length(self) -> int:
        """Positions already cached (those of earlier forwards)."""
        return self.layers[0].length
