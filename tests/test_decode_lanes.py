"""The scheduler's decode-lanes path (engine/decode_lanes.py) against its general loops, step by step."""

import random

import pytest

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.decode_lanes import DecodeLanes
from nanovllm.engine.scheduler import ScheduledBatch, Scheduler, SchedulerLimits
from nanovllm.engine.sequence import Sequence, StepSamples
from nanovllm.sampling_params import SamplingParams

BLOCK_SIZE = 16
EOS = 0
STOP = 7  # a stop_token_ids entry of some requests
VOCAB = 50


def make_requests(seed: int, num_requests: int) -> list[tuple[list[int], SamplingParams]]:
    """Prompts of 1-40 tokens, max_tokens 1-60; some ignore EOS, some stop on STOP, some ask logprobs."""
    rng = random.Random(seed)
    requests = []
    for _ in range(num_requests):
        prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 41))]
        params = SamplingParams(
            max_tokens=rng.randrange(1, 61),
            ignore_eos=rng.random() < 0.5,
            stop_token_ids=[STOP] if rng.random() < 0.2 else None,
            logprobs=1 if rng.random() < 0.1 else None,
        )
        requests.append((prompt, params))
    return requests


def sample(batch: ScheduledBatch, step: int, seed: int) -> StepSamples:
    """The same tokens for the same sequences in both runs: EOS and STOP now and then, else random."""
    token_ids = [random.Random(f"{seed}/{step}/{seq.num_prompt_tokens}/{seq.token_ids[0]}").choice(
        [EOS, STOP] + list(range(1, VOCAB)) * 4
    ) for seq in batch.seqs]  # fmt: skip
    logprobs = [-1.0 if seq.params.logprobs is not None else None for seq in batch.seqs]
    tops = [
        {token: -1.0} if seq.params.logprobs is not None else None
        for seq, token in zip(batch.seqs, token_ids, strict=True)
    ]
    return StepSamples(token_ids, logprobs, tops)


def state(scheduler: Scheduler, seqs: list[Sequence]) -> list[tuple]:
    return [
        (
            s.token_ids,
            s.num_computed_tokens,
            s.block_table,
            s.block_hashes,
            s.status,
            s.finish_reason,
            s.stop_reason,
            s.output_logprobs,
        )
        for s in seqs
    ] + [(scheduler.block_manager.num_free_blocks, len(scheduler.running), len(scheduler.waiting))]


def stop_or_abort(scheduler: Scheduler, seqs: list[Sequence], step: int) -> None:
    """Now and then, as the engine does: a stop string ends the oldest running sequence, or a client aborts
    the newest unfinished one."""
    if step % 13 == 5 and scheduler.running:
        scheduler.stop(scheduler.running[0], "a stop string")
    if step % 17 == 9:
        unfinished = [seq for seq in seqs if not seq.is_finished]
        if unfinished:
            scheduler.abort(unfinished[-1])


class GeneralLoopsOnly:
    """Wraps a scheduler so that no batch carries lanes: every step takes the general loops."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def schedule(self) -> ScheduledBatch:
        batch = self.scheduler.schedule()
        self.scheduler.lanes = batch.lanes = None
        return batch


@pytest.mark.parametrize("ahead", [False, True], ids=["in_turn", "ahead"])
@pytest.mark.parametrize("seed", range(6))
def test_lanes_match_the_general_loops(seed: int, ahead: bool) -> None:
    """Guards against the lanes' arrays drifting from the sequences: a missed block, a block hash not
    registered, a finish by length or stop token missed or doubled, a preempted, stopped, aborted or
    ended sequence kept."""
    num_blocks = 40 if seed % 2 else 200  # odd seeds: few blocks, so decode preempts
    runs = []
    for use_lanes in (True, False):
        limits = SchedulerLimits(max_num_seqs=12, max_num_batched_tokens=64, max_model_len=128)
        scheduler = Scheduler(BlockManager(num_blocks, BLOCK_SIZE), limits, eos_token_ids={EOS})
        seqs = [Sequence(prompt, params) for prompt, params in make_requests(seed, 30)]
        for seq in seqs:
            scheduler.add(seq)
        runs.append((scheduler, seqs, scheduler if use_lanes else GeneralLoopsOnly(scheduler)))
    num_lane_steps = 0
    in_flight: list = [None, None]
    for step in range(400):
        for run_idx, (scheduler, _, scheduling) in enumerate(runs):
            if not scheduler.has_unfinished() and in_flight[run_idx] is None:
                continue
            batch = scheduling.schedule() if scheduler.has_unfinished() else None
            num_lane_steps += run_idx == 0 and batch is not None and batch.lanes is not None
            if ahead:  # generate()'s order: schedule N+1, record N, (the engine's stop strings), advance N+1
                if in_flight[run_idx] is not None:
                    landed, rows = in_flight[run_idx]
                    scheduler.record_samples(landed, rows, sample(landed, step - 1, seed))
                stop_or_abort(scheduler, runs[run_idx][1], step)
                in_flight[run_idx] = (batch, scheduler.advance(batch)) if batch is not None and batch.seqs else None
            elif batch is not None:
                scheduler.postprocess(batch, sample(batch, step, seed))
                stop_or_abort(scheduler, runs[run_idx][1], step)
        (lanes_scheduler, lanes_seqs, _), (general_scheduler, general_seqs, _) = runs
        assert state(lanes_scheduler, lanes_seqs) == state(general_scheduler, general_seqs), f"step {step}"
    assert all(seq.is_finished for seq in runs[0][1]), "the workload did not finish in 400 steps"
    assert num_lane_steps > 20, f"only {num_lane_steps} steps took the lanes' path"


def test_lanes_follow_a_block_boundary() -> None:
    """Guards against the lanes' slot count going stale: every token of a long decode gets a slot in a block
    the sequence owns, each full block is registered once, and the lanes' path carries the steady steps."""
    limits = SchedulerLimits(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128)
    scheduler = Scheduler(BlockManager(32, BLOCK_SIZE), limits, eos_token_ids={EOS})
    seqs = [Sequence([1] * (5 + 4 * i), SamplingParams(max_tokens=60, ignore_eos=True)) for i in range(4)]
    for seq in seqs:
        scheduler.add(seq)
    num_lane_steps = 0
    while scheduler.has_unfinished():
        batch = scheduler.schedule()
        num_lane_steps += batch.lanes is not None and batch.lanes is scheduler.lanes
        for seq in batch.seqs:
            assert len(seq.block_table) * BLOCK_SIZE >= seq.num_tokens, "the newest token has no slot"
        scheduler.postprocess(
            batch, StepSamples([3] * len(batch.seqs), [None] * len(batch.seqs), [None] * len(batch.seqs))
        )
        for seq in batch.seqs:
            if not seq.is_finished:
                assert len(seq.block_hashes) == seq.num_computed_tokens // BLOCK_SIZE
    assert num_lane_steps >= 55, num_lane_steps
    assert scheduler.block_manager.num_free_blocks == 32


