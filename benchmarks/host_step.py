"""The host's work per decode step, on a CPU: the engine's turn with the model run stubbed out.

    python benchmarks/host_step.py                       # 16, 64 and 256 running sequences, text on and off
    python benchmarks/host_step.py --batch-sizes 64 --profile      # and where the time goes (cProfile)

On a GPU host a decode step's model run is one CUDA graph replay, cheap to launch; the rest of the
engine's turn is Python: scheduling, staging the graph's inputs, recording the samples, stop checks,
detokenizing and building the outputs. This script measures that rest. The engine serves the tiny test
model with serve_emulated.py's emulated device at zero host and device time (every row "samples" the same
token at once), and before each launch it does the host work of a graph replay: the pending tokens, the
sampling tensors and the pinned buffer's staging (into plain memory here). Requests are added as the
server adds them (LLMEngine.add_request), with text streamed ("text on", as the server) or token ids
only ("text off"), temperature 0.6, no stop but max_tokens. Once every prompt is prefilled, --steps
decode steps are timed, --repeats times; printed: the median turn in µs of this thread's CPU time (on a shared
machine other processes stretch the wall time, not this), and per running sequence, the fastest turn (the least
disturbed by other processes' use of the caches and cores), then the median wall time.
"""

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time
import weakref
from pathlib import Path

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
# Not this folder: its kernels.py would shadow the installed package that transformers imports.
sys.path[:] = [REPO_ROOT, os.path.join(REPO_ROOT, "tests"), *(path for path in sys.path if path != HERE)]

from benchmarks.serve_emulated import emulate_device  # noqa: E402
from nanovllm import SamplingParams  # noqa: E402
from nanovllm.config import EngineConfig  # noqa: E402
from nanovllm.engine.llm_engine import LLMEngine  # noqa: E402
from nanovllm.runner.decode_staging import DecodeStaging  # noqa: E402
from nanovllm.runner.model_inputs import find_pending_tokens  # noqa: E402
from nanovllm.runner.model_runner import ModelRunner  # noqa: E402
from nanovllm.scheduler.batch import ScheduledBatch  # noqa: E402
from nanovllm.serving.gc_freeze import startup_objects_frozen  # noqa: E402

PROMPT_LEN = 128  # tokens per prompt, as engine_ttft.py's default
NUM_WARMUP_STEPS = 8  # decode steps run before the timed ones
BLOCK_SIZE = 256  # KV-cache block size, the engine's default


def max_tokens_for(num_steps: int) -> int:
    """Output tokens per request: the warm-up and timed decode steps, and a few to spare, so none ends early."""
    return NUM_WARMUP_STEPS + num_steps + 4


