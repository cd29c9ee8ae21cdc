"""A batch's adapter slots, row by row, as the LoRAMetadata the layers read (utils/lora_metadata.py)."""

import numpy as np
import torch

from nanovllm.utils.device import to_device
from nanovllm.utils.lora_metadata import NO_ADAPTER, LoRAMetadata


def group_tokens_by_slot(token_slots: np.ndarray, max_loras: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted_token_ids [N], slot_starts [max_loras + 1]) of LoRAMetadata, from each token's slot [N]."""
    keys = np.where(token_slots == NO_ADAPTER, max_loras, token_slots)  # [N], base-model tokens sort last
    sorted_token_ids = np.argsort(keys, kind="stable").astype(np.int32)
    counts = np.bincount(keys, minlength=max_loras + 1)[:max_loras]  # [max_loras] tokens per slot
    slot_starts = np.zeros(max_loras + 1, dtype=np.int32)
    np.cumsum(counts, out=slot_starts[1:])
    return sorted_token_ids, slot_starts


def build_lora_metadata(
    row_slots: np.ndarray, num_new_tokens: list[int], max_loras: int, device: torch.device
) -> LoRAMetadata:
    """The metadata of a batch whose row b computes num_new_tokens[b] tokens with the adapter in row_slots[b]."""
    token_slots = np.repeat(row_slots, num_new_tokens).astype(np.int32)  # [N]
    sorted_token_ids, slot_starts = group_tokens_by_slot(token_slots, max_loras)
    return LoRAMetadata(
        token_slots=to_device(token_slots, torch.int32, device),
        sorted_token_ids=to_device(sorted_token_ids, torch.int32, device),
        slot_starts=to_device(slot_starts, torch.int32, device),
    )


def stage_decode_slots(
    fields: dict[str, np.ndarray], row_slots: np.ndarray | None, num_seqs: int, bucket: int, max_loras: int
) -> None:
    """Fill a decode graph's LoRA inputs (runner/decode_staging.py) for lanes < bucket: lane b is row b, padded
    lanes and a batch without adapters (``row_slots`` None) use the base model."""
    token_slots = fields["lora_token_slots"]
    token_slots[:num_seqs] = NO_ADAPTER if row_slots is None else row_slots
    token_slots[num_seqs:bucket] = NO_ADAPTER
    sorted_token_ids, slot_starts = group_tokens_by_slot(token_slots[:bucket], max_loras)
    fields["lora_sorted_token_ids"][:bucket] = sorted_token_ids
    fields["lora_slot_starts"][:] = slot_starts


def decode_staging_fields(max_num_seqs: int, max_loras: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The decode staging buffer's LoRA fields: name -> (shape, dtype); their meaning is LoRAMetadata's."""
    return {
        "lora_token_slots": ((max_num_seqs,), torch.int32),
        "lora_sorted_token_ids": ((max_num_seqs,), torch.int32),
        "lora_slot_starts": ((max_loras + 1,), torch.int32),
    }
