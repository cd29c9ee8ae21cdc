"""When a request's first token comes (issue #29): the ordering rules of the engine loop, and mixed prefill and decode
steps."""

from pathlib import Path
from typing import Any

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.scheduler.batch import ScheduledBatch, StepSamples
from nanovllm.scheduler.block_manager import BlockManager
from nanovllm.scheduler.mixed import MixedScheduler
from nanovllm.scheduler.scheduler import SchedulerLimits
from nanovllm.scheduler.sequence import Sequence
from tests.test_async_scheduling import mixed_params
from tests.test_engine import BASE_ARGS, random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
MAX_CALLS = 10  # step() calls a test waits for a first token; it comes within 5


def spy_on_launches(llm: LLM) -> list[ScheduledBatch]:
    """The batches the engine launches from now on, in order (a copy of each row's sequence list)."""
    engine = llm.engine
    assert engine is not None
    launched: list[ScheduledBatch] = []
    run, launch = engine.runner.run, engine.runner.launch

    def spy_run(batch: ScheduledBatch) -> Any:
        launched.append(ScheduledBatch(list(batch.seqs), list(batch.num_new_tokens), batch.is_prefill))
        return run(batch)

    def spy_launch(batch: ScheduledBatch, in_flight: ScheduledBatch | None) -> Any:
        launched.append(ScheduledBatch(list(batch.seqs), list(batch.num_new_tokens), batch.is_prefill))
        return launch(batch, in_flight)

    engine.runner.run, engine.runner.launch = spy_run, spy_launch  # type: ignore[method-assign]
    return launched


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["ahead", "in turn"])
@pytest.mark.parametrize("max_num_prefill_tokens", [None, 8], ids=["prefill steps", "mixed steps"])
def test_a_request_joins_the_next_step_and_its_first_token_comes_the_step_after(
    tiny_models: dict[str, Path], async_scheduling: bool, max_num_prefill_tokens: int | None
) -> None:
    """Guards the ordering rules of serving: a request added while a step is in flight is in the very next step
    launched, and its first token is reported by the call that records its (last) prefill step: the next call
    where the engine schedules ahead, the same call otherwise; never later. Its 20-token prompt takes 3 mixed
    steps (8 + 8 + 4 tokens), each of which also decodes the request already running."""
    args = dict(max_num_prefill_tokens=max_num_prefill_tokens, async_scheduling=async_scheduling)
    with LLM(str(tiny_models["qwen3"]), num_kvcache_blocks=64, **BASE_ARGS, **args) as llm:
        engine = llm.engine
        assert engine is not None
        launched = spy_on_launches(llm)
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=30, ignore_eos=True), request_id="running")
        for _ in range(3):
            engine.step()  # "running" is decoding; where the engine schedules ahead, a step is in flight
        num_launched = len(launched)
        engine.add_request(list(range(10, 30)), GREEDY, request_id="late")
        calls: list[list[str]] = []
        while not any("late" in ids for ids in calls) and len(calls) < MAX_CALLS:
            calls.append([out.request_id for out in engine.step() if out.new_token_ids])
    late_chunks = prompt_chunks(launched, num_prompt_tokens=20)  # step index -> tokens of "late" it prefilled
    first_step, last_step = min(late_chunks), max(late_chunks)
    assert first_step == num_launched, f"launched at step {first_step}; the next step was {num_launched}"
    last_prefill_call = last_step - num_launched  # each call launches one step
    expected_call = last_prefill_call + 1 if async_scheduling else last_prefill_call
    assert len(calls) - 1 == expected_call, (calls, late_chunks, num_launched)
    if max_num_prefill_tokens is not None:
        assert list(late_chunks.values()) == [8, 8, 4], late_chunks
        assert all(launched[step].num_tokens == num + 1 for step, num in late_chunks.items()), "no decode beside"


def prompt_chunks(launched: list[ScheduledBatch], num_prompt_tokens: int) -> dict[int, int]:
    """The steps that prefilled the one prompt of ``num_prompt_tokens`` tokens: step index -> its chunk's tokens."""
    chunks: dict[int, int] = {}
    for step, batch in enumerate(launched):
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            if seq.num_prompt_tokens == num_prompt_tokens and sum(chunks.values()) < num_prompt_tokens:
                chunks[step] = num_new
    return chunks


def decode_then_chunk(scheduler_budget: int) -> list[ScheduledBatch]:
    """A MixedScheduler (no model: every row samples token 5) with two sequences decoding, then a 40-token prompt;
    the steps until that prompt's first token."""
    limits = SchedulerLimits(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=256)
    scheduler = MixedScheduler(BlockManager(32, 16), limits, {0}, scheduler_budget)
    running = [Sequence([1, 2, 3], SamplingParams(max_tokens=50)) for _ in range(2)]
    long_prompt = Sequence(list(range(1, 41)), SamplingParams(max_tokens=4))
    steps = []
    for seq in [*running, long_prompt]:
        scheduler.add(seq)
        while True:
            batch = scheduler.schedule()
            steps.append(batch)
            num_rows = len(batch.seqs)
            scheduler.postprocess(batch, StepSamples([5] * num_rows, [None] * num_rows, [None] * num_rows))
            if seq.num_output_tokens:
                break
    return steps[2:]  # from the long prompt's arrival on


def test_mixed_steps_keep_every_running_sequence_decoding() -> None:
    """Guards chunked prefill for serving: while a long prompt is prefilled in chunks of at most the budget, every
    step still decodes every running sequence (with prefill steps apart, they would wait for all its chunks)."""
    steps = decode_then_chunk(scheduler_budget=16)
    assert [batch.num_new_tokens for batch in steps] == [[1, 1, 16], [1, 1, 16], [1, 1, 8]], steps
    assert all(batch.is_prefill for batch in steps)  # decode rows ride in a prefill (varlen) step


def test_mixed_steps_give_the_same_tokens(tiny_models: dict[str, Path]) -> None:
    """Guards the mixed step's bookkeeping against prefill steps apart: decode rows in a varlen step reading their
    pending tokens on the device (scheduling ahead), stop tokens, seeds and penalties, preemption (a sequence
    preempted by a step's decode part must not be prefilled in the same step), and every block freed."""
    args = {**BASE_ARGS, "num_kvcache_blocks": 8, "max_model_len": 64}
    prompts = random_prompts(9, 5, 30, seed=21)
    with LLM(str(tiny_models["qwen3"]), **args) as llm:
        stop_tokens = [out.token_ids[3] for out in llm.generate(prompts, GREEDY, use_tqdm=False)]
        params = mixed_params(stop_tokens)
        expected = [(out.token_ids, out.finish_reason) for out in llm.generate(prompts, params, use_tqdm=False)]
    with LLM(str(tiny_models["qwen3"]), max_num_prefill_tokens=7, **args) as llm:
        launched = spy_on_launches(llm)
        got = [(out.token_ids, out.finish_reason) for out in llm.generate(prompts, params, use_tqdm=False)]
        engine = llm.engine
        assert engine is not None and engine.schedules_ahead
        block_manager = engine.scheduler.block_manager
        assert block_manager.num_free_blocks == block_manager.num_blocks
        assert engine.scheduler.num_preemptions > 0, "the test must preempt"
    num_mixed = sum(batch.is_prefill and 1 in batch.num_new_tokens for batch in launched)
    assert num_mixed > 10, f"only {num_mixed} mixed steps"
    assert got == expected
