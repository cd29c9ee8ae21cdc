"""Check the quantized GEMMs against the torch reference, then time them at decode sizes against their memory floor
(run: python benchmarks/quant_gemm.py).

Shapes are Qwen3-8B's linear layers in bfloat16 (hidden 4096, intermediate 12288, 32 query and 8 KV heads of 128;
bench.py's qwen3-8b shape): qkv, o, gate_up and down, at 1 to 16 tokens (decode) and 64 and 256 (prefill chunks).
Each row calls what a quantized linear layer calls on this device (kernels/quant_backends.py's Triton backend),
activation quantization included:

    w4a16    int_weight_gemm_triton: 4-bit symmetric codes, a bf16 scale per 128 input columns (compressed-tensors'
             W4A16 preset; zero points, as AWQ's, would add 1/32 of the codes' bytes)
    fp8-row  quantize_fp8_per_token, then torch._scaled_mm where the GPU has it (Hopper), else fp8_gemm_triton:
             a scale per output row and per token (compressed-tensors' FP8 dynamic, quantization="fp8")
    fp8-blk  quantize_fp8_per_token per 128 columns, then fp8_gemm_triton: a scale per [128, 128] block of the
             weight (Qwen3-8B-FP8), repeated on each of the block's rows as the layer keeps it
    bf16     F.linear on bfloat16 weights: the baseline, also in the other rows' "torch ms" column

Decode is memory-bound: a call must read its weight (codes or FP8 values, and their scales) once, read the tokens
and write the output; those bytes at the device's copy rate (measured in the same run) are the floor. Issue 26's
target is 70% of it at 16 tokens or fewer; at 64 and 256 the GEMMs near compute-bound and the share falls. Times
are GPU time of calls replayed in a CUDA graph, as the decode graphs run them. Each call takes the next of several
copies of its weights, together over COLD_BYTES, so that no call finds its weight in the L2 cache: in a model the
other layers' weights evict it between one layer's calls. Exits 1 if a check fails.

``--sweep`` times, at 1 and 16 tokens only, the W4A16 and FP8 Triton GEMMs under each of SWEEP_INT_TILES and
SWEEP_FP8_TILES, to choose triton_quant_gemm's decode tiles on a GPU: one row per setting, named by its tiles
(w4 r|l nBLOCK_N kSPLIT_K: W4A16 with the weight as the dot's right or left operand; f8r / f8b nBLOCK_N wWARPS:
FP8 per row / block).

``--smoke`` runs tiny sizes, on CPU through Triton's interpreter when there is no GPU, to test this script
itself; its timings mean nothing.
"""

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

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
from triton.runtime.errors import OutOfResources

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from nanovllm.kernels import quant_reference  # noqa: E402
from nanovllm.kernels.quant_backends import TritonQuantizedGemm  # noqa: E402
from nanovllm.kernels.triton_fp8_activations import quantize_fp8_per_token_triton  # noqa: E402
from nanovllm.kernels.triton_quant_gemm import (  # noqa: E402
    DECODE_MAX_ROWS,
    TileSizes,
    fp8_gemm_triton,
    int_weight_gemm_triton,
)

DTYPE = torch.bfloat16
WEIGHT_STD = 0.02  # as the dummy weights bench.py loads (models/loader.py)
BITS = 4  # W4A16
GROUP_SIZE = 128  # input columns per W4A16 scale: compressed-tensors' W4A16 preset
FP8_BLOCK = 128  # Qwen3-8B-FP8's weight_block_size is [128, 128]
COLD_BYTES = 1 << 28  # 256 MiB of weight copies per GEMM: over four times the H200's 60 MB L2 cache


