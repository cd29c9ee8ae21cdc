"""LoRA for the tensor-parallel linear layers: the adapters' A and B of one layer, held in max_loras slots.

A linear layer given slots (``enable_lora`` in layers/linear.py) adds, to each token's output, the LoRA of the
adapter in that token's slot (the attention context's LoRAMetadata; base-model tokens get nothing):

    y = x W^T + scaling * (x A^T) B^T

A fused layer has one A and one B per slice of its output (q, k, v; gate, up), each from its own PEFT module.
Under tensor parallelism A and B shard with their layer, and no collective is added:

    column-parallel (qkv, gate_up):  A whole [rank, in]          B: this rank's output rows of each slice
    row-parallel (o, down):          A: this rank's input columns B whole [out, rank]; the partial
                                     x_r A_r^T B^T of each rank joins the layer's own all-reduce
"""

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from nanovllm.kernels.lora import LoRAKernels, slot_rank
from nanovllm.utils.context import get_attention_metadata


@dataclass(frozen=True)
class ShardRange:
    """A range of one dimension of a full (checkpoint) tensor that this rank holds, and where it holds it."""

    local_offset: int  # where the range starts in this rank's tensor
    size: int  # its length
    full_start: int  # where it starts in the full tensor


class LoRASlots(nn.Module):
    """One layer's LoRA weights for max_loras adapters (this rank's shard), and the forward that adds them."""

    lora_a: torch.Tensor  # [max_loras, num_slices, rank, in_features of this rank]
    lora_b: torch.Tensor  # [max_loras, out_features of this rank (the slices one after another), rank]
    scalings: torch.Tensor  # [max_loras] float32, each slot's adapter's scaling
    slice_starts: torch.Tensor  # [num_slices + 1] int32, where each slice's rows start in lora_b (columns in y)

    def __init__(
        self,
        in_range: ShardRange,  # the input features this rank's A holds
        out_slices: tuple[ShardRange, ...],  # per slice (q, k, v, ...): the output rows this rank's B holds
        max_loras: int,
        max_lora_rank: int,
        kernels: LoRAKernels,
        like: torch.Tensor,  # the layer's weight: the slots take its dtype and device
    ) -> None:
        super().__init__()
        self.in_range = in_range
        self.out_slices = out_slices
        self.kernels = kernels
        rank, num_out = slot_rank(max_lora_rank), sum(out.size for out in out_slices)
        dtype, device = like.dtype, like.device
        # Buffers, not parameters: the checkpoint loader expects every parameter in the base model's files.
        lora_a = torch.zeros(max_loras, len(out_slices), rank, in_range.size, dtype=dtype, device=device)
        self.register_buffer("lora_a", lora_a, persistent=False)
        self.register_buffer(
            "lora_b", torch.zeros(max_loras, num_out, rank, dtype=dtype, device=device), persistent=False
        )
        self.register_buffer("scalings", torch.zeros(max_loras, dtype=torch.float32, device=device), persistent=False)
        starts = [out.local_offset for out in out_slices] + [num_out]
        if starts != [0, *itertools.accumulate(out.size for out in out_slices)]:
            raise ValueError(f"LoRA output slices {out_slices} do not lie one after another from column 0")
        self.register_buffer("slice_starts", torch.tensor(starts, dtype=torch.int32, device=device), persistent=False)

    def clear(self, slot: int, scaling: float) -> None:
        """Empty a slot for a new adapter: zero A and B (slices it does not target add nothing), set its scaling."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.scalings[slot] = scaling

    def load(self, slot: int, slice_idx: int, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        """Copy this rank's shard of one PEFT module's A [rank, in] and B [out, rank] (full, on the host) into a slot.

        Ranks below the slots' are zero-padded: the rows of A and columns of B past ``rank`` stay zero. The whole
        tensors go to the device, where the shard is cut: a strided host view would copy synchronously.
        """
        rank = lora_a.shape[0]
        inp, out = self.in_range, self.out_slices[slice_idx]
        lora_a = lora_a.to(self.lora_a.device, non_blocking=True)  # [rank, in_features], whole
        lora_b = lora_b.to(self.lora_b.device, non_blocking=True)  # [out_features, rank], whole
        self.lora_a[slot, slice_idx, :rank].copy_(lora_a.narrow(1, inp.full_start, inp.size))
        rows = self.lora_b[slot, out.local_offset : out.local_offset + out.size, :rank]  # [out.size, rank]
        rows.copy_(lora_b.narrow(0, out.full_start, out.size))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y [N, out] (the layer's output for x [N, in]) plus each token's LoRA, in place."""
        metadata = get_attention_metadata().lora
        if metadata is None:
            raise RuntimeError("a LoRA layer ran without adapter slots in the attention context; the runner sets them")
        self.kernels.apply(y, x, self.lora_a, self.lora_b, self.scalings, metadata, self.slice_starts)
        return y
