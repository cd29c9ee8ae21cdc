"""Check the LoRA shrink and expand Triton kernels against the torch reference, then time them at decode sizes
against their memory floor (run: python benchmarks/lora_kernel.py).

Shapes are the four LoRA-adapted projections of one layer of Qwen3-0.6B (--shape qwen3-8b: Qwen3-8B's) in bfloat16,
with 4 adapter slots of rank 16: bench.py --num-loras 4's setting. A decode batch's tokens go round-robin over the
4 adapters and the base model, as bench.py's requests do (starting with an adapter, so that one token has one).
The calls are the engine's (layers/lora.py, through kernels/lora.py): "shrink" is one x A^T for every slice of the
projection, "expand" one y += scaling * . B^T per slice (q, k, v; gate, up), and "lora", timed for qkv, both in turn.

Decode is memory-bound: a call must read the A (shrink) or B (expand) of every adapter that some token uses, once,
and, for each token with an adapter, read its input row, write (shrink) and read (expand) its rank-wide float32
intermediate, and read and write its output row, as the expand adds into it; base-model tokens need none of it.
Those bytes at the device's copy rate (measured in the same run) are the floor; issue #27's target is a time
within 2x of it. Times are GPU time of calls replayed in a CUDA graph, as the decode graphs run the kernels; each
replay reads the same adapters, whose few MB stay in the L2 cache (in a decode step the other layers evict them).
Exits 1 if a check fails.

``--smoke`` runs tiny sizes, on CPU through Triton's interpreter when there is no GPU, to test this script
itself; its timings mean nothing.
"""

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
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

from nanovllm.kernels.lora import LoRAKernels, select_lora_kernels, slot_rank  # noqa: E402
from nanovllm.lora.metadata import build_lora_metadata  # noqa: E402
from nanovllm.utils.lora_metadata import NO_ADAPTER, LoRAMetadata  # noqa: E402

DTYPE = torch.bfloat16
INTERMEDIATE_DTYPE = torch.float32  # the shrink's output (kernels/lora.py's contract)
MAX_LORAS = 4  # adapter slots: bench.py --num-loras 4 sets max_loras=4
LORA_RANK = slot_rank(16)  # bench.py's adapters are rank 16, which is also the slots' smallest rank
SCALING = 2.0  # lora_alpha / r of bench.py's adapters (alpha = 2r)
WEIGHT_STD = 0.02  # as bench.py's random adapters (LORA_WEIGHT_STD)
ROUND_ROBIN = (*range(MAX_LORAS), NO_ADAPTER)  # token i's slot is ROUND_ROBIN[i % len(ROUND_ROBIN)]
DECODE_BATCH_SIZES = (1, 8, 32, 64, 256)  # tokens per call: one token per sequence
TRITON_KERNELS = select_lora_kernels(use_triton=True)  # what the engine runs on a GPU
TORCH_KERNELS = select_lora_kernels(use_triton=False)  # the reference, run here in float32


@dataclass(frozen=True)
class Projection:
    """One LoRA-adapted linear layer of the engine: its input width and its output slices."""

    name: str  # the engine's (fused) layer: qkv, o, gate_up or down
    in_features: int
    slice_sizes: tuple[int, ...]  # output features of each slice (q, k, v; gate, up), one after another in y


@dataclass(frozen=True)
class LoraShape:
    """One model's projections and the batches they are timed at."""

    projections: tuple[Projection, ...]
    batch_sizes: tuple[int, ...]  # tokens per call: decode batches
    copy_bytes: int  # bytes copied to measure device bandwidth


def qwen3_projections(hidden_size: int, intermediate_size: int, q_size: int, kv_size: int) -> tuple[Projection, ...]:
    """The projections of one Qwen3 decoder layer (q_size: query heads x head_dim; kv_size: KV heads x head_dim)."""
    return (
        Projection("qkv", hidden_size, (q_size, kv_size, kv_size)),
        Projection("o", q_size, (hidden_size,)),
        Projection("gate_up", hidden_size, (intermediate_size, intermediate_size)),
        Projection("down", intermediate_size, (hidden_size,)),
    )


