"""Host time per decode step without a model or GPU (python benchmarks/scheduler_host.py).

Fills a scheduler with --num-seqs sequences of about --context prompt tokens (lengths spread over
--spread tokens, so that, as in bench.py, some sequence begins a new KV block on most steps; 0 gives
every sequence the same length), prefills them on paper (a fixed sampled token, nothing run), then
times --steps decode steps at batch --num-seqs in the order of generate()'s loop (async scheduling):
schedule step N+1, stage its inputs into the CUDA-graph lanes (host buffers, not pinned; every lane
fed from step N's samples on the device), build its sampling tensors (on the CPU), record step N's
tokens, advance step N+1. Prints the medians in microseconds. --gap-us sleeps that long before
recording, as the host waits for the GPU's step: the work after it then runs with colder caches,
as it does on a GPU host. The GPU counterpart, with the model run, is benchmarks/host_overhead.py.

--bench-workload runs bench.py's 256 requests instead (random prompt and output lengths, so sequences
finish and the batch shrinks along the way) to their end in the same order, without staging or
sampling tensors, and prints the mean and median host time of its decode steps.
"""

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from nanovllm.engine.block_manager import BlockManager  # noqa: E402
from nanovllm.engine.decode_staging import DecodeStaging  # noqa: E402
from nanovllm.engine.sampling_metadata import SamplingMetadataBuilder  # noqa: E402
from nanovllm.engine.scheduler import ScheduledBatch, Scheduler, SchedulerLimits  # noqa: E402
from nanovllm.engine.sequence import Sequence, StepSamples  # noqa: E402
from nanovllm.sampling_params import SamplingParams  # noqa: E402

SAMPLED_TOKEN_ID = 5  # what every step "samples"; never an EOS id here
VOCAB_SIZE = 151936  # Qwen3's


def samples_for(batch: ScheduledBatch) -> StepSamples:
    num_rows = len(batch.seqs)
    return StepSamples([SAMPLED_TOKEN_ID] * num_rows, [None] * num_rows, [None] * num_rows)


def time_bench_workload(block_size: int) -> None:
    """bench.py's requests (random.seed(0), its lengths) through schedule, record and advance, to the end."""
    random.seed(0)
    max_model_len = 4096
    scheduler = Scheduler(BlockManager(256 * 9, block_size), SchedulerLimits(256, 16384, max_model_len), {0})
    for _ in range(256):
        prompt = [random.randint(0, 10000) for _ in range(random.randint(100, 1024))]
        params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=random.randint(100, 1024))
        scheduler.add(Sequence(prompt, params))
    decode_micros = []
    in_flight = None
    while scheduler.has_unfinished() or in_flight is not None:
        start = time.perf_counter()
        batch = scheduler.schedule() if scheduler.has_unfinished() else None
        if in_flight is not None:
            scheduler.record_samples(in_flight[0], in_flight[1], samples_for(in_flight[0]))
        in_flight = (batch, scheduler.advance(batch)) if batch is not None and batch.seqs else None
        if batch is not None and not batch.is_prefill:
            decode_micros.append((time.perf_counter() - start) * 1e6)
    print(
        f"bench.py's workload, block size {block_size}: {len(decode_micros)} decode steps (schedule + record + "
        f"advance), mean {statistics.mean(decode_micros):.1f} us, median {statistics.median(decode_micros):.1f} us"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--context", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--spread", type=int, default=256, help="prompt lengths span this many tokens (default 256)")
    parser.add_argument("--gap-us", type=int, default=0, help="sleep before each record, as for a GPU step (0: none)")
    parser.add_argument("--bench-workload", action="store_true", help="bench.py's requests, run to their end")
    args = parser.parse_args()
    if args.bench_workload:
        time_bench_workload(args.block_size)
        return
    blocks_per_seq = (args.context + args.spread + args.steps) // args.block_size + 2
    block_manager = BlockManager(args.num_seqs * blocks_per_seq, args.block_size)
    max_model_len = args.context + args.spread + args.steps + 3
    scheduler = Scheduler(block_manager, SchedulerLimits(args.num_seqs, 1 << 20, max_model_len), eos_token_ids={0})
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=args.steps + 3)
    for i in range(args.num_seqs):
        num_prompt_tokens = args.context + i * args.spread // args.num_seqs
        scheduler.add(Sequence([(i * 7 + j) % 10000 for j in range(num_prompt_tokens)], params))
    while scheduler.waiting:
        batch = scheduler.schedule()
        scheduler.postprocess(batch, samples_for(batch))
    staging = DecodeStaging(args.num_seqs, blocks_per_seq, args.block_size, pin_memory=False)
    sampling = SamplingMetadataBuilder(args.num_seqs, VOCAB_SIZE, torch.device("cpu"))
    timings: dict[str, list[float]] = {"schedule": [], "stage": [], "sampling": [], "record": [], "advance": []}
    all_rows = np.arange(args.num_seqs, dtype=np.int64)  # every lane fed from the step in flight
    in_flight = scheduler.schedule()
    rows = scheduler.advance(in_flight)
    for _ in range(args.steps):
        t0 = time.perf_counter()
        batch = scheduler.schedule()
        t1 = time.perf_counter()
        staging.stage(batch, args.num_seqs, all_rows if batch.seqs == in_flight.seqs else None)
        t2 = time.perf_counter()
        sampling.build(batch)
        t3 = time.perf_counter()
        if args.gap_us:
            time.sleep(args.gap_us / 1e6)
        t4 = time.perf_counter()
        scheduler.record_samples(in_flight, rows, samples_for(in_flight))
        t5 = time.perf_counter()
        in_flight, rows = batch, scheduler.advance(batch)
        t6 = time.perf_counter()
        for key, seconds in zip(timings, (t1 - t0, t2 - t1, t3 - t2, t5 - t4, t6 - t5), strict=True):
            timings[key].append(seconds * 1e6)
    print(
        f"decode step, batch {args.num_seqs}, context ~{args.context}, block size {args.block_size}, "
        f"gap {args.gap_us} us"
    )
    for key, values in timings.items():
        print(f"  {key:12s} median {statistics.median(values):7.1f} us")
    print(f"  total        {sum(statistics.median(v) for v in timings.values()):7.1f} us")


if __name__ == "__main__":
    main()
