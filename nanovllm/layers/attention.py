"""The attention layer: write new K/V into the paged cache, then attend through the chosen backend."""

import torch
from torch import nn

from nanovllm.kernels.backends import AttentionBackend
from nanovllm.utils.context import get_attention_metadata


class Attention(nn.Module):
    """Paged attention for one layer. The model runner binds this layer's slice of the KV cache.

    The window is the layer's own: Gemma 3 interleaves layers that see the last ``sliding_window`` keys
    with layers that see every key, and each passes its window to the backend.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        backend: AttentionBackend,
        sliding_window: int | None = None,  # keys each query sees, itself included; None: every key before it
    ):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.backend = backend
        self.sliding_window = sliding_window
        self.k_cache = torch.empty(0)  # [num_blocks, block_size, num_kv_heads, head_dim] once bound
        self.v_cache = torch.empty(0)

    def bind_kv_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        self.k_cache, self.v_cache = k_cache, v_cache

    def forward(
        self,
        query: torch.Tensor,  # [N, num_heads, head_dim]
        key: torch.Tensor,  # [N, num_kv_heads, head_dim]
        value: torch.Tensor,  # [N, num_kv_heads, head_dim]
    ) -> torch.Tensor:  # [N, num_heads, head_dim]
        metadata = get_attention_metadata()
        self.backend.store_kv(key, value, self.k_cache, self.v_cache, metadata.slot_mapping)
        return self.backend.forward(
            query, key, value, self.k_cache, self.v_cache, metadata, self.scale, self.sliding_window
        )
