"""Host (CPU) time per decode step, split by stage, against the GPU time of the same step.

    python benchmarks/host_overhead.py [--num-seqs 256] [--context 1000]

Fills the engine with --num-seqs sequences of --context prompt tokens (Qwen3-0.6B shape,
random weights), lets them reach decode, then times --steps decode steps three times:

- synchronous steps: scheduling, staging the inputs into pinned buffers, the model run
  (synchronized: graph replay, LM head, sampling), and recording the sampled tokens;
- the loop generate() runs (async scheduling, LLMEngine._steps_ahead): schedule step N+1, launch
  it (staging, then one graph replay: input copy, model, LM head and sampling, queued), wait for
  step N's tokens, record them, advance N+1. Everything but the wait is host work; the GPU runs step N meanwhile.
  Then the same loop again with launch()'s parts timed one by one (their timers add host time of their own).

Prints medians in microseconds. --loops N runs the untimed loop N times (this host's speed changes from
loop to loop; see docs/benchmarks.md). For each loop of generate()'s, also the host parts' CPU time (the thread's
own, from time.thread_time) and the time the hypervisor took from this machine's CPUs meanwhile ("steal" in
/proc/stat, where there is one): a host step whose wall time is well above its CPU time was descheduled,
one whose CPU time grew as well ran on a slower CPU (cold caches, a shared core).
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
from nanovllm.engine import model_runner  # noqa: E402
from nanovllm.engine.llm_engine import LLMEngine  # noqa: E402


def print_medians(title: str, timings: dict[str, list[float]], host_keys: tuple[str, ...]) -> None:
    print(title)
    for key, values in timings.items():
        print(f"  {key:12s} median {statistics.median(values):9.1f} us")
    host = sum(statistics.median(timings[k]) for k in host_keys)
    print(f"  host total ({' + '.join(host_keys)}): {host:.1f} us")


def time_synchronous_steps(engine: LLMEngine, num_steps: int) -> None:
    """Each step run to its end before the next is scheduled; staging timed on its own."""
    timings: dict[str, list[float]] = {"schedule": [], "stage": [], "run (GPU)": [], "postprocess": []}
    graphs = engine.runner.decode_graphs
    for _ in range(num_steps):
        t0 = time.perf_counter()
        batch = engine.scheduler.schedule()
        t1 = time.perf_counter()
        if graphs is not None:
            graphs.staging.stage(batch, graphs.bucket_of[len(batch.seqs)])
        t2 = time.perf_counter()
        sampled = engine.runner.run(batch)  # ends in .tolist(): synchronized
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t3 = time.perf_counter()
        engine.scheduler.postprocess(batch, sampled)
        t4 = time.perf_counter()
        for key, value in zip(timings, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            timings[key].append(value * 1e6)
    print_medians("synchronous steps:", timings, ("schedule", "stage", "postprocess"))


class PartTimer:
    """Times chosen methods of the engine's parts from the outside: each call's microseconds, by label."""

    def __init__(self) -> None:
        self.micros: dict[str, list[float]] = {}

    def wrap(self, owner: object, name: str, label: str) -> None:
        real = getattr(owner, name)
        micros = self.micros.setdefault(label, [])

        def timed(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            result = real(*args, **kwargs)
            micros.append((time.perf_counter() - start) * 1e6)
            return result

        setattr(owner, name, timed)

    def median(self, label: str) -> float:
        return statistics.median(self.micros[label][1:])  # the first call, outside the timed turns, left out


def steal_seconds() -> float | None:
    """CPU time the hypervisor has taken from this machine's CPUs so far (all CPUs), or None where not reported."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()  # cpu user nice system idle iowait irq softirq steal ...
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def run_steps_ahead(engine: LLMEngine, num_steps: int) -> tuple[dict[str, list[float]], str]:
    """generate()'s loop (LLMEngine._steps_ahead), one decode step per turn: each stage's microseconds, and a
    line on the host parts' CPU time and the hypervisor's steal meanwhile."""
    runner, scheduler = engine.runner, engine.scheduler
    timings: dict[str, list[float]] = {"schedule": [], "launch": [], "wait (GPU)": [], "record": [], "advance": []}
    host_cpu: list[float] = []
    batch = scheduler.schedule()  # the first turn, with no step in flight, is not timed
    launched = runner.launch(batch, None)
    in_flight = (batch, scheduler.advance(batch), launched)
    steal_before = steal_seconds()
    for _ in range(num_steps):
        c0, t0 = time.thread_time(), time.perf_counter()
        batch = scheduler.schedule()
        t1 = time.perf_counter()
        launched = runner.launch(batch, in_flight[0])
        t2, c2 = time.perf_counter(), time.thread_time()
        landed, rows, samples = in_flight
        landed_samples = samples.wait(landed.seqs)
        c3, t3 = time.thread_time(), time.perf_counter()
        scheduler.record_samples(landed, rows, landed_samples)
        t4 = time.perf_counter()
        in_flight = (batch, scheduler.advance(batch), launched)
        t5, c5 = time.perf_counter(), time.thread_time()
        for key, value in zip(timings, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            timings[key].append(value * 1e6)
        host_cpu.append((c2 - c0 + c5 - c3) * 1e6)
    steal_after = steal_seconds()
    landed, rows, samples = in_flight
    scheduler.record_samples(landed, rows, samples.wait(landed.seqs))  # no token left pending for what follows
    steal = "not reported" if steal_before is None or steal_after is None else f"{steal_after - steal_before:.3f} s"
    return timings, f"  host CPU time (thread) median {statistics.median(host_cpu):.1f} us; steal meanwhile: {steal}"


def time_steps_ahead(engine: LLMEngine, num_steps: int, num_loops: int) -> None:
    """generate()'s loop num_loops times as it runs, then once with launch()'s parts timed (their timers cost host
    time too)."""
    host_keys = ("schedule", "launch", "record", "advance")
    for loop in range(num_loops):
        timings, cpu_line = run_steps_ahead(engine, num_steps)
        numbered = f" loop {loop + 1} of {num_loops}" if num_loops > 1 else ""
        print_medians(f"generate()'s loop (async scheduling){numbered}:", timings, host_keys)
        print(cpu_line)
    runner = engine.runner
    parts = PartTimer()  # launch()'s host work, piece by piece
    if runner.decode_graphs is not None:
        parts.wrap(runner.decode_graphs.staging, "stage", "stage")
        parts.wrap(runner.decode_graphs, "run_and_sample", "sampling graph step (replay, samples)")
        parts.wrap(runner.decode_graphs, "_replay", "wait + stage + graph replay")
        parts.wrap(runner.decode_graphs.inputs_copied, "synchronize", "wait for the last input copy")
        for graph in runner.decode_graphs.graphs.values():
            parts.wrap(graph, "replay", "graph replay")
    parts.wrap(runner.model, "compute_logits", "LM head")
    parts.wrap(runner.sampling, "build", "sampling tensors")
    parts.wrap(runner, "sampler", "sampler (compiled)")
    parts.wrap(runner.sampling, "record", "penalty record")
    parts.wrap(model_runner, "HostSamples", "copies to the host")
    timings, cpu_line = run_steps_ahead(engine, num_steps)
    print_medians("the same, launch()'s parts timed:", timings, host_keys)
    print(cpu_line)
    for label in [label for label, micros in parts.micros.items() if len(micros) > 1]:  # the parts that ran
        print(f"    launch: {label:38s} median {parts.median(label):7.1f} us")
    if "stage" in parts.micros:
        bookkeeping = parts.median("stage") + sum(
            statistics.median(timings[k]) for k in ("schedule", "record", "advance")
        )
        print(f"  schedule + stage + record + advance: {bookkeeping:.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--context", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--loops", type=int, default=1, help="untimed generate() loops of --steps each (default 1)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs (per-op profile)")
    parser.add_argument("--profile", action="store_true", help="print the GPU time of each op over 5 steps")
    parser.add_argument("--top-p", type=float, default=1.0, help="top_p of every request (default 1.0 = off)")
    parser.add_argument("--top-k", type=int, default=0, help="top_k of every request (default 0 = off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="of every request (default 1.0 = off)")
    args = parser.parse_args()
    # The synchronous loop, then the untimed loops and the part-timed one, each with an untimed first turn.
    num_decode_steps = args.steps + (args.loops + 1) * (args.steps + 1)
    llm = build_dummy_llm("qwen3-0.6b", attention_backend=args.backend, max_num_seqs=max(args.num_seqs, 1),
                          max_model_len=args.context + num_decode_steps + 64, enforce_eager=args.eager)  # fmt: skip
    engine = llm.engine
    assert isinstance(engine, LLMEngine)
    params = SamplingParams(
        temperature=0.6, top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
        ignore_eos=True, max_tokens=num_decode_steps + 32,
    )  # fmt: skip
    for i in range(args.num_seqs):
        engine.add_request([(i * 7 + j) % 10000 for j in range(args.context)], params, stream_text=False)
    while engine.scheduler.waiting:  # prefill everything
        engine.step()
    print(
        f"decode step, batch {args.num_seqs}, context ~{args.context}, backend {engine.runner.kernels.attention.name}"
    )
    time_synchronous_steps(engine, args.steps)
    time_steps_ahead(engine, args.steps, args.loops)
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
