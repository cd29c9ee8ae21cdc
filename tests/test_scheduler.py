"""Scheduler unit tests: a fake model that samples a fixed token, no model, no GPU."""

import pytest

from nanovllm.sampling_params import SamplingParams
from nanovllm.scheduler.batch import StepSamples
from nanovllm.scheduler.block_manager import BlockManager
from nanovllm.scheduler.scheduler import Scheduler, SchedulerLimits
from nanovllm.scheduler.sequence import Sequence, SequenceStatus

BLOCK_SIZE = 16
EOS = 0
SAMPLED = 5  # the token our fake model always samples


def make_scheduler(num_blocks: int = 16, max_num_seqs: int = 8, max_tokens: int = 256, max_len: int = 256):
    limits = SchedulerLimits(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_tokens, max_model_len=max_len)
    return Scheduler(BlockManager(num_blocks, BLOCK_SIZE), limits, eos_token_ids={EOS})


def make_seq(index: int, num_prompt_tokens: int, max_tokens: int = 4) -> Sequence:
    return Sequence([1 + index] * num_prompt_tokens, SamplingParams(max_tokens=max_tokens))


def run_step(scheduler: Scheduler, token: int = SAMPLED):
    batch = scheduler.schedule()
    num_rows = len(batch.seqs)
    return batch, scheduler.postprocess(batch, StepSamples([token] * num_rows, [None] * num_rows, [None] * num_rows))


def test_prefill_then_decode_until_max_tokens() -> None:
    """Guards against an off-by-one in max_tokens and against sequences that never finish."""
    scheduler = make_scheduler()
    seq = make_seq(0, 10, max_tokens=3)
    scheduler.add(seq)
    batch, _ = run_step(scheduler)
    assert batch.is_prefill and batch.num_new_tokens == [10]
    for _ in range(2):
        batch, finished = run_step(scheduler)
        assert not batch.is_prefill and batch.num_new_tokens == [1]
    assert finished == [seq] and seq.finish_reason == "length" and seq.num_output_tokens == 3
    assert not scheduler.has_unfinished()
    assert scheduler.block_manager.num_free_blocks == 16


def test_eos_stops_unless_ignored() -> None:
    """Guards against ignoring EOS, and against ignore_eos being ignored."""
    scheduler = make_scheduler()
    stops = make_seq(0, 4)
    keeps_going = Sequence([3] * 4, SamplingParams(max_tokens=2, ignore_eos=True))
    scheduler.add(stops)
    scheduler.add(keeps_going)
    _, finished = run_step(scheduler, token=EOS)
    assert finished == [stops] and stops.finish_reason == "stop"
    _, finished = run_step(scheduler, token=EOS)
    assert finished == [keeps_going] and keeps_going.finish_reason == "length"


def test_long_prompt_is_prefilled_in_chunks() -> None:
    """Guards against a prompt longer than the token budget being refused or sampled mid-prompt."""
    scheduler = make_scheduler(max_tokens=32)
    seq = make_seq(0, 80, max_tokens=2)
    scheduler.add(seq)
    chunks = []
    while seq.num_output_tokens == 0:
        batch, _ = run_step(scheduler)
        assert batch.is_prefill
        chunks.append(batch.num_new_tokens[0])
    assert chunks == [32, 32, 16], chunks
    assert seq.num_computed_tokens == 80 and seq.output_token_ids == [SAMPLED]


def test_token_budget_and_sequence_cap() -> None:
    """Guards against a step exceeding max_num_batched_tokens or max_num_seqs."""
    scheduler = make_scheduler(max_num_seqs=3, max_tokens=40)
    for i in range(5):
        scheduler.add(make_seq(i, 15))
    batch, _ = run_step(scheduler)
    assert batch.num_tokens <= 40 and len(batch.seqs) <= 3, batch.num_new_tokens
    while scheduler.has_unfinished():
        batch, _ = run_step(scheduler)
        assert batch.num_tokens <= 40, batch.num_new_tokens
        assert len(scheduler.running) <= 3


def test_preemption_frees_newest_and_resumes_it_first() -> None:
    """Guards against deadlock when blocks run out, and against preempted work losing its tokens."""
    scheduler = make_scheduler(num_blocks=4)
    old, new = make_seq(0, BLOCK_SIZE * 2, max_tokens=20), make_seq(1, BLOCK_SIZE * 2 - 1, max_tokens=20)
    scheduler.add(old)
    scheduler.add(new)
    run_step(scheduler)  # both prefilled: all 4 blocks used; each sampled one token
    run_step(scheduler)  # decode: `old`'s token 33 needs a 5th block, so `new` (the newest) is preempted
    assert new.status == SequenceStatus.WAITING and scheduler.waiting[0] is new, scheduler.waiting
    assert new.num_output_tokens == 1 and new.block_table == [], (new.output_token_ids, new.block_table)
    while scheduler.has_unfinished():
        run_step(scheduler)
    assert old.num_output_tokens == 20 and new.num_output_tokens == 20
    assert scheduler.block_manager.num_free_blocks == 4


