"""Check the fused-MoE Triton kernel against the torch reference, then time it at decode sizes against its memory
floor (run: python benchmarks/moe_kernel.py).

Shapes are one layer of Qwen3-30B-A3B's experts in bfloat16 (hidden 2048, 128 experts of width 768, top-8:
bench.py's qwen3-30b-a3b shape), each token routed by random router logits. Decode is memory-bound: a call must
read the weights of every expert that some token was routed to, once, and write and read its activations; those
bytes at the device's copy rate (measured in the same run) are the floor. Times are GPU time of calls replayed in a
CUDA graph, as the decode graphs run the kernel; each replay routes alike, so at one token part of its 8 experts'
75 MB may stay in the L2 cache. Exits 1 if a check fails.

``--smoke`` runs tiny sizes, on CPU through Triton's interpreter when there is no GPU, to test this script
itself; its timings mean nothing.
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

# benchmarks/kernels.py, beside this script: its timers and table (importing it sets TRITON_INTERPRET on CPU).
from kernels import (
    BF16_TOLERANCE,
    COPY_BYTES,
    Row,
    copy_bandwidth_gbps,
    max_error,
    parse_benchmark_args,
    report,
    time_graph_ms,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from nanovllm.kernels.fused_moe import fused_moe  # noqa: E402
from nanovllm.kernels.triton_fused_moe import fused_moe_triton  # noqa: E402
from nanovllm.layers.moe import route_tokens  # noqa: E402

DTYPE = torch.bfloat16
WEIGHT_STD = 0.02  # as the dummy weights bench.py loads (models/loader.py)


@dataclass(frozen=True)
class MoeShape:
    """One MoE layer's sizes and the batches it is timed at."""

    hidden_size: int
    intermediate_size: int  # one expert's width
    num_experts: int
    top_k: int  # experts per token
    batch_sizes: tuple[int, ...]  # tokens per call: decode batches
    copy_bytes: int  # bytes copied to measure device bandwidth


FULL = MoeShape(2048, 768, 128, 8, (1, 8, 32, 64, 128, 256), COPY_BYTES)  # Qwen3-30B-A3B
SMOKE = MoeShape(64, 32, 8, 2, (1, 5), 1 << 20)


def floor_bytes(shape: MoeShape, num_tokens: int, num_routed_experts: int) -> int:
    """Bytes a call must move: the routed experts' gate, up and down matrices; the tokens in and out; each
    token-expert slot's intermediate and output rows, written once and read once."""
    weights = num_routed_experts * 3 * shape.hidden_size * shape.intermediate_size
    num_slots = num_tokens * shape.top_k
    activations = 2 * num_tokens * shape.hidden_size + 2 * num_slots * (shape.intermediate_size + shape.hidden_size)
    return (weights + activations) * DTYPE.itemsize


def bench_case(shape: MoeShape, num_tokens: int, device: str, gen: torch.Generator, copy_gbps: float) -> Row:
    """One call of num_tokens tokens: checked against the float32 reference, then timed."""
    hidden, width, num_experts = shape.hidden_size, shape.intermediate_size, shape.num_experts
    x = torch.randn(num_tokens, hidden, generator=gen, device=device).to(DTYPE)  # [N, hidden]
    gate_up = (WEIGHT_STD * torch.randn(num_experts, 2 * width, hidden, generator=gen, device=device)).to(DTYPE)
    down = (WEIGHT_STD * torch.randn(num_experts, hidden, width, generator=gen, device=device)).to(DTYPE)
    logits = torch.randn(num_tokens, num_experts, generator=gen, device=device)  # [N, num_experts]
    routing = route_tokens(logits, shape.top_k, renormalize=True)

    def run() -> torch.Tensor:
        return fused_moe_triton(x, gate_up, down, routing.topk_weights, routing.topk_ids)

    ref = fused_moe(x.float(), gate_up.float(), down.float(), routing.topk_weights, routing.topk_ids)
    error, is_ok = max_error(run(), ref)
    milliseconds = time_graph_ms(run, device)
    num_routed = routing.topk_ids.unique().numel()
    floor_ms = floor_bytes(shape, num_tokens, num_routed) / copy_gbps / 1e6
    throughput = f"floor {1e3 * floor_ms:.1f} us: {floor_ms / milliseconds:.0%} of it"
    return Row("moe", f"{num_tokens} tokens, {num_routed} experts", milliseconds, None, throughput, error, is_ok)


def main() -> int:
    args, device = parse_benchmark_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    shape = SMOKE if args.smoke else FULL
    gen = torch.Generator(device=device).manual_seed(0)
    copy_gbps = copy_bandwidth_gbps(shape.copy_bytes, device)
    rows = [bench_case(shape, num_tokens, device, gen, copy_gbps) for num_tokens in shape.batch_sizes]
    return report(rows, copy_gbps, BF16_TOLERANCE)


if __name__ == "__main__":
    sys.exit(main())