def decoding_seqs(num_tokens: list[int], max_tokens: list[int]) -> list[Sequence]:
    """Sequences mid-decode, as after an advance: every token but the newest computed, and blocks for those
    (a newest token that begins a block lacks its block)."""
    seqs, next_block_id = [], 0
    for num, max_new in zip(num_tokens, max_tokens, strict=True):
        seq = Sequence(list(range(1, num + 1)), SamplingParams(max_tokens=max_new, ignore_eos=True))
        seq.num_prompt_tokens = 1  # so max_tokens counts from the first token on
        seq.num_computed_tokens = num - 1
        num_blocks = -(-seq.num_computed_tokens // BLOCK_SIZE)
        seq.block_table = list(range(next_block_id, next_block_id + num_blocks))
        next_block_id += num_blocks
        seqs.append(seq)
    return seqs


def test_lane_phases_match_the_sequences_at_every_step() -> None:
    """Guards the phase and end tables of DecodeLanes against the rule they stand for, step after step: the
    lanes whose newest token begins a block, those that lack it (once: not again after the scheduler appended
    it), those whose computed tokens fill a block, and those that reach max_tokens. Lanes share phases."""
    num_tokens = [1, 2, 16, 17, 18, 33, 40, 17, 31, 32]
    max_tokens = [80, 75, 70, 90, 57, 85, 79, 90, 90, 90]  # lanes 4 and 6 end first, both at the 40th advance
    seqs = decoding_seqs(num_tokens, max_tokens)
    lanes = DecodeLanes(seqs, BLOCK_SIZE, eos_token_ids={EOS})
    next_block_id = 1000
    for step in range(3 * BLOCK_SIZE):
        beginning = [lane for lane, seq in enumerate(seqs) if (seq.num_tokens - 1) % BLOCK_SIZE == 0]
        assert lanes.lanes_beginning_block() == beginning, f"step {step}"
        lacking = [lane for lane, seq in enumerate(seqs) if seq.num_tokens > len(seq.block_table) * BLOCK_SIZE]
        assert lanes.lanes_without_slot() == lacking, f"step {step}"
        for lane in lacking:  # what the scheduler's append_slot does
            seqs[lane].block_table.append(next_block_id)
            next_block_id += 1
        assert lanes.lanes_without_slot() == [], f"step {step}: a lane asks twice for one block"
        full_block_lanes, ended_lanes = lanes.advance()
        filled = [lane for lane, seq in enumerate(seqs) if seq.num_computed_tokens % BLOCK_SIZE == 0]
        assert full_block_lanes == filled, f"step {step}"
        ended = [lane for lane, seq in enumerate(seqs) if seq.num_output_tokens >= seq.params.max_tokens]
        assert ended_lanes == ended, f"step {step}"
        assert ended == ([4, 6] if step == 39 else []), f"step {step}: {ended}"
        if ended:
            break
        lanes.record([3] * len(seqs))
        assert all(seq.num_computed_tokens == seq.num_tokens - 1 for seq in seqs), f"step {step}"