def stage_as_graphs_do() -> None:
    """Wrap the emulated ModelRunner.launch with the host work a decode graph's replay does before it: find the
    pending tokens, build the sampling tensors, stage the inputs (cuda_graphs.py, DecodeGraphs._replay)."""
    emulated_launch = ModelRunner.launch
    staging: weakref.WeakKeyDictionary[ModelRunner, DecodeStaging] = weakref.WeakKeyDictionary()  # per runner

    def launch(self: ModelRunner, batch: ScheduledBatch, in_flight: ScheduledBatch | None) -> object:
        if not batch.is_prefill:
            if self not in staging:  # made on the runner's first decode step
                max_blocks = -(-self.max_model_len // self.block_size)
                staging[self] = DecodeStaging(self.config.max_num_seqs, max_blocks, self.block_size, False)
            pending = find_pending_tokens(batch, in_flight)
            self.sampling.build(batch)
            staging[self].stage(batch, len(batch.seqs), pending)
        return emulated_launch(self, batch, in_flight)

    ModelRunner.launch = launch  # type: ignore[method-assign]


def build_engine(model_dir: str, max_num_seqs: int, max_tokens: int, text: bool) -> LLMEngine:
    blocks_per_seq = -(-(PROMPT_LEN + max_tokens) // BLOCK_SIZE)
    config = EngineConfig(
        model_dir,
        max_num_seqs=max_num_seqs,
        max_model_len=PROMPT_LEN + max_tokens,
        max_num_batched_tokens=max(max_num_seqs * PROMPT_LEN, PROMPT_LEN + max_tokens),
        num_kvcache_blocks=max_num_seqs * blocks_per_seq,
        kvcache_block_size=BLOCK_SIZE,
        skip_tokenizer_init=not text,
    )
    return LLMEngine(config)


def time_decode_steps(engine: LLMEngine, num_seqs: int, num_steps: int, text: bool) -> list[tuple[float, float]]:
    """Add num_seqs requests, step until all decode, then the (CPU, wall) seconds of each of num_steps decode
    turns."""
    params = SamplingParams(temperature=0.6, max_tokens=max_tokens_for(num_steps), ignore_eos=True)
    for index in range(num_seqs):
        prompt = [(index * 7 + i) % 200 + 10 for i in range(PROMPT_LEN)]
        engine.add_request(prompt, params, stream_text=text)
    while engine.scheduler.waiting:
        engine.step()
    for _ in range(NUM_WARMUP_STEPS):
        engine.step()
    times = []
    for _ in range(num_steps):
        start_cpu, start_wall = time.thread_time(), time.perf_counter()
        outputs = engine.step()
        times.append((time.thread_time() - start_cpu, time.perf_counter() - start_wall))
        if len(outputs) != num_seqs:  # each timed turn must record a whole decode step
            raise RuntimeError(f"a decode turn reported {len(outputs)} outputs for {num_seqs} running sequences")
    engine.abort_all()
    return times


def report(args: argparse.Namespace, model_dir: str, profiler: cProfile.Profile | None) -> None:
    """Print the median decode turn at each batch size, text on and off as asked."""
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.text]
    max_tokens = max_tokens_for(args.steps)
    print(f"{'seqs':>5} {'text':>5} {'µs/step':>9} {'µs/seq':>8} {'fastest':>9} {'wall µs/step':>13}")
    for text in modes:
        for num_seqs in args.batch_sizes:
            engine = build_engine(model_dir, num_seqs, max_tokens, text)
            times: list[tuple[float, float]] = []
            with startup_objects_frozen():  # as the server runs: full collections skip the engine's objects
                for _ in range(args.repeats):
                    if profiler is not None:
                        profiler.enable()
                    times += time_decode_steps(engine, num_seqs, args.steps, text)
                    if profiler is not None:
                        profiler.disable()
            engine.close()
            step_us = statistics.median(cpu for cpu, _ in times) * 1e6
            wall_us = statistics.median(wall for _, wall in times) * 1e6
            label = "on" if text else "off"
            fastest_us = min(cpu for cpu, _ in times) * 1e6
            row = f"{num_seqs:>5} {label:>5} {step_us:>9.1f} {step_us / num_seqs:>8.2f} {fastest_us:>9.1f}"
            print(f"{row} {wall_us:>13.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64, 256], help="running sequences")
    parser.add_argument("--steps", type=int, default=100, help="timed decode steps per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="runs of --steps; the median of all turns is shown")
    parser.add_argument("--text", choices=["on", "off", "both"], default="both", help="stream text, or ids only")
    parser.add_argument("--profile", action="store_true", help="cProfile the timed steps, print the top functions")
    parser.add_argument("--model", help="a tiny model's directory (default: write the qwen3 test model)")
    parser.add_argument("--smoke", action="store_true", help="a tiny run that checks the script works")
    args = parser.parse_args()
    if args.smoke:
        args.batch_sizes, args.steps, args.repeats = [4], 3, 1
    emulate_device(0.0, 0.0, 0.0, 0.0)
    stage_as_graphs_do()
    profiler = cProfile.Profile() if args.profile else None
    if args.model is not None:
        report(args, args.model, profiler)
    else:
        from model_fixtures import write_tiny_model

        with tempfile.TemporaryDirectory() as tmp:
            write_tiny_model(Path(tmp), "qwen3")
            report(args, tmp, profiler)
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    if args.smoke:
        print("host_step smoke run done")


if __name__ == "__main__":
    main()
