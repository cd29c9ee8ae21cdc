"""A layer's LoRA (y += scaling * (x A^T) B^T per token's adapter) behind one interface, chosen once when the
engine is built.

    torch   kernels/lora_reference.py: runs anywhere; the oracle
    triton  kernels/triton_lora.py: Punica-style grouped kernels, one launch at decode sizes, graph-capturable
            (on CUDA, or under TRITON_INTERPRET=1 on CPU)

Importing this module does not import Triton: the Triton kernels load when chosen.
"""

from collections.abc import Callable
from dataclasses import dataclass

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


# (y [N, out] updated in place, x [N, in], A [max_loras, num_slices, rank, in], B [max_loras, out, rank],
#  scalings [max_loras] float32, metadata, slice_starts [num_slices + 1] int32) -> None
LoRAApply = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, LoRAMetadata, torch.Tensor], None
]


@dataclass(frozen=True)
class LoRAKernels:
    """The LoRA of one implementation (lora_reference.lora_apply documents the contract)."""

    name: str  # "torch" or "triton"
    apply: LoRAApply  # shrink and expand of every slice of one layer, for each token's adapter


def select_lora_kernels(use_triton: bool) -> LoRAKernels:
    """Triton where the engine runs its other Triton kernels (attention backend "triton" or "flash_attn")."""
    if not use_triton:
        return LoRAKernels("torch", lora_reference.lora_apply)
    from nanovllm.kernels import triton_lora  # imports Triton: only when chosen

    return LoRAKernels("triton", triton_lora.lora_apply_triton)
