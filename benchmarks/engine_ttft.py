"""Time to first token of the engine behind the server, without HTTP: AsyncLLM driven by asyncio clients.

    python benchmarks/engine_ttft.py                                  # CPU, the tiny test model
    python benchmarks/engine_ttft.py --dummy-shape qwen3-0.6b         # GPU, random weights of a bench.py shape
    python benchmarks/engine_ttft.py --engine-process                 # the engine in its own process

--concurrency clients each send --rounds requests back to back (--prompt-len random token ids,
exactly --max-tokens output tokens), as benchmarks/serve_load.py does over HTTP. Since every request
has the same length, the clients' requests end on the same step and the next ones arrive together:
each round is a burst that one prefill step (or several, under --max-num-batched-tokens) takes in.
Prints time to first token (add_requests() to the first output) p50/p90, and the engine steps that
had prompts waiting, with their durations (not with --engine-process: the steps run elsewhere). On one
GPU the engine loop steps ahead (LLMEngine.step schedules ahead): a step's duration is then its loop turn, which
launches the step and waits for the one before it. Each decode turn's time waiting for the device's samples
is printed beside it: a loop that hardly waits is bound by the host (the engine's turn, and in a thread the
event loop sharing its GIL), one that waits most of its turn by the device (on CPU the model runs inside the
launch, so all of it counts as host work). Set
against serve_load.py's figures, the difference is what HTTP, the event loop and the load client add.
"""

import argparse
import asyncio
import contextlib
import os
import pstats
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
# Not this folder first: its kernels.py would shadow the installed package that transformers imports.
sys.path[:] = [REPO_ROOT, os.path.join(REPO_ROOT, "tests"), *(path for path in sys.path if path != HERE), HERE]

from serve_load import percentile, write_model_dir  # noqa: E402

from nanovllm import SamplingParams  # noqa: E402
from nanovllm.outputs import StreamOutput  # noqa: E402
from nanovllm.runner.host_samples import HostSamples  # noqa: E402
from nanovllm.scheduler.batch import ScheduledBatch, StepSamples  # noqa: E402
from nanovllm.scheduler.sequence import Sequence  # noqa: E402
from nanovllm.serving.async_llm import AsyncLLM  # noqa: E402
from nanovllm.serving.gc_freeze import startup_objects_frozen  # noqa: E402


@dataclass(frozen=True)
class StepTiming:
    """One engine turn, timed in the engine's thread."""

    num_waiting: int  # prompts waiting when it began
    seconds: float  # the whole turn
    waited_s: float  # of it, waiting for samples (of the step before, scheduling ahead)
    launch_s: float  # of it, in ModelRunner.launch: building the inputs and queueing the step
    num_alloc_retries: int  # the CUDA allocator's cache flushes during it (each synchronizes)


