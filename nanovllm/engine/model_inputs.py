"""Flatten a scheduled batch into the tensors one forward pass takes."""

from dataclasses import dataclass
from typing import Any

import numpy as np
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
    Positions and slots are numpy arithmetic over the whole flat batch: a prefill step holds up to
    max_num_batched_tokens tokens, and a Python loop per token would cost milliseconds of host time.
    """
    seqs = batch.seqs
    input_ids: list[int] = []
    for seq, num_new in zip(seqs, batch.num_new_tokens, strict=True):
        input_ids.extend(seq.token_ids[seq.num_computed_tokens : seq.num_computed_tokens + num_new])
    starts = np.array([seq.num_computed_tokens for seq in seqs], dtype=np.int64)  # [B]
    num_new_tokens = np.array(batch.num_new_tokens, dtype=np.int64)  # [B]
    cu_seqlens_q = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(num_new_tokens, out=cu_seqlens_q[1:])
    context_lens = starts + num_new_tokens  # [B]
    # Token i of the flat batch belongs to row b = seq_of[i], at position starts[b] + (i - cu_seqlens_q[b]).
    seq_of = np.repeat(np.arange(len(seqs)), num_new_tokens)  # [N]
    positions = np.arange(cu_seqlens_q[-1]) + np.repeat(starts - cu_seqlens_q[:-1], num_new_tokens)  # [N]
    max_num_blocks = max(len(seq.block_table) for seq in seqs)
    block_tables = np.zeros((len(seqs), max_num_blocks), dtype=np.int32)  # padded with 0
    for row, seq in enumerate(seqs):
        block_tables[row, : len(seq.block_table)] = seq.block_table
    slot_mapping = block_tables[seq_of, positions // block_size].astype(np.int64) * block_size + positions % block_size

    cu_seqlens = to_device(cu_seqlens_q, torch.int32, device)
    metadata = AttentionMetadata(
        is_prefill=batch.is_prefill,
        cu_seqlens_q=cu_seqlens,
        max_seqlen_q=max(batch.num_new_tokens),
        context_lens=to_device(context_lens, torch.int32, device),
        max_context_len=int(context_lens.max()),
        slot_mapping=to_device(slot_mapping, torch.int64, device),
        block_tables=to_device(block_tables, torch.int32, device),
    )
    return ModelInputs(
        input_ids=to_device(input_ids, torch.int64, device),
        positions=to_device(positions, torch.int64, device),
        attention=metadata,
        last_token_indices=cu_seqlens[1:].long() - 1,
    )


def to_device(values: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values (a list or a numpy array) as a ``dtype`` tensor on ``device``; on CUDA the copy goes through
    pinned memory, so it does not block the host."""
    host = torch.as_tensor(values, dtype=dtype)  # torch.tensor(pin_memory=True) refuses numpy arrays
    return (host.pin_memory() if device.type == "cuda" else host).to(device, non_blocking=True)


def feed_pending_tokens(input_ids: torch.Tensor, feed_rows: torch.Tensor, last_sampled: torch.Tensor) -> torch.Tensor:
    """Decode input ids with row r of ``last_sampled`` wherever ``feed_rows`` holds r >= 0 (on the device).

    A step launched before the previous one's samples reached the host has PENDING_TOKEN in their place
    on the host; the samples themselves are still in ``last_sampled``, row by row.
    """
    return torch.where(feed_rows >= 0, last_sampled[feed_rows.clamp(min=0)], input_ids)
