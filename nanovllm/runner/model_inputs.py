"""Flatten a scheduled batch into the tensors one forward pass takes."""

from dataclasses import dataclass

import numpy as np
import torch

from nanovllm.scheduler.batch import ScheduledBatch
from nanovllm.utils.context import AttentionMetadata
from nanovllm.utils.device import to_device


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
        known = seq.token_ids[seq.num_computed_tokens : seq.num_computed_tokens + num_new]
        input_ids.extend(known)
        input_ids.extend([0] * (num_new - len(known)))  # a pending token: taken on the device (PendingTokens)
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


@dataclass(frozen=True)
class PendingTokens:
    """Where a step finds the input tokens that are still on the device: the step launched just before sampled
    them, and the host schedules this step before they reach it. A pending token is always the last new token of
    its row: the only one of a decode row, never one of a prompt chunk (a mixed step, scheduler/mixed.py, holds both).
    Entries are per token of the step's flat batch; in a decode step that is per row.

        token of this step:  0  1  2  3
        is_pending:          T  T  F  T    token 2 came back from preemption: the host has it
        source_rows:         1  0  0  3    the row of the step before (of last_sampled) that sampled it
    """

    is_pending: np.ndarray  # [N] bool, whether the token is pending
    source_rows: np.ndarray  # [N] int64, the row of the step before that sampled it; 0 where not pending


def find_pending_tokens(batch: ScheduledBatch, in_flight: ScheduledBatch | None) -> PendingTokens | None:
    """The pending input tokens of ``batch`` launched while ``in_flight`` runs; None when it has none."""
    if in_flight is None:
        return None
    row_of = {seq.seq_id: row for row, seq in enumerate(in_flight.seqs)}
    if batch.is_prefill:
        return _pending_in_prefill(batch, row_of)
    is_pending = np.array([seq.num_pending_tokens > 0 for seq in batch.seqs], dtype=bool)
    source_rows = np.array([row_of[seq.seq_id] if seq.num_pending_tokens else 0 for seq in batch.seqs], np.int64)
    return PendingTokens(is_pending, source_rows)


def _pending_in_prefill(batch: ScheduledBatch, row_of: dict[int, int]) -> PendingTokens | None:
    """A prefill step's pending tokens: those of a mixed step's decode rows (a row is pending where it reaches the
    end of a sequence with a pending token); None for prompt chunks alone."""
    rows = [
        row
        for row, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True))
        if seq.num_pending_tokens and seq.num_computed_tokens + num_new == seq.num_tokens
    ]
    if not rows:
        return None
    last_token_idx = np.cumsum(batch.num_new_tokens) - 1  # [B] each row's last token in the flat batch
    is_pending = np.zeros(int(last_token_idx[-1]) + 1, dtype=bool)  # [N]
    source_rows = np.zeros(len(is_pending), dtype=np.int64)  # [N]
    is_pending[last_token_idx[rows]] = True
    source_rows[last_token_idx[rows]] = [row_of[batch.seqs[row].seq_id] for row in rows]
    return PendingTokens(is_pending, source_rows)


def feed_pending_tokens(
    input_ids: torch.Tensor, is_pending: torch.Tensor, source_rows: torch.Tensor, last_sampled: torch.Tensor
) -> torch.Tensor:
    """Input ids [N] with row ``source_rows[i]`` of the step before's samples wherever ``is_pending[i]`` (all on the
    device)."""
    return torch.where(is_pending, last_sampled[source_rows], input_ids)
