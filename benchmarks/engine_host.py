"""The engine's own host time per decode step, the model run left out (python benchmarks/engine_host.py).

Builds an engine on the tiny test model (CPU), prefills --num-seqs requests of --context prompt
tokens, then replaces the model run with a stub that "samples" a fixed token at once, so what is
timed is everything the engine does around the run: scheduling, postprocessing, and turning the
step into outputs. Loops of --steps decode steps each, medians in microseconds:

    step()             one StreamOutput per row, no text (steps in turn: tensor parallelism, or
                       async_scheduling=False)
    step(), text       the same with incremental detokenization of every row (stream_text=True)
    generate's step    _step_quietly(): only finished rows get attention
    generate ahead     one turn of _steps_ahead() (async scheduling): schedule, launch, record the
                       previous step's tokens, advance; on a GPU this is what overlaps the device's step
    step_ahead()       the server's loop: the same turn with one StreamOutput per row, no text
    step_ahead(), text the same with incremental detokenization of every row

Scheduler-level parts (and graph staging, sampling tensors) alone: benchmarks/scheduler_host.py.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO_ROOT, os.path.join(REPO_ROOT, "tests")]

from model_fixtures import write_tiny_model  # noqa: E402

from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.engine.llm_engine import LLMEngine  # noqa: E402
from nanovllm.engine.scheduler import ScheduledBatch  # noqa: E402
from nanovllm.engine.sequence import StepSamples  # noqa: E402

SAMPLED_TOKEN_ID = 5  # what every stubbed step samples; not an EOS id of the tiny tokenizer


def stubbed_run(batch: ScheduledBatch) -> StepSamples:
    num_rows = len(batch.seqs)
    return StepSamples([SAMPLED_TOKEN_ID] * num_rows, [None] * num_rows, [None] * num_rows)


class StubbedSamples:
    """What the stubbed launch returns: the step's samples, ready at once."""

    def __init__(self, num_rows: int) -> None:
        self.num_rows = num_rows

    def wait(self, seqs: list) -> StepSamples:
        return StepSamples([SAMPLED_TOKEN_ID] * self.num_rows, [None] * self.num_rows, [None] * self.num_rows)


def stubbed_launch(batch: ScheduledBatch, in_flight: ScheduledBatch | None) -> StubbedSamples:
    return StubbedSamples(len(batch.seqs))


def fill_and_prefill(engine: LLMEngine, args: argparse.Namespace, stream_text: bool) -> None:
    """--num-seqs requests of --context prompt tokens, prefilled with the real model, so the next steps decode."""
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=args.steps + 8)
    for i in range(args.num_seqs):
        engine.add_request([(i * 7 + j) % 300 for j in range(args.context)], params, stream_text=stream_text)
    while engine.scheduler.waiting:
        engine.step()


def median_micros(turn: Callable[[], object], num_turns: int) -> float:
    micros = []
    for _ in range(num_turns):
        start = time.perf_counter()
        turn()
        micros.append((time.perf_counter() - start) * 1e6)
    return statistics.median(micros)


def time_turns_ahead(engine: LLMEngine, args: argparse.Namespace, stream_text: bool, server: bool) -> float:
    """Median microseconds of one turn with async scheduling, at batch --num-seqs: of generate()'s loop, or with
    ``server`` of step_ahead() (one output per row)."""
    fill_and_prefill(engine, args, stream_text)
    real_launch, engine.runner.launch = engine.runner.launch, stubbed_launch  # type: ignore[method-assign,assignment]
    if server:
        micros = median_micros(engine.step_ahead, args.steps)
    else:
        turns = engine._steps_ahead()
        micros = median_micros(lambda: next(turns), args.steps)
        turns.close()
    engine.runner.launch = real_launch  # type: ignore[method-assign]
    engine.abort_all()
    return micros


def time_steps(engine: LLMEngine, args: argparse.Namespace, stream_text: bool, quiet: bool) -> float:
    """Median microseconds of one decode step's engine work, over --steps steps at batch --num-seqs."""
    fill_and_prefill(engine, args, stream_text)
    real_run, engine.runner.run = engine.runner.run, stubbed_run
    micros = median_micros(engine._step_quietly if quiet else engine.step, args.steps)
    engine.runner.run = real_run
    engine.abort_all()
    return micros


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(write_tiny_model(Path(tmp), "qwen3"))
        with LLM(model_dir, max_num_seqs=args.num_seqs, kvcache_block_size=256, enforce_eager=True) as llm:
            engine = llm.engine
            assert isinstance(engine, LLMEngine)
            print(f"engine work per decode step, batch {args.num_seqs}, context ~{args.context} (model run stubbed)")
            for label, stream_text, quiet in (("step()", False, False), ("step(), text", True, False),
                                              ("generate's step", False, True)):  # fmt: skip
                print(f"  {label:18s} median {time_steps(engine, args, stream_text, quiet):8.1f} us")
            for label, stream_text, server in (("generate ahead", False, False), ("step_ahead()", False, True),
                                               ("step_ahead(), text", True, True)):  # fmt: skip
                print(f"  {label:18s} median {time_turns_ahead(engine, args, stream_text, server):8.1f} us")


if __name__ == "__main__":
    main()
