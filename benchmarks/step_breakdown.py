"""Where bench.py's time goes: wall time of every engine step, summed by kind and batch size.

    python benchmarks/step_breakdown.py [--profile | --profile-prefill] [--shape S] [--backend B] [--kv-cache-dtype D]

Runs bench.py's GPU workload (random weights of a bench.py shape, Qwen3-0.6B's by default) step by step and
prints the total time of prefill steps and of decode steps grouped by batch size, with step counts. Each
decode group is set against its floor: every step must read the weights once and the K/V of every cached
token, at the copy rate measured here (sliding windows and routed experts are not counted: for those shapes
this floor overstates the true one; benchmarks/bench_floor.py has the exact one). ``--profile`` also records
the GPU kernels of PROFILED_STEPS (full-batch decode steps) and prints their total time by kernel;
``--profile-prefill`` does so for PREFILL_PROFILED_STEPS, the prompts' admission. The wall time of each prefill
step is printed too: a first step far slower than the others is a compile, not the model.
"""

import argparse
import os
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import GPU_WORKLOAD, SHAPES, build_dummy_llm, make_workload  # noqa: E402
from benchmarks.kernels import copy_bandwidth_gbps  # noqa: E402
from nanovllm.engine.llm_engine import LLMEngine  # noqa: E402

DECODE_GROUPS = (1, 16, 64, 128, 192, 256, 512)  # upper bounds of the batch-size groups reported
# --profile records these steps only: decode steps of the full batch, few enough for the table to print in seconds
# (over a whole run, the profiler's post-processing took longer than a minute).
PROFILED_STEPS = range(50, 150)
PREFILL_PROFILED_STEPS = range(0, 9)  # bench.py's 256 prompts fill the first 9 steps of 16,384 tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    profile = parser.add_mutually_exclusive_group()
    profile.add_argument("--profile", action="store_true", help="also print GPU time by kernel (slows the host)")
    profile.add_argument("--profile-prefill", action="store_true", help="the same for the first (prefill) steps")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b")
    parser.add_argument("--backend", default="auto", help="attention_backend: auto, torch, triton, flash_attn")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto (the model's dtype), fp8, fp8_e5m2")
    args = parser.parse_args()
    llm = build_dummy_llm(args.shape, attention_backend=args.backend, kv_cache_dtype=args.kv_cache_dtype)
    engine = llm.engine
    assert isinstance(engine, LLMEngine)
    runner = engine.runner
    llm.generate([[1, 2, 3]], use_tqdm=False)
    copy_gbps = copy_bandwidth_gbps(1 << 30, "cuda")
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    kv_bytes_per_token = runner.block_bytes // runner.block_size
    print(f"copy {copy_gbps:.0f} GB/s, weights {weight_bytes / 1e9:.2f} GB, KV {kv_bytes_per_token} B/token")
    prompts, params = make_workload(GPU_WORKLOAD["num_seqs"], 100, 1024, 1024)
    for prompt, sp in zip(prompts, params, strict=True):
        engine.scheduler.add(engine.make_sequence(prompt, sp))
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0.0])  # seconds, steps, floor seconds
    profiled_steps = PREFILL_PROFILED_STEPS if args.profile_prefill else PROFILED_STEPS
    is_profiled = args.profile or args.profile_prefill
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) if is_profiled else None
    profiled_s = 0.0  # wall time of profiled_steps
    prefill_ms: list[float] = []  # each prefill step's wall time
    start = time.perf_counter()
    step_idx = 0
    while engine.scheduler.has_unfinished():
        if profiler is not None and step_idx == profiled_steps.start:
            profiler.start()
        t0 = time.perf_counter()
        batch = engine.scheduler.schedule()
        engine.scheduler.postprocess(batch, runner.run(batch))
        elapsed = time.perf_counter() - t0
        if profiler is not None and step_idx in profiled_steps:
            profiled_s += elapsed
            if step_idx == profiled_steps[-1]:
                profiler.stop()
        step_idx += 1
        group = next(g for g in DECODE_GROUPS if len(batch.seqs) <= g)
        key = "prefill" if batch.is_prefill else f"decode B<={group}"
        if batch.is_prefill:
            prefill_ms.append(1e3 * elapsed)
        floor = 0.0
        if not batch.is_prefill:  # the tokens cached before the step, plus the new one
            cached_tokens = sum(seq.num_tokens - 1 for seq in batch.seqs)
            floor = (weight_bytes + cached_tokens * kv_bytes_per_token) / (copy_gbps * 1e9)
        totals[key][0] += elapsed
        totals[key][1] += 1
        totals[key][2] += floor
    wall = time.perf_counter() - start
    print(f"total {wall:.2f} s, preemptions {engine.scheduler.num_preemptions}, KV blocks {runner.num_kvcache_blocks}")
    for key, (seconds, steps, floor) in sorted(totals.items()):
        versus = f"  floor {1e3 * floor / steps:6.2f} ms/step ({100 * floor / seconds:3.0f}%)" if floor else ""
        print(f"  {key:16s} {seconds:7.2f} s in {steps:5d} steps = {1e3 * seconds / steps:7.2f} ms/step{versus}")
    decode_floor = sum(floor for _, _, floor in totals.values())
    print(f"  decode floor in all {decode_floor:.2f} s")
    print(f"  prefill steps (ms): {', '.join(f'{ms:.1f}' for ms in prefill_ms)}")
    if profiler is not None:
        events = profiler.key_averages()
        gpu_us = sum(e.self_device_time_total for e in events)
        steps = f"steps {profiled_steps.start}-{profiled_steps[-1]}"
        wall_ms = f"{profiled_s * 1e3:.1f} ms wall (the profiler slows the host)"
        print(f"{steps}: GPU kernel time {gpu_us / 1e3:.1f} ms of {wall_ms}")
        print(events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70))
    llm.close()


if __name__ == "__main__":
    main()
