"""Attention backends behind one interface, chosen once when the engine is built.

    torch       plain PyTorch (kernels/reference.py): runs anywhere; the oracle for the others
    triton      our Triton kernels: the default on CUDA when flash-attn is absent
    flash_attn  the flash-attn package, when it imports

Importing this module imports neither Triton nor flash-attn: a backend loads its kernels
when it is constructed.
"""

from typing import Protocol

import torch
from torch import Tensor

from nanovllm.kernels import reference
from nanovllm.utils.context import AttentionMetadata


class AttentionBackend(Protocol):
    name: str

    def store_kv(
        self,
        key: torch.Tensor,  # [N, num_kv_heads, head_dim]
        value: torch.Tensor,  # [N, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,  # [N] int64, -1 = skip
    ) -> None: ...

    def forward(
        self,
        query: torch.Tensor,  # [N, num_heads, head_dim]
        key: torch.Tensor,  # [N, num_kv_heads, head_dim], already stored in the cache
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor: ...  # [N, num_heads, head_dim]


class TorchBackend:
    """The reference: gathers each sequence's cache and calls scaled_dot_product_attention."""

    name = "torch"

    def store_kv(self, key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
        reference.store_kv(key, value, k_cache, v_cache, slot_mapping)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> Tensor:
        return reference.paged_attention(
            query,
            k_cache,
            v_cache,
            metadata.cu_seqlens_q,
            metadata.max_seqlen_q,
            metadata.context_lens,
            metadata.max_context_len,
            metadata.block_tables,
            scale,
        )


def select_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """The backend for ``attention_backend=name`` on ``device``; "auto" picks the fastest that works."""
    if name == "auto":
        name = "torch"
    if name == "torch":
        return TorchBackend()
    raise ValueError(f"attention_backend={name!r} is not available in this build; use 'torch'")
