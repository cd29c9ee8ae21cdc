"""Check the fused-MoE Triton kernel against the torch reference, then time it at decode sizes against its memory
floor (run: python benchmarks/moe_kernel.py).

Shapes are one layer of Qwen3-30B-A3B's experts in bfloat16 (hidden 2048, 128 experts of width 768, top-8:
bench.py's qwen3-30b-a3b shape), each token routed by random router logits. Decode is memory-bound: a call must
read the weights of every expert that some token was routed to, once, and write and read its activations; those
bytes at the device's copy rate (measured in the same run) are the floor. Times are GPU time of calls replayed in a
CUDA graph, as the decode graphs run the kernel; each replay routes alike, so at one token part of its 8 experts'
75 MB may stay in the L2 cache. Exits 1 if a check fails.

Each row also gives the sort by expert alone (the GEMMs' share is the rest, but for the final sum of each token's
rows). The router's softmax and top-k, which run before the call, are timed in rows of their own: the Triton kernel
beside route_tokens, its torch reference, both in a CUDA graph; their check counts differing choices of expert.

``--sweep`` instead times every tile set of SWEEP (and the chosen one) at every batch size, each checked against
the reference, then names the fastest per batch size: how DECODE_TILES, SMALL_TILES and LARGE_TILES of
kernels/triton_fused_moe.py are to be chosen, to redo on another GPU.

``--smoke`` runs tiny sizes, on CPU through Triton's interpreter when there is no GPU, to test this script
itself; its timings mean nothing.
"""

import argparse
import functools
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
from nanovllm.kernels.triton_fused_moe import (  # noqa: E402
    GemmTiles,
    MoeTiles,
    choose_tiles,
    fused_moe_triton,
)
from nanovllm.kernels.triton_moe_routing import route_tokens_triton  # noqa: E402
from nanovllm.kernels.triton_moe_sort import sort_by_expert  # noqa: E402
from nanovllm.layers.moe import ExpertRouting, route_tokens  # noqa: E402

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
# --sweep's tile sets: block_m, then (block_n, block_k, num_warps, num_stages) of the gate+up and down GEMMs.
SWEEP = tuple(
    MoeTiles(block_m, GemmTiles(*gate_up), GemmTiles(*down))
    for block_m, gate_up, down in (
        (16, (16, 128, 4, 4), (32, 128, 4, 4)),
        (16, (16, 256, 4, 3), (64, 128, 4, 4)),
        (16, (32, 64, 4, 5), (64, 64, 4, 5)),
        (16, (32, 128, 4, 4), (64, 128, 4, 4)),
        (16, (32, 128, 4, 5), (32, 128, 4, 5)),
        (16, (32, 256, 4, 3), (64, 256, 4, 3)),
        (16, (32, 128, 2, 4), (64, 128, 2, 4)),
        (16, (64, 64, 4, 3), (64, 64, 4, 3)),  # the tiles before this sweep existed
        (16, (64, 128, 4, 3), (64, 128, 4, 3)),
        (16, (64, 128, 4, 4), (128, 128, 4, 3)),
        (32, (64, 128, 4, 3), (128, 128, 4, 3)),
        (64, (64, 64, 4, 3), (64, 64, 4, 3)),
        (64, (128, 64, 8, 3), (128, 64, 8, 3)),
    )
)
SWEEP_SMOKE = SWEEP[3::8]


def floor_bytes(shape: MoeShape, num_tokens: int, num_routed_experts: int) -> int:
    """Bytes a call must move: the routed experts' gate, up and down matrices; the tokens in and out; each
    token-expert slot's intermediate and output rows, written once and read once."""
    weights = num_routed_experts * 3 * shape.hidden_size * shape.intermediate_size
    num_slots = num_tokens * shape.top_k
    activations = 2 * num_tokens * shape.hidden_size + 2 * num_slots * (shape.intermediate_size + shape.hidden_size)
    return (weights + activations) * DTYPE.itemsize


@dataclass(frozen=True)
class MoeCase:
    """One call of num_tokens tokens, routed by random logits, and its float32 reference output."""

    shape: MoeShape
    num_tokens: int
    x: torch.Tensor  # [N, hidden]
    gate_up: torch.Tensor  # [num_experts, 2 * I, hidden]
    down: torch.Tensor  # [num_experts, hidden, I]
    routing: ExpertRouting
    ref: torch.Tensor  # [N, hidden] float32

    def run(self, tiles: MoeTiles | None = None) -> torch.Tensor:
        routing = self.routing
        return fused_moe_triton(self.x, self.gate_up, self.down, routing.topk_weights, routing.topk_ids, tiles)

    def chosen_tiles(self) -> MoeTiles:
        return choose_tiles(self.routing.topk_ids.numel(), self.shape.num_experts)

    def floor_ms(self, copy_gbps: float) -> float:
        num_routed = self.routing.topk_ids.unique().numel()
        return floor_bytes(self.shape, self.num_tokens, num_routed) / copy_gbps / 1e6


def moe_case(shape: MoeShape, num_tokens: int, device: str, gen: torch.Generator) -> MoeCase:
    hidden, width, num_experts = shape.hidden_size, shape.intermediate_size, shape.num_experts
    x = torch.randn(num_tokens, hidden, generator=gen, device=device).to(DTYPE)  # [N, hidden]
    gate_up = (WEIGHT_STD * torch.randn(num_experts, 2 * width, hidden, generator=gen, device=device)).to(DTYPE)
    down = (WEIGHT_STD * torch.randn(num_experts, hidden, width, generator=gen, device=device)).to(DTYPE)
    logits = torch.randn(num_tokens, num_experts, generator=gen, device=device)  # [N, num_experts]
    routing = route_tokens(logits, shape.top_k, renormalize=True)
    ref = fused_moe(x.float(), gate_up.float(), down.float(), routing.topk_weights, routing.topk_ids)
    return MoeCase(shape, num_tokens, x, gate_up, down, routing, ref)


