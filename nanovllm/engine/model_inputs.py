"""Flatten a scheduled batch into the tensors one forward pass takes."""

from dataclasses import dataclass
from typing import Any

import torch

from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.utils.context import AttentionMetadata


@dataclass(frozen=True)
class ModelInputs:
    input_ids: torch.Tensor  # [N] int64, the new tokens of every sequence, concatenated
    positions: torch.Tensor  # [N] int64, each token's position in its sequence
    attention: AttentionMetadata  # where the tokens sit in the batch and the KV cache
    last_token_indices: torch.Tensor  # [B] int64, row of each sequence's last new token in the flat batch


def build_model_inputs(batch: ScheduledBatch, block_size: int, device: torch.device) -> ModelInputs:
    """Sequence b computes positions [start_b, end_b): start_b = its num_computed_tokens, end_b = start_b + new.

    Position p of a sequence lives in cache slot  block_table[p // block_size] * block_size + p % block_size.
    """
    input_ids: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    cu_seqlens_q = [0]
    context_lens: list[int] = []
    for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
        input_ids.extend(seq.token_ids[start:end])
        positions.extend(range(start, end))
        slot_mapping.extend(
            seq.block_table[pos // block_size] * block_size + pos % block_size for pos in range(start, end)
        )
        cu_seqlens_q.append(cu_seqlens_q[-1] + num_new)
        context_lens.append(end)
    max_num_blocks = max(len(seq.block_table) for seq in batch.seqs)
    block_tables = [seq.block_table + [0] * (max_num_blocks - len(seq.block_table)) for seq in batch.seqs]

    def to_device(values: list[Any], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda").to(device, non_blocking=True)

    cu_seqlens = to_device(cu_seqlens_q, torch.int32)
    metadata = AttentionMetadata(
        is_prefill=batch.is_prefill,
        cu_seqlens_q=cu_seqlens,
        max_seqlen_q=max(batch.num_new_tokens),
        context_lens=to_device(context_lens, torch.int32),
        max_context_len=max(context_lens),
        slot_mapping=to_device(slot_mapping, torch.int64),
        block_tables=to_device(block_tables, torch.int32),
    )
    return ModelInputs(
        input_ids=to_device(input_ids, torch.int64),
        positions=to_device(positions, torch.int64),
        attention=metadata,
        last_token_indices=cu_seqlens[1:].long() - 1,
    )
