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
import random
import statistics
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO_ROOT, os.path.join(REPO_ROOT, "tests")]

from serve_load import percentile, write_model_dir  # noqa: E402

from nanovllm import SamplingParams  # noqa: E402
from nanovllm.outputs import StreamOutput  # noqa: E402
from nanovllm.runner.host_samples import HostSamples  # noqa: E402
from nanovllm.scheduler.batch import StepSamples  # noqa: E402
from nanovllm.scheduler.sequence import Sequence  # noqa: E402
from nanovllm.serving.async_llm import AsyncLLM  # noqa: E402
from nanovllm.serving.gc_freeze import startup_objects_frozen  # noqa: E402


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
    steps: list[tuple[int, float, float]] = []  # (prompts waiting at the start, seconds, seconds waited) per step
    engine = llm.engine
    if engine is not None:  # the engine runs in a thread here: time its steps
        real_step, real_wait = engine.step, HostSamples.wait
        waited_s = [0.0]  # of the current step, waiting for its samples (or the samples of the step before)

        def timed_wait(samples: HostSamples, seqs: list[Sequence]) -> StepSamples:
            start = time.perf_counter()
            try:
                return real_wait(samples, seqs)
            finally:
                waited_s[0] += time.perf_counter() - start

        def timed_step() -> list[StreamOutput]:
            assert engine is not None
            waiting, start, waited_s[0] = len(engine.scheduler.waiting), time.perf_counter(), 0.0
            outputs = real_step()
            steps.append((waiting, time.perf_counter() - start, waited_s[0]))
            return outputs

        engine.step = timed_step  # type: ignore[method-assign]
        HostSamples.wait = timed_wait  # type: ignore[method-assign]

    async def warm_up_then_time() -> list[float]:  # AsyncLLM serves one event loop: both rounds run in it
        await run_clients(llm, argparse.Namespace(**{**vars(args), "rounds": 1}))
        steps.clear()
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
    with_prompts = [(waiting, seconds) for waiting, seconds, _ in steps if waiting]
    decode = [(1e3 * seconds, 1e3 * waited) for waiting, seconds, waited in steps if not waiting]
    print(
        f"{len(steps)} engine steps; decode-only median {statistics.median(ms for ms, _ in decode):.2f} ms, "
        f"of which waiting for the device median {statistics.median(waited for _, waited in decode):.2f} ms "
        f"(the rest, host work: median {statistics.median(ms - waited for ms, waited in decode):.2f} ms)"
    )
    prefill_ms = statistics.median(1e3 * seconds for _, seconds in with_prompts)
    print(f"steps with prompts waiting: {len(with_prompts)}, median {prefill_ms:.1f} ms")
    print("  prompts waiting at each:", [waiting for waiting, _ in with_prompts])


if __name__ == "__main__":
    main()