def bench_case(case: MoeCase, device: str, copy_gbps: float) -> Row:
    """One call: checked against the float32 reference, then timed, with the sort by expert alone."""
    error, is_ok = max_error(case.run(), case.ref)
    milliseconds = time_graph_ms(case.run, device)
    block_m = case.chosen_tiles().block_m
    sort_ms = time_graph_ms(lambda: sort_by_expert(case.routing.topk_ids, case.shape.num_experts, block_m), device)
    floor_ms = case.floor_ms(copy_gbps)
    throughput = f"floor {1e3 * floor_ms:.1f} us: {floor_ms / milliseconds:.0%}; sort {1e3 * sort_ms:.1f} us"
    num_routed = case.routing.topk_ids.unique().numel()
    return Row("moe", f"{case.num_tokens} tokens, {num_routed} experts", milliseconds, None, throughput, error, is_ok)


def bench_routing(shape: MoeShape, num_tokens: int, device: str, gen: torch.Generator) -> Row:
    """The router's softmax, top-k and renormalisation of num_tokens tokens' bf16 logits."""
    logits = torch.randn(num_tokens, shape.num_experts, generator=gen, device=device).to(DTYPE)  # [N, num_experts]
    want = route_tokens(logits, shape.top_k, renormalize=True)
    topk_weights, topk_ids = route_tokens_triton(logits, shape.top_k, renormalize=True)
    num_differing = int((topk_ids != want.topk_ids).sum())  # bf16 logits tie at times: then either order is right
    error = (topk_weights - want.topk_weights).abs().max().item()
    triton_ms = time_graph_ms(lambda: route_tokens_triton(logits, shape.top_k, True), device)
    torch_ms = time_graph_ms(lambda: route_tokens(logits, shape.top_k, True), device)
    case = f"{num_tokens} tokens, {num_differing} ids differ"
    return Row("route", case, triton_ms, torch_ms, "", error, error <= BF16_TOLERANCE)


def tiles_label(tiles: MoeTiles) -> str:
    """m16 g32x128w4s4 d64x128w4s4: block_m, then block_n x block_k, warps and stages of gate+up and of down."""
    gemms = ((tiles.gate_up, "g"), (tiles.down, "d"))
    parts = (f"{name}{t.block_n}x{t.block_k}w{t.num_warps}s{t.num_stages}" for t, name in gemms)
    return f"m{tiles.block_m} " + " ".join(parts)


def sweep(cases: list[MoeCase], settings: tuple[MoeTiles, ...], device: str, copy_gbps: float) -> int:
    """Print each tile set's GPU time (us) and share of the floor at every batch size, * marking the tiles that
    choose_tiles picks there, then the fastest per batch size; returns how many (set, size) gave a wrong result."""
    print(f"\nfused-MoE GPU time (us) and share of the memory floor at {copy_gbps:.0f} GB/s; * = chosen now")
    print(f"{'tiles':<34}" + "".join(f"{f'{case.num_tokens} tok':>16}" for case in cases))
    best: dict[int, tuple[float, MoeTiles]] = {}
    num_wrong = 0
    for tiles in settings:
        cells = []
        for case in cases:
            _, is_ok = max_error(case.run(tiles), case.ref)
            ms = time_graph_ms(functools.partial(case.run, tiles), device)
            mark = ("*" if tiles == case.chosen_tiles() else "") + ("" if is_ok else " FAIL")
            cells.append(f"{ms * 1e3:.1f} ({case.floor_ms(copy_gbps) / ms:.0%}){mark}")
            num_wrong += not is_ok
            if is_ok and (case.num_tokens not in best or ms < best[case.num_tokens][0]):
                best[case.num_tokens] = (ms, tiles)
        print(f"{tiles_label(tiles):<34}" + "".join(f"{cell:>16}" for cell in cells), flush=True)
    for num_tokens, (ms, tiles) in best.items():
        print(f"fastest at {num_tokens} tokens: {tiles_label(tiles)} ({ms * 1e3:.1f} us)")
    return num_wrong


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="time the tile sets of SWEEP instead")
    args, device = parse_benchmark_args(parser)
    shape = SMOKE if args.smoke else FULL
    gen = torch.Generator(device=device).manual_seed(0)
    copy_gbps = copy_bandwidth_gbps(shape.copy_bytes, device)
    cases = [moe_case(shape, num_tokens, device, gen) for num_tokens in shape.batch_sizes]
    if args.sweep:
        chosen = tuple(case.chosen_tiles() for case in cases)
        settings = tuple(dict.fromkeys((SWEEP_SMOKE if args.smoke else SWEEP) + chosen))
        num_wrong = sweep(cases, settings, device, copy_gbps)
        print(f"\n{num_wrong} setting(s) gave a wrong result" if num_wrong else "\nall settings correct")
        return 1 if num_wrong else 0
    rows = [bench_case(case, device, copy_gbps) for case in cases]
    rows += [bench_routing(shape, num_tokens, device, gen) for num_tokens in shape.batch_sizes]
    return report(rows, copy_gbps, BF16_TOLERANCE)


if __name__ == "__main__":
    sys.exit(main())
