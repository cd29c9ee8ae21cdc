"""Host (CPU) time per decode step, split by stage, against the GPU time of the same step.

    python benchmarks/host_overhead.py [--num-seqs 256] [--context 1000]

Fills the engine with --num-seqs sequences of --context prompt tokens (Qwen3-0.6B shape,
random weights), lets them reach decode, then times --steps decode steps: scheduling,
staging the inputs into pinned buffers, the model run (synchronized: graph replay, LM head,
sampling), and recording the sampled tokens. Prints medians in microseconds.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import build_dummy_llm  # noqa: E402
from nanovllm import SamplingParams  # noqa: E402
from nanovllm.engine.llm_engine import LLMEngine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--context", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs (per-op profile)")
    parser.add_argument("--profile", action="store_true", help="print the GPU time of each op over 5 steps")
    parser.add_argument("--top-p", type=float, default=1.0, help="top_p of every request (default 1.0 = off)")
    parser.add_argument("--top-k", type=int, default=0, help="top_k of every request (default 0 = off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="of every request (default 1.0 = off)")
    args = parser.parse_args()
    llm = build_dummy_llm("qwen3-0.6b", attention_backend=args.backend, max_num_seqs=max(args.num_seqs, 1),
                          max_model_len=args.context + args.steps + 64, enforce_eager=args.eager)  # fmt: skip
    engine = llm.engine
    assert isinstance(engine, LLMEngine)
    params = SamplingParams(
        temperature=0.6, top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
        ignore_eos=True, max_tokens=args.steps + 32,
    )  # fmt: skip
    for i in range(args.num_seqs):
        engine.add_request([(i * 7 + j) % 10000 for j in range(args.context)], params, stream_text=False)
    while engine.scheduler.waiting:  # prefill everything
        engine.step()
    timings: dict[str, list[float]] = {"schedule": [], "stage": [], "run (GPU)": [], "postprocess": []}
    graphs = engine.runner.decode_graphs
    for _ in range(args.steps):
        t0 = time.perf_counter()
        batch = engine.scheduler.schedule()
        t1 = time.perf_counter()
        if graphs is not None:
            graphs.staging.stage(batch, next(b for b in graphs.buckets if b >= len(batch.seqs)))
        t2 = time.perf_counter()
        sampled = engine.runner.run(batch)  # ends in .tolist(): synchronized
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        engine.scheduler.postprocess(batch, sampled)
        t4 = time.perf_counter()
        for key, value in zip(timings, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            timings[key].append(value * 1e6)
    print(
        f"decode step, batch {args.num_seqs}, context ~{args.context}, backend {engine.runner.kernels.attention.name}"
    )
    for key, values in timings.items():
        print(f"  {key:12s} median {statistics.median(values):9.1f} us")
    host = sum(statistics.median(timings[k]) for k in ("schedule", "stage", "postprocess"))
    print(f"  host total (schedule + stage + postprocess): {host:.1f} us")
    if args.profile:
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(5):
                batch = engine.scheduler.schedule()
                engine.scheduler.postprocess(batch, engine.runner.run(batch))
        table = prof.key_averages()
        print(table.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
        print(table.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    llm.close()


if __name__ == "__main__":
    main()
