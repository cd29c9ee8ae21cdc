"""The attention layer: write new K/V into the paged cache, then attend through the chosen backend."""

import torch
from torch import nn

from nanovllm.kernels.backends import AttentionBackend
from nanovllm.utils.context import get_attention_metadata


class Attention(nn.Module):
    """Paged attention for one layer. The model runner binds this layer's slice of the KV cache and its scales
    (an FP8 cache holds K / k_scale and V / v_scale; a cache in the model's dtype has scales 1.0).

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
        self.k_scale = 1.0  # the cache holds K / k_scale
        self.v_scale = 1.0  # and V / v_scale

    def bind_kv_cache(
        self, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0
    ) -> None:
        self.k_cache, self.v_cache = k_cache, v_cache
        self.k_scale, self.v_scale = k_scale, v_scale

    def forward(
        self,
        query: torch.Tensor,  # [N, num_heads, head_dim]
        key: torch.Tensor,  # [N, num_kv_heads, head_dim]
        value: torch.Tensor,  # [N, num_kv_heads, head_dim]
    ) -> torch.Tensor:  # [N, num_heads, head_dim]
        metadata = get_attention_metadata()
        k_cache, v_cache, k_scale, v_scale = self.k_cache, self.v_cache, self.k_scale, self.v_scale
        self.backend.store_kv(key, value, k_cache, v_cache, metadata.slot_mapping, k_scale, v_scale)
        return self.backend.forward(
            query, key, value, k_cache, v_cache, metadata, self.scale, self.sliding_window, k_scale, v_scale
        )
