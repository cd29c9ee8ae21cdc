"""Check the LoRA Triton kernels against the torch reference, then time them at decode sizes against their
memory floor and the launch floor (run: python benchmarks/lora_kernel.py).

Shapes are the four LoRA-adapted projections of one layer of Qwen3-0.6B (--shape qwen3-8b: Qwen3-8B's) in bfloat16,
with 4 adapter slots of rank 16: bench.py --num-loras 4's setting. A batch's tokens go round-robin over the
4 adapters and the base model, as bench.py's requests do (starting with an adapter, so that one token has one).
Each projection is timed both ways kernels/triton_lora.py has: "fused" (one launch, what the engine runs up to
FUSED_MAX_TOKENS tokens) and "2-kernel" (shrink, then one expand; the engine's way past it), and the two sizes past
the decode batches show where one overtakes the other.

Decode is memory-bound: a call must read the A and B of every adapter that some token uses, once, and, for each
token with an adapter, read its input row and read and write its output row; base-model tokens need none of it.
Those bytes at the device's copy rate (measured in the same run) are the byte floor; issue #27's target is a time
within 2x of it. No call can take less than one kernel launch, though: the "launch" row times a Triton kernel that
copies one element, and each row is also set against max(byte floor, launch floor), what is physically reachable.
Times are GPU time of calls replayed in a CUDA graph, as the decode graphs run the kernels; each replay reads the
same adapters, whose few MB stay in the L2 cache (in a decode step the other layers evict them). Exits 1 if a
check fails.

``--smoke`` runs tiny sizes, on CPU through Triton's interpreter when there is no GPU, to test this script
itself; its timings mean nothing.
"""

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
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

import triton  # noqa: E402  (after kernels, which sets TRITON_INTERPRET on CPU)
import triton.language as tl  # noqa: E402

from nanovllm.kernels import triton_lora  # noqa: E402
from nanovllm.kernels.lora import select_lora_kernels, slot_rank  # noqa: E402
from nanovllm.lora.metadata import build_lora_metadata  # noqa: E402
from nanovllm.utils.lora_metadata import NO_ADAPTER, LoRAMetadata  # noqa: E402

DTYPE = torch.bfloat16
MAX_LORAS = 4  # adapter slots: bench.py --num-loras 4 sets max_loras=4
LORA_RANK = slot_rank(16)  # bench.py's adapters are rank 16, which is also the slots' smallest rank
SCALING = 2.0  # lora_alpha / r of bench.py's adapters (alpha = 2r)
WEIGHT_STD = 0.02  # as bench.py's random adapters (LORA_WEIGHT_STD)
ROUND_ROBIN = (*range(MAX_LORAS), NO_ADAPTER)  # token i's slot is ROUND_ROBIN[i % len(ROUND_ROBIN)]
# Tokens per call: decode batches (one token per sequence), then two past FUSED_MAX_TOKENS, a prefill's sizes.
BATCH_SIZES = (1, 8, 32, 64, 256, 512, 2048)
TORCH_KERNELS = select_lora_kernels(use_triton=False)  # the reference, run here in float32
# The two ways of kernels/triton_lora.py; lora_apply_triton picks one by the number of tokens.
TRITON_PATHS = {"fused": triton_lora.lora_fused_triton, "2-kernel": triton_lora.lora_shrink_expand_triton}


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
    batch_sizes: tuple[int, ...]  # tokens per call
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
    "qwen3-0.6b": LoraShape(qwen3_projections(1024, 3072, 2048, 1024), BATCH_SIZES, COPY_BYTES),
    "qwen3-8b": LoraShape(qwen3_projections(4096, 12288, 4096, 1024), BATCH_SIZES, COPY_BYTES),
}
# qkv and down, with inputs that end mid-way through the shrink's 64-feature steps (masked edges) and slices that
# end mid-way through a column tile; 6 tokens fill every slot, one of them twice, and one is the base model's.
SMOKE = LoraShape((Projection("qkv", 48, (32, 16, 16)), Projection("down", 96, (80,))), (6,), 1 << 20)


@dataclass(frozen=True)
class LoraInputs:
    """One projection's adapter slots, holding random adapters, and one batch through it."""

    x: torch.Tensor  # [N, in_features]
    y: torch.Tensor  # [N, out_features]: stands for the base layer's output, which the LoRA adds into
    lora_a: torch.Tensor  # [MAX_LORAS, num_slices, LORA_RANK, in_features]
    lora_b: torch.Tensor  # [MAX_LORAS, out_features, LORA_RANK], the slices' rows one after another
    scalings: torch.Tensor  # [MAX_LORAS] float32
    metadata: LoRAMetadata  # each token's slot
    slice_starts: torch.Tensor  # [num_slices + 1] int32, where each slice's columns start in y
    num_adapter_tokens: int  # tokens served by an adapter (not NO_ADAPTER)
    num_used_adapters: int  # distinct adapters among the batch's tokens

    def run(self, apply: Callable[..., None], y: torch.Tensor) -> None:
        """y += each token's LoRA, as LoRASlots.forward calls it."""
        apply(y, self.x, self.lora_a, self.lora_b, self.scalings, self.metadata, self.slice_starts)


