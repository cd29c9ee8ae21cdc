"""When a request's first token comes (issue #29): the ordering rules of the engine loop, mixed prefill and decode
steps, and a server whose model takes a fixed time per step, where the time to first token is counted in steps."""

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.scheduler.batch import ScheduledBatch, StepSamples
from nanovllm.scheduler.block_manager import BlockManager
from nanovllm.scheduler.mixed import MixedScheduler
from nanovllm.scheduler.scheduler import SchedulerLimits
from nanovllm.scheduler.sequence import Sequence
from nanovllm.serving.async_llm import AsyncLLM
from tests.test_async_scheduling import mixed_params
from tests.test_engine import BASE_ARGS, random_prompts
from tests.test_server import ENGINE_ARGS, uvicorn_in_thread

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


STEP_S = 0.1  # the stub model's time per step: long next to HTTP on loopback, so that TTFT counts steps
NUM_STREAMS = 6  # requests decoding when the timed one arrives


@dataclass
class StubDevice:
    """A model that takes STEP_S per step on an emulated device (steps queue behind one another) and samples
    token 5 for every row; ``num_launched`` counts the steps launched."""

    num_launched: int = 0
    free_at_s: float = 0.0  # time.perf_counter() when the emulated device has run every step launched

    def launch(self, batch: ScheduledBatch, in_flight: ScheduledBatch | None = None) -> "StubSamples":
        self.num_launched += 1
        self.free_at_s = max(time.perf_counter(), self.free_at_s) + STEP_S
        return StubSamples(len(batch.seqs), self.free_at_s)

    def run(self, batch: ScheduledBatch) -> StepSamples:
        return self.launch(batch).wait(batch.seqs)


@dataclass
class StubSamples:
    num_rows: int  # rows of the step
    ready_s: float  # when the emulated device has run the step

    def wait(self, seqs: list[Sequence]) -> StepSamples:
        time.sleep(max(0.0, self.ready_s - time.perf_counter()))
        return StepSamples([5] * self.num_rows, [None] * self.num_rows, [None] * self.num_rows)


@pytest.fixture
def stub_server(tiny_models: dict[str, Path]) -> Iterator[tuple[str, StubDevice]]:
    """A server (the engine in a thread) whose model is a StubDevice."""
    pytest.importorskip("uvicorn")
    from nanovllm.serving.app import build_app

    async_llm = AsyncLLM.from_engine_args(str(tiny_models["qwen3"]), **ENGINE_ARGS)
    engine = async_llm.engine
    assert engine is not None
    device = StubDevice()
    engine.runner.launch, engine.runner.run = device.launch, device.run  # type: ignore[method-assign,assignment]
    try:
        with uvicorn_in_thread(build_app(async_llm, "stub")) as url:
            yield url, device
    finally:
        async_llm.shutdown()


def test_first_token_within_three_steps_of_arrival_under_load(stub_server: tuple[str, StubDevice]) -> None:
    """Guards the server's path to a first token, counted in steps of a model with a fixed step time: with streams
    decoding, a new request waits at most for the turn in progress, joins the next step launched (queued on the
    device behind the one in flight) and its token is reported as that step ends: within 3 steps of its arrival.
    Counted in launches, that is at most 4 (the turn after launches a step as the chunk goes out). A request
    waiting for the running streams, or outputs held back a step, would take more. The stages of the server's
    time to first token each get observations (/metrics/samples)."""
    url, device = stub_server
    body = {"model": "stub", "prompt": [1, 2, 3, 4], "ignore_eos": True, "stream": True}
    stop = threading.Event()

    def stream_until_stopped() -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "max_tokens": 200}, timeout=60) as response:
            for _ in response.iter_lines():
                if stop.is_set():
                    return

    streams = [threading.Thread(target=stream_until_stopped) for _ in range(NUM_STREAMS)]
    try:
        for thread in streams:
            thread.start()
        while device.num_launched < 5:
            time.sleep(STEP_S)
        ttft_steps = []
        with httpx.Client(base_url=url, timeout=60) as client:  # made first: building one takes 100s of ms
            for _ in range(3):
                time.sleep(STEP_S * 1.37)  # arrive at varied points of a step
                launched_before = device.num_launched
                with client.stream("POST", "/v1/completions", json={**body, "max_tokens": 2}) as response:
                    next(line for line in response.iter_lines() if line.startswith("data: {"))
                    ttft_steps.append(device.num_launched - launched_before)
    finally:
        stop.set()
        for thread in streams:
            thread.join(60)
    assert max(ttft_steps) <= 4, f"first chunks came {ttft_steps} steps after arrival"
    samples = httpx.get(f"{url}/metrics/samples", params={"latest": 1}).json()
    for stage in ("parse", "tokenize", "handoff", "queue", "prefill", "return", "dispatch"):
        assert samples[f"nanovllm:request_{stage}_time_seconds"]["count"] >= 3, (stage, samples)
    prefill_s = samples["nanovllm:request_prefill_time_seconds"]["latest"][0]
    assert STEP_S <= prefill_s <= 3.5 * STEP_S, f"prefill stage {prefill_s:.3f} s, {STEP_S} s a step"


def test_host_step_benchmark_smoke_run(tiny_model_dir: Any) -> None:
    """Guards benchmarks/host_step.py itself (the host's work per decode step, model stubbed): its --smoke run
    times decode turns with text on and off, each turn checked to report one output per running sequence."""
    root = Path(__file__).resolve().parents[1]
    model = tiny_model_dir("qwen3")
    command = [sys.executable, "benchmarks/host_step.py", "--smoke", "--model", str(model)]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "host_step smoke run done" in result.stdout


def test_engine_ttft_benchmark_times_the_prompt_turns() -> None:
    """Guards benchmarks/engine_ttft.py itself on CPU: it must start (its folder's kernels.py once shadowed the
    package transformers imports), time the turn that admits the prompts in its parts, and with --profile print
    that turn's Python functions."""
    root = Path(__file__).resolve().parents[1]
    flags = ["--concurrency", "4", "--rounds", "1", "--max-tokens", "4", "--profile"]
    result = subprocess.run(
        [sys.executable, "benchmarks/engine_ttft.py", *flags], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for line in ("4 requests, 4 clients: time to first token", "of which launching", "Python functions by host time"):
        assert line in result.stdout, result.stdout[-3000:]