@dataclass(frozen=True)
class LinearShape:
    """One linear layer: y [M, num_out] = x [M, num_in] @ w [num_out, num_in]^T."""

    name: str  # the layer, as in models/llama.py
    num_out: int  # N: output features
    num_in: int  # K: input features (a multiple of GROUP_SIZE and FP8_BLOCK)


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one run."""

    linears: tuple[LinearShape, ...]
    batch_sizes: tuple[int, ...]  # tokens per call (M)
    cold_bytes: int  # each GEMM's weights are copied until the copies hold this many bytes
    copy_bytes: int  # bytes copied to measure device bandwidth


HIDDEN, INTERMEDIATE, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4096, 12288, 32, 8, 128  # Qwen3-8B
FULL = Sizes(
    linears=(
        LinearShape("qkv", (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM, HIDDEN),
        LinearShape("o", HIDDEN, NUM_HEADS * HEAD_DIM),
        LinearShape("gate_up", 2 * INTERMEDIATE, HIDDEN),
        LinearShape("down", HIDDEN, INTERMEDIATE),
    ),
    batch_sizes=(1, 4, 16, 64, 256),
    cold_bytes=COLD_BYTES,
    copy_bytes=COPY_BYTES,
)
# An N that is not a multiple of the N tiles (32, 64), two groups and blocks along K, a decode and a prefill tile.
SMOKE = Sizes((LinearShape("smoke", 48, 256),), (3, 20), cold_bytes=1 << 13, copy_bytes=1 << 20)
# Decode settings --sweep tries. W4A16: N tiles, K split among programs, and which side of the dot the weight is;
# FP8 (per-row and block scales through the Triton GEMM): N tiles and warps, five steps in flight.
SWEEP_INT_TILES = tuple(
    TileSizes(16, block_n, 128, num_warps=4, num_stages=4, split_k=split_k, weights_left=weights_left)
    for weights_left in (False, True)
    for block_n in (32, 64, 128)
    for split_k in (1, 4, 8)
)
SWEEP_FP8_TILES = tuple(
    TileSizes(16, block_n, 128, num_warps, num_stages=5) for block_n in (16, 32, 64) for num_warps in (2, 4)
)

Weights = tuple[torch.Tensor, ...]  # one GEMM's weight tensors, in the order its call takes them


@dataclass(frozen=True)
class Gemm:
    """One kernel over one linear layer's weights: how to call it, its float32 reference, and the weight's copies."""

    kernel: str  # the table's name for it
    call: Callable[[torch.Tensor, Weights], torch.Tensor]  # x [M, K] bf16, one copy -> y [M, N] bf16
    reference: Callable[[torch.Tensor, Weights], torch.Tensor]  # the same in float32, dequantize then multiply
    copies: list[Weights]  # the same weights at distinct addresses

    @property
    def weight_bytes(self) -> int:
        """Bytes of one copy: codes or values, and their scales."""
        return sum(t.numel() * t.element_size() for t in self.copies[0])


def cold_copies(weights: Weights, cold_bytes: int) -> list[Weights]:
    """weights and clones of it, as many as it takes to hold cold_bytes (at least one)."""
    num_bytes = sum(t.numel() * t.element_size() for t in weights)
    num_copies = max(1, -(-cold_bytes // num_bytes))
    return [weights] + [tuple(t.clone() for t in weights) for _ in range(num_copies - 1)]


def int4_weights(shape: LinearShape, device: str, gen: torch.Generator) -> Weights:
    """Symmetric W4A16: codes [N, K / 8] int32 (every bit pattern: uniform codes), bf16 scales [N, K / GROUP_SIZE]
    giving weights of about WEIGHT_STD (a code minus the midpoint 8 has a std of 16 / sqrt(12))."""
    codes_per_word = quant_reference.BITS_PER_WORD // BITS
    qweight = torch.empty(shape.num_out, shape.num_in // codes_per_word, dtype=torch.int32, device=device)
    qweight.random_(-(2**31), 2**31 - 1, generator=gen)
    scale = WEIGHT_STD / ((1 << BITS) / 12**0.5)
    scales = scale * (0.5 + torch.rand(shape.num_out, shape.num_in // GROUP_SIZE, generator=gen, device=device))
    return qweight, scales.to(DTYPE)


def fp8_weights(shape: LinearShape, block_k: int | None, device: str, gen: torch.Generator) -> Weights:
    """E4M3 values [N, K] of std 1 and float32 scales [N, K / block_k] (block_k None: [N, 1]) near WEIGHT_STD;
    blocked, one scale per [block_k, block_k] block, repeated on each of the block's rows as the layer keeps it."""
    weight = torch.randn(shape.num_out, shape.num_in, generator=gen, device=device).to(quant_reference.FP8_DTYPE)
    if block_k is None:
        return weight, WEIGHT_STD * (0.5 + torch.rand(shape.num_out, 1, generator=gen, device=device))
    num_block_rows, num_block_cols = -(-shape.num_out // block_k), shape.num_in // block_k
    block_scales = WEIGHT_STD * (0.5 + torch.rand(num_block_rows, num_block_cols, generator=gen, device=device))
    return weight, block_scales.repeat_interleave(block_k, dim=0)[: shape.num_out]  # [N, K / block_k]


def make_gemms(
    shape: LinearShape, backend: TritonQuantizedGemm, cold_bytes: int, device: str, gen: torch.Generator
) -> list[Gemm]:
    """The bf16 baseline first, then the quantized GEMMs, each with its weights for shape, copied to cold_bytes."""
    dense = (WEIGHT_STD * torch.randn(shape.num_out, shape.num_in, generator=gen, device=device)).to(DTYPE)
    int4 = int4_weights(shape, device, gen)
    fp8_row, fp8_block = fp8_weights(shape, None, device, gen), fp8_weights(shape, FP8_BLOCK, device, gen)
    return [
        Gemm(
            "bf16",
            lambda x, w: F.linear(x, w[0]),
            lambda x, w: F.linear(x.float(), w[0].float()),
            cold_copies((dense,), cold_bytes),
        ),
        Gemm(
            "w4a16",
            lambda x, w: backend.int_weights(x, w[0], w[1], None, BITS, GROUP_SIZE),
            lambda x, w: quant_reference.int_weight_gemm(x.float(), w[0], w[1].float(), None, BITS, GROUP_SIZE),
            cold_copies(int4, cold_bytes),
        ),
        Gemm(
            "fp8-row",
            lambda x, w: backend.fp8_weights(x, w[0], w[1], None),
            lambda x, w: quant_reference.fp8_gemm(x.float(), w[0], w[1], None),
            cold_copies(fp8_row, cold_bytes),
        ),
        Gemm(
            "fp8-blk",
            lambda x, w: backend.fp8_weights(x, w[0], w[1], FP8_BLOCK),
            lambda x, w: quant_reference.fp8_gemm(x.float(), w[0], w[1], FP8_BLOCK),
            cold_copies(fp8_block, cold_bytes),
        ),
    ]


def sweep_gemms(gemms: list[Gemm], has_fp8_dot: bool) -> list[Gemm]:
    """The W4A16 GEMM under each of SWEEP_INT_TILES, and the Triton FP8 GEMM over per-row and block scales under
    each of SWEEP_FP8_TILES, on the same weight copies as gemms' rows."""
    by_kernel = {gemm.kernel: gemm for gemm in gemms}

    def int4_call(tiles: TileSizes) -> Callable[[torch.Tensor, Weights], torch.Tensor]:
        return lambda x, w: int_weight_gemm_triton(x, w[0], w[1], None, BITS, GROUP_SIZE, tiles=tiles)

    def fp8_call(tiles: TileSizes, block_k: int | None) -> Callable[[torch.Tensor, Weights], torch.Tensor]:
        def call(x: torch.Tensor, w: Weights) -> torch.Tensor:
            x_fp8, x_scales = quantize_fp8_per_token_triton(x, block_k)
            return fp8_gemm_triton(x_fp8, x_scales, w[0], w[1], block_k, x.dtype, has_fp8_dot, tiles=tiles)

        return call

    int4, fp8_row, fp8_block = by_kernel["w4a16"], by_kernel["fp8-row"], by_kernel["fp8-blk"]
    swept = []
    for t in SWEEP_INT_TILES:
        name = f"w4 {'l' if t.weights_left else 'r'} n{t.block_n} k{t.split_k}"
        swept.append(Gemm(name, int4_call(t), int4.reference, int4.copies))
    for t in SWEEP_FP8_TILES:
        name = f"n{t.block_n} w{t.num_warps}"
        swept.append(Gemm(f"f8r {name}", fp8_call(t, None), fp8_row.reference, fp8_row.copies))
        swept.append(Gemm(f"f8b {name}", fp8_call(t, FP8_BLOCK), fp8_block.reference, fp8_block.copies))
    return swept


def time_gemm_ms(gemm: Gemm, x: torch.Tensor, device: str) -> float:
    """GPU milliseconds of one call: a graph of calls over every copy of the weights, divided by the copies."""

    def run() -> None:
        for weights in gemm.copies:
            gemm.call(x, weights)

    return time_graph_ms(run, device) / len(gemm.copies)


def bench_case(
    shape: LinearShape, num_tokens: int, gemms: list[Gemm], device: str, gen: torch.Generator, copy_gbps: float
) -> list[Row]:
    """Every GEMM over num_tokens tokens: checked against its float32 reference, then timed (bf16 first)."""
    x = torch.randn(num_tokens, shape.num_in, generator=gen, device=device).to(DTYPE)  # [M, K]
    io_bytes = num_tokens * (shape.num_in + shape.num_out) * DTYPE.itemsize  # x read, y written
    case = f"{shape.name} {shape.num_out}x{shape.num_in}, {num_tokens} tok"
    rows: list[Row] = []
    for gemm in gemms:
        try:
            error, is_ok = max_error(gemm.call(x, gemm.copies[0]), gemm.reference(x, gemm.copies[0]))
        except OutOfResources as err:  # a --sweep setting too big for this GPU's shared memory
            print(f"{gemm.kernel}, {case}: skipped ({err})")
            continue
        milliseconds = time_gemm_ms(gemm, x, device)
        floor_ms = (gemm.weight_bytes + io_bytes) / copy_gbps / 1e6
        throughput = f"floor {1e3 * floor_ms:.1f} us: {floor_ms / milliseconds:.0%} of it"
        bf16_ms = rows[0].triton_ms if rows else None  # the first row is bf16's
        if bf16_ms is not None:
            throughput += f"; {milliseconds / bf16_ms:.2f}x bf16"
        rows.append(Row(gemm.kernel, case, milliseconds, bf16_ms, throughput, error, is_ok))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time decode tile settings")
    args, device = parse_benchmark_args(parser)
    sizes = SMOKE if args.smoke else FULL
    if args.sweep:  # the settings are for decode: time them at its smallest and largest batch only
        sizes = replace(sizes, batch_sizes=(min(sizes.batch_sizes), DECODE_MAX_ROWS))
    gen = torch.Generator(device=device).manual_seed(0)
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (Triton interpreter)'}")
    # The backend select_quantized_gemm picks on CUDA; on CPU (where the engine runs the torch reference) the same
    # backend runs through the interpreter, as a GPU without FP8 tensor cores would run it.
    backend = TritonQuantizedGemm(torch.cuda.get_device_capability() if device == "cuda" else (0, 0), DTYPE)
    if not backend.has_scaled_mm:
        print("fp8-row: no torch._scaled_mm here (compute capability 9.0 and bfloat16): timed through fp8_gemm_triton")
    print("triton ms: the row's GEMM as a quantized layer calls it; torch ms: bf16 F.linear of the same shape")

    copy_gbps = copy_bandwidth_gbps(sizes.copy_bytes, device)
    rows = []
    for shape in sizes.linears:
        gemms = make_gemms(shape, backend, sizes.cold_bytes, device, gen)
        swept = sweep_gemms(gemms, backend.has_fp8_dot) if args.sweep else []
        for num_tokens in sizes.batch_sizes:
            decode_sweep = swept if num_tokens <= DECODE_MAX_ROWS else []
            rows += bench_case(shape, num_tokens, gemms + decode_sweep, device, gen, copy_gbps)
        del gemms, swept  # free this layer's copies before the next layer's
    return report(rows, copy_gbps, BF16_TOLERANCE)


if __name__ == "__main__":
    sys.exit(main())
