"""Plain-PyTorch LoRA over the adapter slots: what runs on CPU, and the Triton kernels' oracle.

A linear layer with LoRA computes, for a token served by the adapter in slot s,

    y = x W^T  +  scaling[s] * (x A[s]^T) B[s]^T
                               \\_shrink_/ \\expand/

where A[s] is [rank, in_features] and B[s] is [out_features, rank]. A fused layer (q, k and v in one matrix)
has one A and one B per slice of its output; y's columns hold the slices one after another, from slice_starts:

    slice_starts = [0, 2048, 3072, 4096]    q: columns 0-2047 use x A[s, 0]^T, k: 2048-3071 x A[s, 1]^T, v: the rest

The functions here compute every slot for every token and keep each token's own: simple and free of
data-dependent shapes (nothing syncs with the host), at max_loras times the (small) LoRA work.
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
    y: torch.Tensor,  # [N, out_features], updated in place
    shrunk: torch.Tensor,  # [num_slices, N, max_rank] float32, lora_shrink's output
    lora_b: torch.Tensor,  # [max_loras, out_features, max_rank]
    scalings: torch.Tensor,  # [max_loras] float32
    metadata: LoRAMetadata,  # of which this reads token_slots only
    slice_starts: torch.Tensor,  # [num_slices + 1] int32, where each slice's columns start in y
) -> None:
    """y += scaling * shrunk[slice] @ B^T of each token's adapter, each column with its slice's shrink; base-model
    tokens keep y."""
    token_slots = metadata.token_slots  # [N] int32
    num_slices, num_out = shrunk.shape[0], y.shape[1]
    cols = torch.arange(num_out, device=y.device, dtype=slice_starts.dtype)  # [out_features]
    col_slices = torch.searchsorted(slice_starts[1:].contiguous(), cols, right=True)  # [out_features] each's slice
    is_slice_col = (col_slices[None, :] == torch.arange(num_slices, device=y.device)[:, None]).float()  # [S, out]
    delta = torch.zeros(y.shape, dtype=torch.float32, device=y.device)  # [N, out_features]
    for slot in range(lora_b.shape[0]):
        is_slot = (token_slots == slot)[:, None]  # [N, 1]
        product = torch.einsum("snr,or,so->no", shrunk, lora_b[slot].float(), is_slice_col)  # [N, out_features]
        delta = torch.where(is_slot, product * scalings[slot], delta)
    y.copy_((y.float() + delta).to(y.dtype))


def lora_apply(
    y: torch.Tensor,  # [N, out_features], the base layer's output, updated in place
    x: torch.Tensor,  # [N, in_features], the layer's input
    lora_a: torch.Tensor,  # [max_loras, num_slices, max_rank, in_features]
    lora_b: torch.Tensor,  # [max_loras, out_features, max_rank]
    scalings: torch.Tensor,  # [max_loras] float32
    metadata: LoRAMetadata,  # each token's slot
    slice_starts: torch.Tensor,  # [num_slices + 1] int32, where each slice's columns start in y
) -> None:
    """y += scaling * (x A^T) B^T of each token's adapter (the shrink, then the expand); base-model tokens keep y."""
    lora_expand(y, lora_shrink(x, lora_a, metadata), lora_b, scalings, metadata, slice_starts)