async def run_clients(llm: AsyncLLM, args: argparse.Namespace) -> list[float]:
    ttfts: list[float] = []
    params = SamplingParams(temperature=0.6, max_tokens=args.max_tokens, ignore_eos=True)

    async def client(index: int) -> None:
        rng = random.Random(index)
        for _ in range(args.rounds):
            prompt = [rng.randrange(1, args.max_token_id) for _ in range(args.prompt_len)]
            start = time.perf_counter()
            stream = await llm.add_requests([prompt], [params])
            first = True
            async for _, out in stream:
                if first and out.new_token_ids:
                    ttfts.append(time.perf_counter() - start)
                    first = False

    await asyncio.gather(*(client(i) for i in range(args.concurrency)))
    return ttfts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dummy-shape", help="random weights of a bench.py shape (GPU); default: the tiny model")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4, help="requests per client (default 4)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-token-id", type=int, default=390, help="prompt ids are drawn below this")
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--engine-process", action="store_true", help="run the engine in its own process")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile the timed turns that admit prompts (thread engine): Python functions by host time, and the "
        "GPU kernels of the steps they launch",
    )
    parser.add_argument(
        "--no-gc-freeze",
        action="store_true",
        help="leave the startup objects to the garbage collector (the server freezes them)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_model_dir(tmp, tiny=args.dummy_shape is None, dummy_shape=args.dummy_shape)
        engine_args = {"load_format": "dummy"} if args.dummy_shape else {}
        llm = AsyncLLM.from_engine_args(
            tmp, engine_process=args.engine_process, max_num_batched_tokens=args.max_num_batched_tokens, **engine_args
        )
    steps: list[StepTiming] = []
    engine = llm.engine
    profile = PromptTurnProfile() if args.profile and engine is not None else None
    is_timed = [False]  # whether the timed rounds run (the warm-up's turns are not profiled)
    if engine is not None:  # the engine runs in a thread here: time its steps
        real_step, real_wait, real_launch = engine.step, HostSamples.wait, engine.runner.launch
        waited_s = [0.0]  # of the current step, waiting for its samples (or the samples of the step before)
        launch_s = [0.0]  # of the current step, in ModelRunner.launch (queueing the step on the device)

        def timed_launch(batch: ScheduledBatch, in_flight: ScheduledBatch | None) -> HostSamples:
            start = time.perf_counter()
            try:
                return real_launch(batch, in_flight)
            finally:
                launch_s[0] += time.perf_counter() - start

        def timed_wait(samples: HostSamples, seqs: list[Sequence]) -> StepSamples:
            start = time.perf_counter()
            try:
                return real_wait(samples, seqs)
            finally:
                waited_s[0] += time.perf_counter() - start

        def timed_step() -> list[StreamOutput]:
            assert engine is not None
            waiting, retries = len(engine.scheduler.waiting), allocator_retries()
            start, waited_s[0], launch_s[0] = time.perf_counter(), 0.0, 0.0
            profiling = profile is not None and waiting > 0 and is_timed[0]
            outputs = profile.run(real_step) if profiling else real_step()  # type: ignore[union-attr]
            seconds = time.perf_counter() - start
            steps.append(StepTiming(waiting, seconds, waited_s[0], launch_s[0], allocator_retries() - retries))
            return outputs

        engine.step = timed_step  # type: ignore[method-assign]
        engine.runner.launch = timed_launch  # type: ignore[method-assign]
        HostSamples.wait = timed_wait  # type: ignore[method-assign]

    async def warm_up_then_time() -> list[float]:  # AsyncLLM serves one event loop: both rounds run in it
        await run_clients(llm, argparse.Namespace(**{**vars(args), "rounds": 1}))
        steps.clear()
        is_timed[0] = True
        return await run_clients(llm, args)

    try:
        # As nanovllm.serving.server does once the engine is built.
        with contextlib.nullcontext() if args.no_gc_freeze else startup_objects_frozen():
            ttfts = asyncio.run(warm_up_then_time())
    finally:
        llm.shutdown()
    p50, p90 = percentile(ttfts, 50), percentile(ttfts, 90)  # serve_load.py's rule, so the two compare
    print(f"{len(ttfts)} requests, {args.concurrency} clients: time to first token p50 {1e3 * p50:.1f} ms, "
          f"p90 {1e3 * p90:.1f} ms")  # fmt: skip
    if not steps:
        return
    print_steps(steps)
    if profile is not None:
        profile.print()


def allocator_retries() -> int:
    """Times the CUDA caching allocator had to free its cache and retry (each one synchronizes the device)."""
    import torch

    return int(torch.cuda.memory_stats().get("num_alloc_retries", 0)) if torch.cuda.is_initialized() else 0


def print_steps(steps: list[StepTiming]) -> None:
    def median_ms(values: list[float]) -> float:
        return 1e3 * statistics.median(values)

    with_prompts = [step for step in steps if step.num_waiting]
    decode = [step for step in steps if not step.num_waiting]
    print(
        f"{len(steps)} engine steps; decode-only median {median_ms([s.seconds for s in decode]):.2f} ms, "
        f"of which waiting for the device median {median_ms([s.waited_s for s in decode]):.2f} ms "
        f"(the rest, host work: median {median_ms([s.seconds - s.waited_s for s in decode]):.2f} ms)"
    )
    if not with_prompts:
        return
    print(
        f"steps with prompts waiting: {len(with_prompts)}, median {median_ms([s.seconds for s in with_prompts]):.1f}"
        f" ms, of which launching {median_ms([s.launch_s for s in with_prompts]):.1f} ms and waiting for the "
        f"device {median_ms([s.waited_s for s in with_prompts]):.1f} ms"
    )
    print("  prompts waiting at each:", [s.num_waiting for s in with_prompts])
    print("  allocator retries (device syncs) in all steps:", sum(s.num_alloc_retries for s in steps))


class PromptTurnProfile:
    """The engine turns that admit prompts, profiled: their Python functions (cProfile) and the GPU kernels of what
    they queue, up to the end of the step they launch (a device synchronize after each turn, outside its timing
    only in that the next turn starts later)."""

    def __init__(self) -> None:
        import cProfile

        self.python = cProfile.Profile()
        self.kernel_us: dict[str, float] = {}  # GPU time by kernel name, summed over the profiled turns
        self.num_turns = 0

    def run(self, turn: Callable[[], list[StreamOutput]]) -> list[StreamOutput]:
        import torch

        self.num_turns += 1
        if not torch.cuda.is_available():  # on CPU the model runs inside the turn: cProfile sees it all
            return self.python.runcall(turn)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as device:
            outputs = self.python.runcall(turn)
            torch.cuda.synchronize()
        for event in device.key_averages():
            self.kernel_us[event.key] = self.kernel_us.get(event.key, 0.0) + event.self_device_time_total
        return outputs

    def print(self) -> None:
        if not self.num_turns:
            print("no turn admitted prompts in the timed rounds: nothing profiled")
            return
        kernel_us = self.kernel_us
        if not kernel_us:  # no GPU: the model ran inside each turn, among the functions below
            print(f"{self.num_turns} turns admitting prompts, on CPU (no GPU kernels to list)")
        else:
            total_ms = sum(kernel_us.values()) / 1e3 / self.num_turns
            print(f"{self.num_turns} turns admitting prompts; GPU kernels of each: {total_ms:.1f} ms. Top kernels:")
            for name, us in sorted(kernel_us.items(), key=lambda item: -item[1])[:8]:
                print(f"  {us / 1e3 / self.num_turns:8.2f} ms  {name[:90]}")
        print("Python functions by host time in those turns (cProfile; it slows the host):")
        pstats.Stats(self.python).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
