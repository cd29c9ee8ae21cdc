"""LoRA shrink and expand behind one interface, chosen once when the engine is built.

    torch   kernels/lora_reference.py: runs anywhere; the oracle
    triton  kernels/triton_lora.py: Punica-style grouped kernels, graph-capturable (on CUDA, or under
            TRITON_INTERPRET=1 on CPU)

Importing this module does not import Triton: the Triton kernels load when chosen.
"""

from typing import Protocol

import torch

from nanovllm.kernels import lora_reference
from nanovllm.utils.lora_metadata import LoRAMetadata

# Smallest rank dimension of the slot tensors: the Triton kernels multiply it in tl.dot, whose matrix dimensions
# must be at least 16 on NVIDIA GPUs (mma instruction shape).
MIN_SLOT_RANK = 16


def slot_rank(max_lora_rank: int) -> int:
    """The rank dimension of the slot tensors: max_lora_rank rounded up to a power of two >= MIN_SLOT_RANK, so a
    Triton tile holds it whole. Smaller adapters are zero-padded, which adds nothing to x A^T B^T."""
    rank = MIN_SLOT_RANK
    while rank < max_lora_rank:
        rank *= 2
    return rank


class LoRAKernels(Protocol):
    name: str

    def shrink(self, x: torch.Tensor, lora_a: torch.Tensor, metadata: LoRAMetadata) -> torch.Tensor:
        """x [N, in_features] @ A[slot]^T for every slice: [num_slices, N, max_rank] float32 (A is
        [max_loras, num_slices, max_rank, in_features]); zero or untouched where a token has no adapter."""
        ...

    def expand(
        self,
        y: torch.Tensor,  # [N, out_features] (one slice's columns), updated in place
        shrunk: torch.Tensor,  # [N, max_rank] float32, one slice of shrink()
        lora_b: torch.Tensor,  # [max_loras, out_features, max_rank]
        scalings: torch.Tensor,  # [max_loras] float32
        metadata: LoRAMetadata,
    ) -> None:
        """y += scaling[slot] * shrunk @ B[slot]^T for each token with an adapter."""
        ...


class TorchLoRAKernels:
    name = "torch"

    def shrink(self, x: torch.Tensor, lora_a: torch.Tensor, metadata: LoRAMetadata) -> torch.Tensor:
        return lora_reference.lora_shrink(x, lora_a, metadata.token_slots)

    def expand(
        self,
        y: torch.Tensor,
        shrunk: torch.Tensor,
        lora_b: torch.Tensor,
        scalings: torch.Tensor,
        metadata: LoRAMetadata,
    ) -> None:
        lora_reference.lora_expand(y, shrunk, lora_b, scalings, metadata.token_slots)


class TritonLoRAKernels:
    name = "triton"

    def __init__(self) -> None:
        from nanovllm.kernels import triton_lora  # imports Triton: only when chosen

        self._kernels = triton_lora

    def shrink(self, x: torch.Tensor, lora_a: torch.Tensor, metadata: LoRAMetadata) -> torch.Tensor:
        return self._kernels.lora_shrink_triton(x, lora_a, metadata)

    def expand(
        self,
        y: torch.Tensor,
        shrunk: torch.Tensor,
        lora_b: torch.Tensor,
        scalings: torch.Tensor,
        metadata: LoRAMetadata,
    ) -> None:
        self._kernels.lora_expand_triton(y, shrunk, lora_b, scalings, metadata)


def select_lora_kernels(use_triton: bool) -> LoRAKernels:
    """Triton where the engine runs its other Triton kernels (attention backend "triton" or "flash_attn")."""
    return TritonLoRAKernels() if use_triton else TorchLoRAKernels()
