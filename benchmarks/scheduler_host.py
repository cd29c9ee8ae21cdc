"""Host time of the scheduler alone per decode step, no model and no GPU (python benchmarks/scheduler_host.py).

Fills a scheduler with --num-seqs sequences of --context prompt tokens, prefills them on paper (a
fixed sampled token, nothing run), then times schedule() and postprocess() of --steps decode steps
at batch --num-seqs and prints the medians in microseconds. The GPU counterpart, with staging and
the model run, is benchmarks/host_overhead.py.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanovllm.engine.block_manager import BlockManager  # noqa: E402
from nanovllm.engine.scheduler import ScheduledBatch, Scheduler, SchedulerLimits  # noqa: E402
from nanovllm.engine.sequence import Sequence, StepSamples  # noqa: E402
from nanovllm.sampling_params import SamplingParams  # noqa: E402

SAMPLED_TOKEN_ID = 5  # what every step "samples"; never an EOS id here


def samples_for(batch: ScheduledBatch) -> StepSamples:
    num_rows = len(batch.seqs)
    return StepSamples([SAMPLED_TOKEN_ID] * num_rows, [None] * num_rows, [None] * num_rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--context", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--block-size", type=int, default=256)
    args = parser.parse_args()
    blocks_per_seq = (args.context + args.steps) // args.block_size + 2
    block_manager = BlockManager(args.num_seqs * blocks_per_seq, args.block_size)
    max_model_len = args.context + args.steps + 1
    scheduler = Scheduler(block_manager, SchedulerLimits(args.num_seqs, 1 << 20, max_model_len), eos_token_ids={0})
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=args.steps + 1)
    for i in range(args.num_seqs):
        scheduler.add(Sequence(i, [(i * 7 + j) % 10000 for j in range(args.context)], params))
    while scheduler.waiting:
        batch = scheduler.schedule()
        scheduler.postprocess(batch, samples_for(batch))
    schedule_us, postprocess_us = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        batch = scheduler.schedule()
        scheduled = time.perf_counter()
        scheduler.postprocess(batch, samples_for(batch))
        schedule_us.append((scheduled - start) * 1e6)
        postprocess_us.append((time.perf_counter() - scheduled) * 1e6)
    print(f"decode step, batch {args.num_seqs}, context ~{args.context}, block size {args.block_size}")
    print(f"  schedule     median {statistics.median(schedule_us):7.1f} us")
    print(f"  postprocess  median {statistics.median(postprocess_us):7.1f} us")


if __name__ == "__main__":
    main()
