"""Time the sampler alone: temperature-only short path vs the full pipeline (python benchmarks/sampler.py).

Batch 256, Qwen3's vocabulary (151936), float32 logits; ms per call (median). On CUDA the sampler
is torch.compile'd and races in its Triton kernel, as the engine does it; on CPU it runs eagerly.
Configurations:

    temperature      temperature=0.6 only (the short path, as bench.py's default workload)
    top_k_top_p_rep  top_k=50, top_p=0.95, repetition_penalty=1.1 (the issue's performance target)
    top_p_only       top_p=0.95 (no top_k on any row: a full-vocabulary sort)
    seeded           temperature=0.6 with a seed per request (noise keys built on the host each step)

Columns: the whole step (waited for), its ratio to temperature-only, then the sampler call alone: the
host's time until its last launch returns, and on CUDA its span on the GPU between two events (which
includes any wait for the host's launches: where the span is about the host time, the call is
launch-bound).
"""

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from nanovllm.runner.host_samples import HostSamples  # noqa: E402
from nanovllm.sampling.metadata import SamplingMetadataBuilder  # noqa: E402
from nanovllm.sampling.sampler import Sampler  # noqa: E402
from nanovllm.sampling_params import SamplingParams  # noqa: E402
from nanovllm.scheduler.batch import ScheduledBatch  # noqa: E402
from nanovllm.scheduler.sequence import Sequence  # noqa: E402

CONFIGS = {
    "temperature": dict(temperature=0.6),
    "top_k_top_p_rep": dict(temperature=0.6, top_k=50, top_p=0.95, repetition_penalty=1.1),
    "top_p_only": dict(temperature=0.6, top_p=0.95),
    "seeded": dict(temperature=0.6, seed=0),
}


@dataclass
class Timing:
    """Medians over the timed calls, in ms."""

    step_ms: float  # metadata build + sample + penalty update + copy to host, waited for
    call_host_ms: float  # the sampler call alone, on the host: until its last launch returns
    call_gpu_ms: float | None  # the sampler call's span on the GPU (CUDA events around it; gaps included)


def time_config(name: str, batch_size: int, vocab_size: int, device: torch.device, repeats: int) -> Timing:
    """One sampler call (metadata build + sample + penalty update + copy to host) on a decode batch."""
    params = SamplingParams(**CONFIGS[name])  # type: ignore[arg-type]
    seqs = []
    for i in range(batch_size):
        seq = Sequence([(i * 7 + j) % vocab_size for j in range(512)], params)
        seq.token_ids += [(i + j) % vocab_size for j in range(256)]
        seq.num_computed_tokens = seq.num_tokens - 1
        seqs.append(seq)
    batch = ScheduledBatch(seqs, [1] * batch_size, is_prefill=False)
    builder = SamplingMetadataBuilder(batch_size, vocab_size, device)
    on_cuda = device.type == "cuda"  # as the engine with its default (Triton) attention backend
    sampler = Sampler(compile_ops=on_cuda, device=device, triton_race=on_cuda)
    logits = torch.randn(batch_size, vocab_size, device=device)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if on_cuda else []
    step_ms, host_ms, gpu_ms = [], [], []
    for i in range(repeats + 3):  # the first calls compile and fill caches
        start = time.perf_counter()
        t = builder.build(batch)
        if on_cuda:
            events[0].record()
        call_start = time.perf_counter()  # after the event: the host time is the call's alone
        output = sampler(logits, t)
        call_end = time.perf_counter()
        if on_cuda:
            events[1].record()
        builder.record(output)
        HostSamples.copy_from(output, None).wait(seqs)  # synchronizes
        if i >= 3:
            step_ms.append((time.perf_counter() - start) * 1e3)
            host_ms.append((call_end - call_start) * 1e3)
            if on_cuda:
                gpu_ms.append(events[0].elapsed_time(events[1]))
        for seq, token_id in zip(seqs, output.token_ids.tolist(), strict=True):
            seq.token_ids.append(token_id)
            seq.num_computed_tokens += 1
    median = statistics.median
    return Timing(median(step_ms), median(host_ms), median(gpu_ms) if gpu_ms else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=151936)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mode = "compiled" if device.type == "cuda" else "eager"
    print(f"sampler, batch {args.batch_size}, vocab {args.vocab_size}, {device} ({mode})")
    print(f"  {'config':16s} {'ms/call':>8s}  {'vs temp.':>8s}  {'sampler call: host':>18s}  {'GPU span':>8s}")
    base = None
    for name in CONFIGS:
        timing = time_config(name, args.batch_size, args.vocab_size, device, args.repeats)
        base = base or timing.step_ms
        gpu = f"{timing.call_gpu_ms:8.3f}" if timing.call_gpu_ms is not None else f"{'-':>8s}"
        print(f"  {name:16s} {timing.step_ms:8.3f}  {timing.step_ms / base:7.2f}x  {timing.call_host_ms:18.3f}  {gpu}")


if __name__ == "__main__":
    main()
