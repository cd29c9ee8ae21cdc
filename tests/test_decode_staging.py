"""The host side of CUDA-graph decode: staging a batch into the lanes of the pinned input buffers."""

import random

import numpy as np
import torch

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.decode_staging import DecodeStaging
from nanovllm.engine.scheduler import ScheduledBatch, Scheduler, SchedulerLimits
from nanovllm.engine.sequence import Sequence, StepSamples
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


def test_fast_path_follows_the_scheduler_lanes() -> None:
    """Guards the fast path's new-block lanes where the scheduler's decode lanes name them (no array
    arithmetic): across block boundaries, lanes rebuilt when a sequence ends, one step staged twice."""
    limits = SchedulerLimits(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=MAX_BLOCKS * BLOCK_SIZE)
    scheduler = Scheduler(BlockManager(64, BLOCK_SIZE), limits, eos_token_ids={0})
    for i in range(6):
        scheduler.add(Sequence([1 + i] * (3 + 7 * i), SamplingParams(max_tokens=20 + 9 * i, ignore_eos=True)))
    staging = DecodeStaging(max_num_seqs=8, max_blocks=MAX_BLOCKS, block_size=BLOCK_SIZE, pin_memory=False)
    num_lane_steps = 0
    for step in range(200):
        if not scheduler.has_unfinished():
            break
        batch = scheduler.schedule()
        if batch.is_prefill:
            staging.forget()  # as the runner does after a step run without this staging
        else:
            num_lane_steps += batch.lanes is not None
            for _ in range(1 + (step % 5 == 0)):  # now and then staged twice, as benchmarks/host_overhead.py does
                staging.stage(batch, bucket=8)
                check_lanes(staging, batch.seqs, bucket=8)
        num_rows = len(batch.seqs)
        scheduler.postprocess(batch, StepSamples([3] * num_rows, [None] * num_rows, [None] * num_rows))
    assert not scheduler.has_unfinished(), "the requests did not finish in 200 steps"
    assert num_lane_steps > 50, f"only {num_lane_steps} steps carried the scheduler's lanes"


def test_fed_lanes_skip_the_host_token_and_unfed_ones_read_it() -> None:
    """Guards the fast path's skipped token read: a lane fed from the device's last samples (async
    scheduling) says so in feed_rows, and a step staged without feeding reads every newest token again."""
    seqs = [decoding_seq(i, 10 + i, first_block=i * MAX_BLOCKS) for i in range(4)]
    staging = DecodeStaging(max_num_seqs=8, max_blocks=MAX_BLOCKS, block_size=BLOCK_SIZE, pin_memory=False)
    all_rows = np.arange(len(seqs), dtype=np.int64)
    for step in range(12):
        for seq in seqs:
            seq.token_ids.append(100 + step)
            if len(seq.block_table) * BLOCK_SIZE < seq.num_tokens:
                seq.block_table.append(seq.block_table[-1] + 1)
        fed = step % 3 != 2  # two steps fed from the device, then one from the host
        staging.stage(ScheduledBatch(seqs, [1] * len(seqs), is_prefill=False), 8, all_rows if fed else None)
        h = staging.arrays
        assert list(h["feed_rows"][: len(seqs)]) == (list(all_rows) if fed else [-1] * len(seqs)), step
        if not fed:
            check_lanes(staging, seqs, bucket=8)
        assert list(h["positions"][: len(seqs)]) == [seq.num_tokens - 1 for seq in seqs], step


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