SHAPES = {  # bench.py's shape names; 16 query heads (0.6B) or 32 (8B) of 128, 8 KV heads of 128
    "qwen3-0.6b": LoraShape(qwen3_projections(1024, 3072, 2048, 1024), DECODE_BATCH_SIZES, COPY_BYTES),
    "qwen3-8b": LoraShape(qwen3_projections(4096, 12288, 4096, 1024), DECODE_BATCH_SIZES, COPY_BYTES),
}
# qkv and down, with inputs that end mid-way through the shrink's 64-feature steps (masked edges); 6 tokens fill
# every slot, one of them twice, and one is the base model's.
SMOKE = LoraShape((Projection("qkv", 48, (32, 16, 16)), Projection("down", 96, (80,))), (6,), 1 << 20)


@dataclass(frozen=True)
class LoraInputs:
    """One projection's adapter slots, holding random adapters, and one decode batch through it."""

    x: torch.Tensor  # [N, in_features]
    y: torch.Tensor  # [N, out_features]: stands for the base layer's output, which the expand adds into
    lora_a: torch.Tensor  # [MAX_LORAS, num_slices, LORA_RANK, in_features]
    lora_b: torch.Tensor  # [MAX_LORAS, out_features, LORA_RANK], the slices' rows one after another
    scalings: torch.Tensor  # [MAX_LORAS] float32
    metadata: LoRAMetadata  # each token's slot
    slice_cols: tuple[slice, ...]  # each slice's columns of y and rows of lora_b
    num_adapter_tokens: int  # tokens served by an adapter (not NO_ADAPTER)
    num_used_adapters: int  # distinct adapters among the batch's tokens


def make_inputs(projection: Projection, num_tokens: int, device: str, gen: torch.Generator) -> LoraInputs:
    """Random adapters in every slot and a batch of num_tokens tokens whose slots go round-robin."""
    in_features, out_features = projection.in_features, sum(projection.slice_sizes)
    num_slices = len(projection.slice_sizes)
    row_slots = np.array([ROUND_ROBIN[i % len(ROUND_ROBIN)] for i in range(num_tokens)], dtype=np.int32)  # [N]
    metadata = build_lora_metadata(row_slots, [1] * num_tokens, MAX_LORAS, torch.device(device))
    a_shape = (MAX_LORAS, num_slices, LORA_RANK, in_features)
    ends = np.cumsum(projection.slice_sizes).tolist()
    return LoraInputs(
        x=torch.randn(num_tokens, in_features, generator=gen, device=device).to(DTYPE),
        y=torch.randn(num_tokens, out_features, generator=gen, device=device).to(DTYPE),
        lora_a=(WEIGHT_STD * torch.randn(a_shape, generator=gen, device=device)).to(DTYPE),
        lora_b=(WEIGHT_STD * torch.randn(MAX_LORAS, out_features, LORA_RANK, generator=gen, device=device)).to(DTYPE),
        scalings=torch.full((MAX_LORAS,), SCALING, device=device),
        metadata=metadata,
        slice_cols=tuple(slice(end - size, end) for end, size in zip(ends, projection.slice_sizes, strict=True)),
        num_adapter_tokens=int((row_slots != NO_ADAPTER).sum()),
        num_used_adapters=len(np.unique(row_slots[row_slots != NO_ADAPTER])),
    )


def shrink(kernels: LoRAKernels, inputs: LoraInputs) -> torch.Tensor:
    """x A^T of each token's adapter for every slice: [num_slices, N, LORA_RANK] float32."""
    return kernels.shrink(inputs.x, inputs.lora_a, inputs.metadata)


def expand(kernels: LoRAKernels, inputs: LoraInputs, y: torch.Tensor, shrunk: torch.Tensor) -> None:
    """y += scaling * shrunk B^T of each token's adapter, one call per slice, as LoRASlots.forward makes them."""
    for slice_idx, cols in enumerate(inputs.slice_cols):
        kernels.expand(y[:, cols], shrunk[slice_idx], inputs.lora_b[:, cols], inputs.scalings, inputs.metadata)


def shrink_bytes(projection: Projection, num_adapter_tokens: int, num_used_adapters: int) -> int:
    """Bytes the shrink must move: the used adapters' A; each adapter token's input row read and its intermediate
    written."""
    num_slices = len(projection.slice_sizes)
    weights = num_used_adapters * num_slices * LORA_RANK * projection.in_features * DTYPE.itemsize
    rows = num_adapter_tokens * projection.in_features * DTYPE.itemsize
    return weights + rows + num_adapter_tokens * num_slices * LORA_RANK * INTERMEDIATE_DTYPE.itemsize


