"""The host side of CUDA-graph decode: staging a batch into the lanes of the pinned input buffers."""

import random

from nanovllm.engine.cuda_graphs import DecodeStaging
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

BLOCK_SIZE = 16
MAX_BLOCKS = 8


def decoding_seq(index: int, num_tokens: int, first_block: int) -> Sequence:
    seq = Sequence([index] * num_tokens, SamplingParams(temperature=0.1 * index))
    seq.block_table = list(range(first_block, first_block + seq.num_blocks_needed(BLOCK_SIZE)))
    seq.num_computed_tokens = num_tokens - 1
    return seq


def check_lanes(staging: DecodeStaging, seqs: list[Sequence], bucket: int) -> None:
    h = staging.arrays
    for lane, seq in enumerate(seqs):
        pos = seq.num_tokens - 1
        slot = seq.block_table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
        got = (h["input_ids"][lane], h["positions"][lane], h["context_lens"][lane], h["slot_mapping"][lane])
        assert got == (seq.token_ids[-1], pos, pos + 1, slot), (lane, got)
        assert list(h["block_tables"][lane, : len(seq.block_table)]) == seq.block_table, lane
    assert all(h["slot_mapping"][len(seqs) : bucket] == -1) and all(h["context_lens"][len(seqs) : bucket] == 0)
    assert all(h["input_ids"][len(seqs) : bucket] == 0)  # a valid token for the embedding, not PENDING_TOKEN


def test_stage_matches_per_sequence_rule_across_steps() -> None:
    """Guards against a stale block-table row when a lane gets a new block, a new sequence or a re-allocated one."""
    rng = random.Random(0)
    seqs = [decoding_seq(i, rng.randint(1, 80), first_block=i * MAX_BLOCKS) for i in range(6)]
    staging = DecodeStaging(max_num_seqs=8, max_blocks=MAX_BLOCKS, block_size=BLOCK_SIZE, pin_memory=False)
    for step in range(40):
        for seq in seqs:  # one decode step: a sampled token, and a block when the last one is full
            seq.token_ids.append(step)
            if len(seq.block_table) * BLOCK_SIZE < seq.num_tokens:
                seq.block_table.append(seq.block_table[-1] + 1)
        if step == 10:
            seqs[2] = decoding_seq(50, 30, first_block=3)  # a different sequence takes lane 2
        # A table changes other than by appending only when its sequence is preempted and prefilled
        # again: that prefill runs outside the graphs, and the runner then calls forget().
        if step == 20:
            num_blocks = len(seqs[4].block_table)  # lane 4 re-allocated: same length, other blocks
            seqs[4].block_table = list(range(60, 60 + num_blocks))
            staging.forget()
        if step == 25:
            seqs[3].block_table[-1] = 70  # the last block replaced in place
            staging.forget()
        if step == 30:
            seqs.pop(0)  # a sequence finished: every later one moves up a lane
        staging.stage(ScheduledBatch(seqs, [1] * len(seqs), is_prefill=False), bucket=8)
        check_lanes(staging, seqs, bucket=8)


def test_same_batch_fast_path_equals_full_staging() -> None:
    """Guards the in-place update for an unchanged batch (positions + 1, tables re-read only on a new block)
    against full staging, across block boundaries, and against staging one step twice (no double step)."""
    rng = random.Random(1)
    seqs = [decoding_seq(i, rng.randint(1, 40), first_block=i * MAX_BLOCKS) for i in range(5)]
    fast = DecodeStaging(max_num_seqs=8, max_blocks=MAX_BLOCKS, block_size=BLOCK_SIZE, pin_memory=False)
    for step in range(70):
        for seq in seqs:
            seq.token_ids.append(step)
            if len(seq.block_table) * BLOCK_SIZE < seq.num_tokens:
                seq.block_table.append(seq.block_table[-1] + 1)
        batch = ScheduledBatch(seqs, [1] * len(seqs), is_prefill=False)
        fast.stage(batch, bucket=8)
        if step % 7 == 0:
            fast.stage(batch, bucket=8)  # staged again for the same step, as benchmarks/host_overhead.py does
        check_lanes(fast, seqs, bucket=8)
        full = DecodeStaging(max_num_seqs=8, max_blocks=MAX_BLOCKS, block_size=BLOCK_SIZE, pin_memory=False)
        full.stage(batch, bucket=8)
        for name in full.arrays:
            assert (fast.arrays[name][: len(seqs)] == full.arrays[name][: len(seqs)]).all(), (step, name)
