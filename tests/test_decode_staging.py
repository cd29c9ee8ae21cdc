"""The host side of CUDA-graph decode: staging a batch into the lanes of the pinned input buffers."""

import random

import numpy as np
import torch

from nanovllm.runner.decode_staging import DecodeStaging
from nanovllm.runner.model_inputs import PendingTokens
from nanovllm.sampling_params import SamplingParams
from nanovllm.scheduler.batch import ScheduledBatch, StepSamples
from nanovllm.scheduler.block_manager import BlockManager
from nanovllm.scheduler.scheduler import Scheduler, SchedulerLimits
from nanovllm.scheduler.sequence import Sequence

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
    assert all(h["input_ids"][len(seqs) : bucket] == 0)  # a valid token for the embedding


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
        if step == 20:
            num_blocks = len(seqs[4].block_table)  # lane 4 re-allocated: same length, other blocks
            seqs[4].block_table = list(range(60, 60 + num_blocks))
        if step == 25:
            seqs[3].block_table[-1] = 70  # the last block replaced in place
        if step == 30:
            seqs.pop(0)  # a sequence finished: every later one moves up a lane
        staging.stage(ScheduledBatch(seqs, [1] * len(seqs), is_prefill=False), bucket=8)
        check_lanes(staging, seqs, bucket=8)


def test_stage_follows_the_scheduler() -> None:
    """Guards staging against the scheduler's decode steps: across block boundaries, sequences that end and
    leave their lanes, and prefill steps in between."""
    limits = SchedulerLimits(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=MAX_BLOCKS * BLOCK_SIZE)
    scheduler = Scheduler(BlockManager(64, BLOCK_SIZE), limits, eos_token_ids={0})
    for i in range(6):
        scheduler.add(Sequence([1 + i] * (3 + 7 * i), SamplingParams(max_tokens=20 + 9 * i, ignore_eos=True)))
    staging = DecodeStaging(max_num_seqs=8, max_blocks=MAX_BLOCKS, block_size=BLOCK_SIZE, pin_memory=False)
    num_decode_steps = 0
    for _ in range(200):
        if not scheduler.has_unfinished():
            break
        batch = scheduler.schedule()
        if not batch.is_prefill:
            num_decode_steps += 1
            staging.stage(batch, bucket=8)
            check_lanes(staging, batch.seqs, bucket=8)
        num_rows = len(batch.seqs)
        scheduler.postprocess(batch, StepSamples([3] * num_rows, [None] * num_rows, [None] * num_rows))
    assert not scheduler.has_unfinished(), "the requests did not finish in 200 steps"
    assert num_decode_steps > 50, num_decode_steps


def test_pending_lanes_are_marked_and_take_no_host_token() -> None:
    """Guards the staging of pending tokens (scheduling ahead): a lane whose newest token is still on the device
    says where it is (is_pending, source_rows) and stages no token of its own, at the position after the
    tokens the host has."""
    seqs = [decoding_seq(i, 10 + i, first_block=i * MAX_BLOCKS) for i in range(4)]
    for seq in seqs[:3]:
        seq.num_pending_tokens = 1  # sampled by the step in flight; lane 3 came back from preemption
        seq.num_computed_tokens += 1
    staging = DecodeStaging(max_num_seqs=8, max_blocks=MAX_BLOCKS, block_size=BLOCK_SIZE, pin_memory=False)
    pending = PendingTokens(np.array([True, True, True, False]), np.array([2, 0, 1, 0], dtype=np.int64))
    staging.stage(ScheduledBatch(seqs, [1] * len(seqs), is_prefill=False), bucket=8, pending=pending)
    h = staging.arrays
    assert list(h["is_pending"][:4]) == [True, True, True, False]
    assert list(h["source_rows"][:4]) == [2, 0, 1, 0]
    assert list(h["input_ids"][:4]) == [0, 0, 0, seqs[3].token_ids[-1]]
    # A pending token sits after the tokens the host has; lane 3's newest token is the last it has.
    assert list(h["positions"][:4]) == [len(seq.token_ids) for seq in seqs[:3]] + [len(seqs[3].token_ids) - 1]
    assert not h["is_pending"][4:8].any(), "padded lanes are never pending"


def test_one_copy_of_the_buffer_prefix_carries_every_field_of_the_bucket() -> None:
    """Guards the single host-to-device copy: the prefix num_bytes(bucket) of the staging buffer, viewed in
    the same layout, must hold every field's first ``bucket`` lanes (block tables last, lane-major)."""
    staging = DecodeStaging(max_num_seqs=40, max_blocks=MAX_BLOCKS, block_size=BLOCK_SIZE, pin_memory=False)
    seqs = [decoding_seq(i, 3 + 5 * i, first_block=i) for i in range(20)]
    staging.stage(ScheduledBatch(seqs, [1] * len(seqs), is_prefill=False), bucket=32)
    copy = torch.full_like(staging.buffer, 0xAB)  # what a device buffer may hold from an earlier step
    num_bytes = staging.num_bytes(32)
    copy[:num_bytes] = staging.buffer[:num_bytes]
    for name, field in staging.fields_of(copy).items():
        assert torch.equal(field[:32], staging.host[name][:32]), name
    assert num_bytes < staging.buffer.numel()  # lanes 32.. of the block tables are not copied