def make_inputs(projection: Projection, num_tokens: int, device: str, gen: torch.Generator) -> LoraInputs:
    """Random adapters in every slot and a batch of num_tokens tokens whose slots go round-robin."""
    in_features, out_features = projection.in_features, sum(projection.slice_sizes)
    num_slices = len(projection.slice_sizes)
    row_slots = np.array([ROUND_ROBIN[i % len(ROUND_ROBIN)] for i in range(num_tokens)], dtype=np.int32)  # [N]
    metadata = build_lora_metadata(row_slots, [1] * num_tokens, MAX_LORAS, torch.device(device))
    a_shape = (MAX_LORAS, num_slices, LORA_RANK, in_features)
    return LoraInputs(
        x=torch.randn(num_tokens, in_features, generator=gen, device=device).to(DTYPE),
        y=torch.randn(num_tokens, out_features, generator=gen, device=device).to(DTYPE),
        lora_a=(WEIGHT_STD * torch.randn(a_shape, generator=gen, device=device)).to(DTYPE),
        lora_b=(WEIGHT_STD * torch.randn(MAX_LORAS, out_features, LORA_RANK, generator=gen, device=device)).to(DTYPE),
        scalings=torch.full((MAX_LORAS,), SCALING, device=device),
        metadata=metadata,
        slice_starts=torch.tensor([0, *np.cumsum(projection.slice_sizes)], dtype=torch.int32, device=device),
        num_adapter_tokens=int((row_slots != NO_ADAPTER).sum()),
        num_used_adapters=len(np.unique(row_slots[row_slots != NO_ADAPTER])),
    )


def floor_bytes(projection: Projection, inputs: LoraInputs) -> int:
    """Bytes one layer's LoRA must move: the used adapters' A and B; each adapter token's input row read and its
    output row read and written (the rank-wide intermediate need not leave the chip)."""
    in_features, out_features = projection.in_features, sum(projection.slice_sizes)
    num_slices = len(projection.slice_sizes)
    weights = inputs.num_used_adapters * LORA_RANK * (num_slices * in_features + out_features)
    rows = inputs.num_adapter_tokens * (in_features + 2 * out_features)
    return (weights + rows) * DTYPE.itemsize


@triton.jit
def _touch_kernel(ptr):
    """The least a kernel can do: copy one element onto itself."""
    tl.store(ptr, tl.load(ptr))


def launch_floor_ms(device: str) -> float:
    """GPU time of the smallest Triton launch, replayed in a CUDA graph: no call with a kernel takes less."""
    one = torch.zeros(1, device=device)
    return time_graph_ms(lambda: _touch_kernel[(1,)](one), device)


def bench_projection(
    projection: Projection, num_tokens: int, device: str, gen: torch.Generator, copy_gbps: float, launch_ms: float
) -> list[Row]:
    """Both ways of one projection's LoRA for a batch of num_tokens, each checked against the float32 reference,
    then timed against the byte floor and against max(byte floor, launch floor)."""
    inputs = make_inputs(projection, num_tokens, device, gen)
    ref_y = inputs.y.float()  # [N, out_features]
    TORCH_KERNELS.apply(
        ref_y, inputs.x.float(), inputs.lora_a.float(), inputs.lora_b.float(), inputs.scalings, inputs.metadata,
        inputs.slice_starts,
    )  # fmt: skip
    bytes_ms = floor_bytes(projection, inputs) / copy_gbps / 1e6
    reachable_ms = max(bytes_ms, launch_ms)
    engine_path = "fused" if num_tokens <= triton_lora.FUSED_MAX_TOKENS else "2-kernel"
    rows = []
    for name, apply in TRITON_PATHS.items():
        milliseconds, check = check_and_time(inputs, apply, ref_y, device)
        throughput = f"bytes {1e3 * bytes_ms:.2f} us: {milliseconds / bytes_ms:.1f}x; "
        throughput += f"reachable: {milliseconds / reachable_ms:.1f}x"
        kernel = name + ("*" if name == engine_path else "")
        case = f"{projection.name}, {num_tokens} tok, {inputs.num_used_adapters} adapters"
        rows.append(Row(kernel, case, milliseconds, None, throughput, *check))
    return rows


def check_and_time(
    inputs: LoraInputs, apply: Callable[..., None], ref_y: torch.Tensor, device: str
) -> tuple[float, tuple[float, bool]]:
    """One way's GPU time per call, and its largest error against the reference (max_error's pair)."""
    y = inputs.y.clone()
    inputs.run(apply, y)
    check = max_error(y, ref_y)
    return time_graph_ms(lambda: inputs.run(apply, y), device), check


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
    launch_ms = launch_floor_ms(device)
    print(f"projections (in -> out features): {', '.join(map(describe, shape.projections))}")
    print(f"{MAX_LORAS} slots of rank {LORA_RANK}, tokens round-robin over {ROUND_ROBIN} (slot {NO_ADAPTER}: base)")
    print(f"launch floor (one-element Triton kernel in a graph): {1e3 * launch_ms:.2f} us; reachable = time against")
    print("max(byte floor, launch floor)")
    print(f"* = the way the engine takes (fused up to FUSED_MAX_TOKENS = {triton_lora.FUSED_MAX_TOKENS} tokens)")
    rows = [
        row
        for projection in shape.projections
        for num_tokens in shape.batch_sizes
        for row in bench_projection(projection, num_tokens, device, gen, copy_gbps, launch_ms)
    ]
    return report(rows, copy_gbps, BF16_TOLERANCE)


if __name__ == "__main__":
    sys.exit(main())
