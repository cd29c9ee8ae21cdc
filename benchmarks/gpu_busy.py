"""How busy bench.py keeps the GPU: the share of the timed generate()'s wall time in which a kernel or copy runs.

    python benchmarks/gpu_busy.py [--shape qwen3-0.6b] [--backend triton] [--no-async-scheduling]

Runs bench.py's workload (random weights, after the same warm-up) once under torch.profiler, recording
only device activity, and merges the intervals of every kernel and copy on the GPU into the time it was
busy. The wall time is the host's, from the call of generate() to its return. The host is slower under
the profiler, so a busy share measured here is a lower bound of bench.py's own. Also prints tok/s of the
profiled run and the longest gaps, with the time each began after the run's start.
"""

import argparse
import os
import sys
import time
from itertools import pairwise

import torch
from torch.autograd import DeviceType

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import GPU_WORKLOAD, SHAPES, build_dummy_llm, make_workload  # noqa: E402

NUM_GAPS_SHOWN = 5


def busy_intervals(profiler: torch.profiler.profile) -> list[tuple[float, float]]:
    """(start, end) in microseconds of the profiler's clock of every GPU kernel and copy, merged where they
    overlap, in order."""
    spans = sorted(
        (event.time_range.start, event.time_range.end)
        for event in profiler.events()
        if event.device_type == DeviceType.CUDA
    )
    merged: list[tuple[float, float]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b")
    parser.add_argument("--backend", default="auto", help="attention_backend")
    parser.add_argument("--no-async-scheduling", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_busy.py measures a GPU; none is visible")
    llm = build_dummy_llm(args.shape, attention_backend=args.backend, async_scheduling=not args.no_async_scheduling)
    workload = GPU_WORKLOAD
    prompts, params = make_workload(workload["num_seqs"], 100, workload["max_input_len"], workload["max_output_len"])
    llm.generate([[1, 2, 3]], use_tqdm=False)
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
    profiler.start()
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    wall_s = time.perf_counter() - start
    profiler.stop()
    llm.close()
    intervals = busy_intervals(profiler)
    busy_s = sum(end - start for start, end in intervals) / 1e6
    span_s = (intervals[-1][1] - intervals[0][0]) / 1e6
    num_tokens = sum(len(out.token_ids) for out in outputs)
    print(f"{num_tokens} tok in {wall_s:.2f} s under the profiler ({num_tokens / wall_s:,.0f} tok/s)")
    print(f"GPU busy {busy_s:.3f} s of {wall_s:.3f} s wall: {100 * busy_s / wall_s:.1f}% "
          f"(first to last GPU activity {span_s:.3f} s; busy {100 * busy_s / span_s:.1f}% of it)")  # fmt: skip
    gaps = sorted(
        ((after[0] - before[1], before[1] - intervals[0][0]) for before, after in pairwise(intervals)),
        reverse=True,
    )
    print(f"idle between activities: {sum(gap for gap, _ in gaps) / 1e6:.3f} s in {len(gaps)} gaps; longest:")
    for gap, at in gaps[:NUM_GAPS_SHOWN]:
        print(f"  {gap / 1e3:8.2f} ms at {at / 1e6:6.2f} s")


if __name__ == "__main__":
    main()
