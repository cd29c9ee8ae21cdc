"""build_model_inputs against the per-token rule it vectorizes."""

import random

import torch

from nanovllm.runner.model_inputs import build_model_inputs
from nanovllm.sampling_params import SamplingParams
from nanovllm.scheduler.batch import ScheduledBatch
from nanovllm.scheduler.sequence import Sequence

BLOCK_SIZE = 16


def test_positions_and_slots_follow_each_sequences_blocks() -> None:
    """Guards against a token given another sequence's position or block (cached prefixes, prompt chunks,
    decode rows and block tables of different lengths in one batch)."""
    rng = random.Random(0)
    seqs, num_new_tokens = [], []
    for index in range(7):
        num_tokens = rng.randint(1, 90)
        seq = Sequence([rng.randrange(400) for _ in range(num_tokens)], SamplingParams())
        seq.num_computed_tokens = rng.randint(0, num_tokens - 1)  # a cached prefix or earlier chunks
        seq.block_table = rng.sample(range(100), seq.num_blocks_needed(BLOCK_SIZE) + index % 2)  # a spare block too
        seqs.append(seq)
        num_new_tokens.append(rng.randint(1, num_tokens - seq.num_computed_tokens))
    inputs = build_model_inputs(ScheduledBatch(seqs, num_new_tokens, is_prefill=True), BLOCK_SIZE, torch.device("cpu"))

    want_ids, want_positions, want_slots = [], [], []
    for seq, num_new in zip(seqs, num_new_tokens, strict=True):
        for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + num_new):
            want_ids.append(seq.token_ids[pos])
            want_positions.append(pos)
            want_slots.append(seq.block_table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
    assert inputs.input_ids.tolist() == want_ids
    assert inputs.positions.tolist() == want_positions
    assert inputs.attention.slot_mapping.tolist() == want_slots
    ends = [seq.num_computed_tokens + n for seq, n in zip(seqs, num_new_tokens, strict=True)]
    assert inputs.attention.context_lens.tolist() == ends and inputs.attention.max_context_len == max(ends)
    assert inputs.attention.cu_seqlens_q.tolist() == [sum(num_new_tokens[:i]) for i in range(len(seqs) + 1)]
    assert inputs.last_token_indices.tolist() == [sum(num_new_tokens[: i + 1]) - 1 for i in range(len(seqs))]
    tables = inputs.attention.block_tables.tolist()
    assert all(row[: len(seq.block_table)] == seq.block_table for row, seq in zip(tables, seqs, strict=True))