@pytest.mark.parametrize("num_free", [3, 2])
def test_decode_gives_each_sequence_beginning_a_block_a_new_one(num_free: int) -> None:
    """Guards the decode step's shortcut (one pass over the running sequences) against the general loop:
    with a free block for every sequence whose newest token begins a block, all of them decode, oldest
    first; with one block too few, the newest is preempted, as when the sequences are taken one by one."""
    scheduler = make_scheduler(num_blocks=3 + num_free)
    seqs = [make_seq(i, 16, max_tokens=8) for i in range(3)]  # each prompt fills one block exactly
    for seq in seqs:
        scheduler.add(seq)
    run_step(scheduler)  # prefill; each newest token (position 16) needs a second block
    batch = scheduler.schedule()
    if num_free == 3:
        assert batch.seqs == seqs and scheduler.num_preemptions == 0
        assert [seq.block_table[1] for seq in seqs] == sorted(seq.block_table[1] for seq in seqs)
    else:
        assert batch.seqs == seqs[:2] and scheduler.num_preemptions == 1
        assert seqs[2].status is SequenceStatus.WAITING and not seqs[2].block_table
    assert all(len(seq.block_table) == 2 for seq in batch.seqs)


@pytest.mark.parametrize(
    ("num_prompt_tokens", "max_tokens", "message"),
    [(0, 4, "empty"), (250, 10, "max_model_len"), (100, 100, "KV-cache blocks")],
)
def test_impossible_requests_are_refused(num_prompt_tokens: int, max_tokens: int, message: str) -> None:
    """Guards against requests that could never run hanging the engine instead of failing when added."""
    scheduler = make_scheduler(num_blocks=8)  # 8 blocks = 128 tokens < max_model_len 256
    with pytest.raises(ValueError, match=message):
        scheduler.add(make_seq(0, num_prompt_tokens, max_tokens=max_tokens))
    assert not scheduler.has_unfinished()


def samples_of(tokens: list[int]) -> StepSamples:
    return StepSamples(tokens, [None] * len(tokens), [None] * len(tokens))


def test_step_ahead_with_a_stop_token_and_a_preemption_in_flight() -> None:
    """Guards the two-phase bookkeeping of async scheduling: step N+1 is scheduled after advance(N) and
    before record_samples(N). A sequence preempted by that schedule while its token was pending, then
    ended by that token, must leave the waiting queue; a sequence ended by a stop token must not be
    advanced again in step N+1 (its wasted row); every block must come back."""
    scheduler = make_scheduler(num_blocks=3)  # 48 slots: two 16-token prompts fill two blocks
    first, second = make_seq(0, 16, max_tokens=8), make_seq(1, 16, max_tokens=8)
    scheduler.add(first)
    scheduler.add(second)
    prefill = scheduler.schedule()
    rows = scheduler.advance(prefill)  # both prompts done: each has a pending token at position 16
    assert rows == [0, 1] and first.num_pending_tokens == second.num_pending_tokens == 1
    assert first.num_tokens == second.num_tokens == 17 and len(first.token_ids) == 16
    decode = scheduler.schedule()  # each needs a block for position 16: one is free, so `second` is preempted
    assert decode.seqs == [first] and second.status is SequenceStatus.WAITING and scheduler.num_preemptions == 1
    finished = scheduler.record_samples(prefill, rows, samples_of([SAMPLED, EOS]))  # second sampled EOS
    assert finished == [second] and second.finish_reason == "stop" and second.token_ids[-1] == EOS
    assert not scheduler.waiting and list(scheduler.running) == [first]
    # `first` samples EOS in the decode step; the step after it was scheduled meanwhile, with a wasted row.
    decode_rows = scheduler.advance(decode)
    ahead = scheduler.schedule()
    assert ahead.seqs == [first]
    finished = scheduler.record_samples(decode, decode_rows, samples_of([EOS]))
    assert finished == [first] and first.num_output_tokens == 2
    assert scheduler.advance(ahead) == [] and first.num_output_tokens == 2  # the wasted row records nothing
    assert not scheduler.has_unfinished() and scheduler.block_manager.num_free_blocks == 3


def test_decode_follows_block_boundaries() -> None:
    """Guards the decode bookkeeping at block boundaries: every token of a long decode gets a slot in a block the
    sequence owns, each full block is registered once, and every block comes back at the end."""
    limits = SchedulerLimits(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128)
    scheduler = Scheduler(BlockManager(32, BLOCK_SIZE), limits, eos_token_ids={EOS})
    seqs = [Sequence([1] * (5 + 4 * i), SamplingParams(max_tokens=60, ignore_eos=True)) for i in range(4)]
    for seq in seqs:
        scheduler.add(seq)
    while scheduler.has_unfinished():
        batch = scheduler.schedule()
        for seq in batch.seqs:
            assert len(seq.block_table) * BLOCK_SIZE >= seq.num_tokens, "the newest token has no slot"
        scheduler.postprocess(batch, samples_of([3] * len(batch.seqs)))
        for seq in batch.seqs:
            if not seq.is_finished:
                assert len(seq.block_hashes) == seq.num_computed_tokens // BLOCK_SIZE
    assert all(seq.num_output_tokens == 60 for seq in seqs)
    assert scheduler.block_manager.num_free_blocks == 32
