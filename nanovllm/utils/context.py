"""The per-forward attention context: the one piece of scoped global state.

The model's ``forward`` takes ``input_ids`` and ``positions`` as arguments like any
PyTorch module. What only the attention layers need (where each sequence starts in
the flat batch, where to write new K/V, which cache blocks to read) travels here, so
that the model code between embedding and LM head stays free of inference plumbing.
It is set only through :func:`attention_context`, which always resets it.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from nanovllm.utils.lora_metadata import LoRAMetadata


@dataclass(frozen=True)
class AttentionMetadata:
    """Where each sequence's tokens sit in the flat batch and in the paged KV cache.

    A batch of B sequences is flattened into N tokens. Sequence b contributes the query
    tokens ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``, which are its last tokens: after this
    step its cache holds ``context_lens[b]`` tokens (earlier cached ones plus these new
    ones), and query token i of it sits at position ``context_lens[b] - q_len + i``.

        flat tokens:   | seq 0 (3 new) | seq 1 (1 new) | seq 2 (2 new) |
        cu_seqlens_q:  0               3               4               6
    """

    is_prefill: bool  # False only when every sequence has exactly one query token (decode)
    cu_seqlens_q: torch.Tensor  # [B + 1] int32, offsets of each sequence's query tokens
    max_seqlen_q: int  # longest query of the batch, in tokens
    context_lens: torch.Tensor  # [B] int32, tokens in cache per sequence after this step
    max_context_len: int  # largest of context_lens, in tokens
    slot_mapping: torch.Tensor  # [N] int64, cache slot (block_id * block_size + offset) per token; -1 = skip
    block_tables: torch.Tensor  # [B, max_blocks] int32, cache block ids per sequence, padded with 0
    lora: LoRAMetadata | None = None  # each token's adapter slot when the engine serves LoRA adapters


_current: AttentionMetadata | None = None


@contextmanager
def attention_context(metadata: AttentionMetadata) -> Iterator[None]:
    """Make ``metadata`` visible to the attention layers for one forward pass."""
    global _current
    _current = metadata
    try:
        yield
    finally:
        _current = None


def get_attention_metadata() -> AttentionMetadata:
    """The metadata of the forward pass in progress; an error outside one."""
    if _current is None:
        raise RuntimeError("attention layers ran outside attention_context(); the model runner sets it")
    return _current
