"""Plain-PyTorch LoRA shrink and expand over the adapter slots: what runs on CPU, and the Triton kernels' oracle.

A linear layer with LoRA computes, for a token served by the adapter in slot s,

    y = x W^T  +  scaling[s] * (x A[s]^T) B[s]^T
                               \\_shrink_/ \\expand/

where A[s] is [rank, in_features] and B[s] is [out_features, rank]. A fused layer (q, k and v in one matrix)
has one A and one B per slice of its output. Both functions here compute every slot for every token and keep
each token's own: simple and free of data-dependent shapes, at max_loras times the (small) LoRA work.
"""

import torch

from nanovllm.utils.lora_metadata import LoRAMetadata


def lora_shrink(
    x: torch.Tensor,  # [N, in_features]
    lora_a: torch.Tensor,  # [max_loras, num_slices, max_rank, in_features]
    metadata: LoRAMetadata,  # of which this reads token_slots only
) -> torch.Tensor:  # [num_slices, N, max_rank] float32; zero for base-model tokens
    """x @ A^T of each token's adapter, for every slice."""
    token_slots = metadata.token_slots  # [N] int32, each token's slot; NO_ADAPTER = base model
    num_slots, num_slices, max_rank, _ = lora_a.shape
    shrunk = torch.zeros(num_slices, x.shape[0], max_rank, dtype=torch.float32, device=x.device)
    x32 = x.float()
    for slot in range(num_slots):
        is_slot = (token_slots == slot)[None, :, None]  # [1, N, 1]
        product = torch.einsum("nk,srk->snr", x32, lora_a[slot].float())  # [num_slices, N, max_rank]
        shrunk = torch.where(is_slot, product, shrunk)
    return shrunk


def lora_expand(
    y: torch.Tensor,  # [N, out_features] (a view of one slice's columns), updated in place
    shrunk: torch.Tensor,  # [N, max_rank] float32, this slice's lora_shrink output
    lora_b: torch.Tensor,  # [max_loras, out_features, max_rank]
    scalings: torch.Tensor,  # [max_loras] float32
    metadata: LoRAMetadata,  # of which this reads token_slots only
) -> None:
    """y += scaling * shrunk @ B^T of each token's adapter; base-model tokens keep y."""
    token_slots = metadata.token_slots  # [N] int32
    delta = torch.zeros(y.shape, dtype=torch.float32, device=y.device)  # [N, out_features]
    for slot in range(lora_b.shape[0]):
        is_slot = (token_slots == slot)[:, None]  # [N, 1]
        product = (shrunk @ lora_b[slot].float().T) * scalings[slot]  # [N, out_features]
        delta = torch.where(is_slot, product, delta)
    y.copy_((y.float() + delta).to(y.dtype))