def expand_bytes(projection: Projection, num_adapter_tokens: int, num_used_adapters: int) -> int:
    """Bytes the expand must move: the used adapters' B; each adapter token's intermediate read and its output row
    read and written."""
    num_slices, out_features = len(projection.slice_sizes), sum(projection.slice_sizes)
    weights = num_used_adapters * out_features * LORA_RANK * DTYPE.itemsize
    rows = 2 * num_adapter_tokens * out_features * DTYPE.itemsize
    return weights + rows + num_adapter_tokens * num_slices * LORA_RANK * INTERMEDIATE_DTYPE.itemsize


def floor_bytes(projection: Projection, inputs: LoraInputs) -> dict[str, int]:
    """Each row's floor, by its kernel column: the shrink's, the expand's, and both's ("lora")."""
    shrink_floor = shrink_bytes(projection, inputs.num_adapter_tokens, inputs.num_used_adapters)
    expand_floor = expand_bytes(projection, inputs.num_adapter_tokens, inputs.num_used_adapters)
    return {"shrink": shrink_floor, "expand": expand_floor, "lora": shrink_floor + expand_floor}


def bench_projection(
    projection: Projection, num_tokens: int, device: str, gen: torch.Generator, copy_gbps: float
) -> list[Row]:
    """The shrink and the expand of one projection for a batch of num_tokens, each checked against the float32
    reference, then timed; for qkv, both in turn too."""
    inputs = make_inputs(projection, num_tokens, device, gen)
    ref_inputs = replace(inputs, x=inputs.x.float(), lora_a=inputs.lora_a.float(), lora_b=inputs.lora_b.float())
    ref_shrunk = shrink(TORCH_KERNELS, ref_inputs)  # [num_slices, N, LORA_RANK]
    ref_y = inputs.y.float()  # [N, out_features]
    expand(TORCH_KERNELS, ref_inputs, ref_y, ref_shrunk)
    case = f"{projection.name}, {num_tokens} tok, {inputs.num_used_adapters} adapters"

    def row(kernel: str, milliseconds: float, check: tuple[float, bool]) -> Row:
        floor_ms = floor_bytes(projection, inputs)[kernel] / copy_gbps / 1e6
        throughput = f"floor {1e3 * floor_ms:.2f} us: time {milliseconds / floor_ms:.1f}x it"
        return Row(kernel, case, milliseconds, None, throughput, *check)

    shrunk = shrink(TRITON_KERNELS, inputs)
    shrink_check = max_error(shrunk, ref_shrunk)
    y = inputs.y.clone()
    expand(TRITON_KERNELS, inputs, y, ref_shrunk)  # from the reference's intermediate: the expand alone
    expand_check = max_error(y, ref_y)
    rows = [
        row("shrink", time_graph_ms(lambda: shrink(TRITON_KERNELS, inputs), device), shrink_check),
        row("expand", time_graph_ms(lambda: expand(TRITON_KERNELS, inputs, y, shrunk), device), expand_check),
    ]
    if projection.name == "qkv":  # one layer's whole LoRA call
        y = inputs.y.clone()
        expand(TRITON_KERNELS, inputs, y, shrink(TRITON_KERNELS, inputs))
        lora_check = max_error(y, ref_y)
        lora_ms = time_graph_ms(lambda: expand(TRITON_KERNELS, inputs, y, shrink(TRITON_KERNELS, inputs)), device)
        rows.append(row("lora", lora_ms, lora_check))
    return rows


def describe(projection: Projection) -> str:
    """in -> out slices, as "qkv 1024 -> 2048+1024+1024"."""
    return f"{projection.name} {projection.in_features} -> {'+'.join(map(str, projection.slice_sizes))}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b", help="whose projections")
    parsed, device = parse_benchmark_args(parser)
    shape = SMOKE if parsed.smoke else SHAPES[parsed.shape]
    gen = torch.Generator(device=device).manual_seed(0)
    copy_gbps = copy_bandwidth_gbps(shape.copy_bytes, device)
    print(f"projections (in -> out features): {', '.join(map(describe, shape.projections))}")
    print(f"{MAX_LORAS} slots of rank {LORA_RANK}, tokens round-robin over {ROUND_ROBIN} (slot {NO_ADAPTER}: base)")
    rows = [
        row
        for projection in shape.projections
        for num_tokens in shape.batch_sizes
        for row in bench_projection(projection, num_tokens, device, gen, copy_gbps)
    ]
    return report(rows, copy_gbps, BF16_TOLERANCE)


if __name__ == "__main__":
    sys.exit(main())
