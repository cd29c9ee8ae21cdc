"""Where bench.py's time goes: wall time of every engine step, summed by kind and batch size.

    python benchmarks/step_breakdown.py

Runs bench.py's GPU workload (Qwen3-0.6B shape, random weights) step by step and prints the
total time of prefill steps and of decode steps grouped by batch size, with step counts.
"""

import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import GPU_WORKLOAD, build_dummy_llm, make_workload  # noqa: E402
from nanovllm.engine.llm_engine import LLMEngine  # noqa: E402

DECODE_GROUPS = (1, 16, 64, 128, 192, 256, 512)  # upper bounds of the batch-size groups reported


def main() -> None:
    llm = build_dummy_llm("qwen3-0.6b")
    engine = llm.engine
    assert isinstance(engine, LLMEngine)
    llm.generate([[1, 2, 3]], use_tqdm=False)
    prompts, params = make_workload(GPU_WORKLOAD["num_seqs"], 100, 1024, 1024)
    for prompt, sp in zip(prompts, params, strict=True):
        engine.scheduler.add(engine.make_sequence(prompt, sp))
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    start = time.perf_counter()
    while engine.scheduler.has_unfinished():
        t0 = time.perf_counter()
        batch = engine.scheduler.schedule()
        engine.scheduler.postprocess(batch, engine.runner.run(batch))
        group = next(g for g in DECODE_GROUPS if len(batch.seqs) <= g)
        key = "prefill" if batch.is_prefill else f"decode B<={group}"
        totals[key][0] += time.perf_counter() - t0
        totals[key][1] += 1
    print(f"total {time.perf_counter() - start:.2f} s, preemptions {engine.scheduler.num_preemptions}, "
          f"KV blocks {engine.runner.num_kvcache_blocks}")  # fmt: skip
    for key, (seconds, steps) in sorted(totals.items()):
        print(f"  {key:16s} {seconds:7.2f} s in {steps:5d} steps = {1e3 * seconds / steps:7.2f} ms/step")
    llm.close()


if __name__ == "__main__":
    main()
