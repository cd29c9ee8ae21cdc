"""Check the Triton kernels against the PyTorch reference, then time them (run: python benchmarks/kernels.py).

Shapes are Qwen3-0.6B's attention in bfloat16, with the two block sizes people use. Decode is
memory-bound, so it is reported as achieved bandwidth next to a plain device copy measured in the
same run, as is the MLP's SiLU(gate) * up. The sampler's race (sampling/triton_race.py) reads a
[B, 151936] bf16 logits tensor once, so it is reported the same way (though its hash and logs make it
compute-bound at large batches); its torch column is the reference torch.compile'd, as the engine
runs it without Triton, and its check counts rows whose token differs from the reference's. Decode
and both race columns are GPU time, timed inside a CUDA graph as the decode graphs run them; an
eager call, which includes the host's launches (all of it at few rows), is timed too. The other
rows, and decode's torch reference, are eager calls. Exits 1 if any check fails.

``--smoke`` runs tiny sizes, on CPU through Triton's interpreter when there is no GPU, to test
this script itself; its timings mean nothing.

``--sweep-decode`` instead times the decode kernel under every tile size, warp count and stage count of
DECODE_SWEEP (by setting triton_decode_attention.DECODE_TILES for the cache's element size in turn, as an edit of it
would), each checked against the reference, at block size 256: how the constants were chosen, to redo on another GPU.

``--sweep-prefill`` does the same for the prefill kernel's tiles (PREFILL_SWEEP), on the prefill case and on one
of bench.py's prefill steps (prompts of 100-1,024 tokens, 16,384 in all).

``--kv-cache-dtype fp8`` (or ``fp8_e5m2``) gives the decode rows, and --sweep-decode, FP8 caches: an FP8
cache halves the bytes of each loop step, so it may want other constants than bf16's.
"""

import argparse
import itertools
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

# Must be set before Triton is imported (Triton 3.9 reads it then) to run the kernels on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import triton  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from nanovllm.kernels import triton_decode_attention, triton_prefill_attention
from nanovllm.kernels.reference import paged_attention, store_kv
from nanovllm.kernels.triton_activation import gated_activation_triton
from nanovllm.kernels.triton_decode_attention import paged_decode_attention_triton
from nanovllm.kernels.triton_kv_store import store_kv_triton
from nanovllm.kernels.triton_prefill_attention import paged_prefill_attention_triton
from nanovllm.layers.activation import ACTIVATIONS, gated
from nanovllm.sampling.race import noise_keys, sample
from nanovllm.sampling.triton_race import race_winners_triton
from nanovllm.utils.compile import maybe_compile

# Qwen3-0.6B: 16 query heads sharing 8 KV heads, head_dim 128.
NUM_HEADS = 16
NUM_KV_HEADS = 8
HEAD_DIM = 128
BLOCK_SIZES = (256, 16)  # nano-vllm's default block size, and vLLM's
DTYPE = torch.bfloat16
# |out - ref| <= tol * (1 + |ref|) against a float32 reference: a few bf16 roundings (8 mantissa bits).
BF16_TOLERANCE = 2e-2
COPY_BYTES = 1 << 30  # the copy-bandwidth probe moves 1 GiB, far past the H100's 50 MB L2 cache
# --kv-cache-dtype: the decode cases' caches (kv_cache_dtype's values; the prefill and store rows stay bf16).
KV_DTYPES = {"auto": DTYPE, "fp8": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# --sweep-decode's settings: triton_decode_attention.DecodeTiles (BLOCK_N, warps, stages).
DECODE_SWEEP = tuple(itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3, 4)))
DECODE_SWEEP_SMOKE = ((32, 2, 2), (64, 4, 3))
# --sweep-prefill's settings: triton_prefill_attention.PrefillTiles (BLOCK_M, BLOCK_N, warps, stages).
PREFILL_SWEEP = tuple(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)))
PREFILL_SWEEP_SMOKE = ((64, 64, 4, 3), (64, 32, 4, 2))


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one run."""

    store_tokens: int  # tokens written by store_kv
    prefill_seqs: int  # sequences in the prefill batch
    prefill_len: int  # prompt tokens per prefill sequence (no cached prefix)
    # (batch size, context tokens per sequence, max_context_len given to the kernel: a CUDA graph passes max_model_len)
    decode_cases: tuple[tuple[int, int, int], ...]
    race_cases: tuple[tuple[int, int], ...]  # (rows, vocabulary size) of the sampler's race
    gated_cases: tuple[tuple[int, int], ...]  # (rows, d) of the gated MLP's act(gate) * up: [rows, 2 d] -> [rows, d]
    copy_bytes: int  # bytes copied to measure device bandwidth


FULL = Sizes(
    store_tokens=16384,
    prefill_seqs=8,
    prefill_len=1024,
    decode_cases=((256, 1000, 1000), (64, 8192, 8192), (64, 1000, 4096), (16, 1500, 4096)),
    race_cases=((256, 151936), (8, 151936), (1, 151936)),  # a full decode batch, and a batch's last few rows
    gated_cases=((16384, 3072), (256, 3072)),  # Qwen3-0.6B's MLP: one of bench.py's prefill steps, a decode step
    copy_bytes=COPY_BYTES,
)
SMOKE = Sizes(
    store_tokens=64,
    prefill_seqs=2,
    prefill_len=40,
    decode_cases=((4, 100, 100), (2, 300, 1024)),
    race_cases=((4, 5000),),
    gated_cases=((5, 1100),),
    copy_bytes=1 << 20,
)


@dataclass
class Row:
    """One line of the results table."""

    kernel: str  # which kernel
    case: str  # problem size
    triton_ms: float  # median time of the Triton kernel
    torch_ms: float | None  # median time of the PyTorch reference, where timed
    throughput: str  # GB/s or TFLOP/s, where meaningful
    max_error: float  # largest |triton - reference|
    is_ok: bool  # the check passed


def time_ms(fn: Callable[[], object], device: str) -> float:
    """Median milliseconds per call: triton.testing.do_bench on GPU; under the interpreter, where timings mean
    nothing (--smoke), the wall clock of one call, which keeps the smoke runs short."""
    if device == "cuda":
        return triton.testing.do_bench(fn, return_mode="median")
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def time_graph_ms(fn: Callable[[], object], device: str) -> float:
    """Median milliseconds per call replayed in a CUDA graph: the GPU's time alone, with no launch gaps (and no
    cache flush between calls: inputs smaller than the L2 cache stay in it, as the LM head's logits do)."""
    if device != "cuda":
        return time_ms(fn, device)
    return triton.testing.do_bench_cudagraph(fn, return_mode="median")


def paged_cache(
    num_seqs: int, context_len: int, block_size: int, device: str, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random K/V caches holding num_seqs sequences of context_len tokens in shuffled blocks.

    Returns k_cache, v_cache [num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM], block_tables
    [num_seqs, blocks_per_seq] int32 and context_lens [num_seqs] int32.
    """
    blocks_per_seq = triton.cdiv(context_len, block_size)
    num_blocks = num_seqs * blocks_per_seq
    shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, generator=gen, device=device, dtype=DTYPE)
    v_cache = torch.randn(shape, generator=gen, device=device, dtype=DTYPE)
    block_ids = torch.randperm(num_blocks, generator=gen, device=device).to(torch.int32)  # fragmented like a live pool
    block_tables = block_ids.view(num_seqs, blocks_per_seq)  # [num_seqs, blocks_per_seq]
    context_lens = torch.full((num_seqs,), context_len, dtype=torch.int32, device=device)
    return k_cache, v_cache, block_tables, context_lens


def max_error(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, bool]:
    """Largest |out - ref| (inf if any NaN), and whether every element is within BF16_TOLERANCE."""
    error = (out.float() - ref.float()).abs()
    is_ok = bool((error <= BF16_TOLERANCE * (1 + ref.float().abs())).all())
    return error.nan_to_num(float("inf")).max().item(), is_ok


def bench_store_kv(sizes: Sizes, block_size: int, device: str, gen: torch.Generator) -> Row:
    """store_kv of one prefill batch's tokens into consecutive slots of shuffled blocks."""
    num_tokens = sizes.store_tokens
    k_cache, v_cache, block_tables, _ = paged_cache(1, num_tokens, block_size, device, gen)
    positions = torch.arange(num_tokens, device=device)
    slot_mapping = block_tables[0].long()[positions // block_size] * block_size + positions % block_size  # [N]
    key = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen, device=device, dtype=DTYPE)
    value = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen, device=device, dtype=DTYPE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv(key, value, k_ref, v_ref, slot_mapping)
    store_kv_triton(key, value, k_cache, v_cache, slot_mapping)
    error = max(max_error(k_cache, k_ref)[0], max_error(v_cache, v_ref)[0])

    triton_ms = time_ms(lambda: store_kv_triton(key, value, k_cache, v_cache, slot_mapping), device)
    torch_ms = time_ms(lambda: store_kv(key, value, k_cache, v_cache, slot_mapping), device)
    num_bytes = 2 * 2 * key.numel() * key.element_size()  # K and V, each read once and written once
    case = f"{num_tokens} tok, bs {block_size}"
    return Row("store_kv", case, triton_ms, torch_ms, f"{num_bytes / triton_ms / 1e6:.0f} GB/s", error, error == 0)


@dataclass(frozen=True)
class AttentionInputs:
    """One call of an attention kernel over a paged cache, and its float32 reference's output."""

    kernel: Callable[..., torch.Tensor]  # paged_prefill_attention_triton or paged_decode_attention_triton
    query: torch.Tensor  # [tokens, NUM_HEADS, HEAD_DIM]
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    kernel_args: tuple  # the kernel's after query and the caches
    ref_args: tuple  # paged_attention's after query and the caches
    ref: torch.Tensor  # the float32 reference's output
    work: float  # what the kernel's rate counts: FLOPs of QK^T and PV (prefill), K and V bytes read (decode)

    def run(self) -> torch.Tensor:
        return self.kernel(self.query, self.k_cache, self.v_cache, *self.kernel_args)


def prefill_inputs(prompt_lens: list[int], block_size: int, device: str, gen: torch.Generator) -> AttentionInputs:
    """Causal prefill of prompts of prompt_lens tokens, their K/V already in the cache (no cached prefix)."""
    num_seqs, max_len = len(prompt_lens), max(prompt_lens)
    k_cache, v_cache, block_tables, _ = paged_cache(num_seqs, max_len, block_size, device, gen)
    context_lens = torch.tensor(prompt_lens, dtype=torch.int32, device=device)
    cu_seqlens_q = torch.zeros(num_seqs + 1, dtype=torch.int32, device=device)
    cu_seqlens_q[1:] = context_lens.cumsum(0)
    query = torch.randn(sum(prompt_lens), NUM_HEADS, HEAD_DIM, generator=gen, device=device, dtype=DTYPE)
    args = (cu_seqlens_q, max_len, context_lens, max_len, block_tables, HEAD_DIM**-0.5)
    ref = paged_attention(query.float(), k_cache.float(), v_cache.float(), *args)
    flops = sum(4 * NUM_HEADS * HEAD_DIM * n * (n + 1) / 2 for n in prompt_lens)  # the causal half
    return AttentionInputs(paged_prefill_attention_triton, query, k_cache, v_cache, args, args, ref, flops)


def bench_prompt_lens(sizes: Sizes) -> list[int]:
    """One of bench.py's prefill steps, scaled: prompts of prefill_len / 10 to prefill_len tokens (bench.py: 100 to
    1,024), 2 * prefill_seqs * prefill_len in all (16,384, its max_num_batched_tokens)."""
    rng = random.Random(0)
    total, lens = 2 * sizes.prefill_seqs * sizes.prefill_len, []
    while sum(lens) < total:
        lens.append(min(rng.randint(sizes.prefill_len // 10, sizes.prefill_len), total - sum(lens)))
    return lens


def bench_prefill(sizes: Sizes, block_size: int, device: str, gen: torch.Generator) -> Row:
    """Causal prefill of prefill_seqs prompts of prefill_len tokens, K/V already in the cache."""
    inputs = prefill_inputs([sizes.prefill_len] * sizes.prefill_seqs, block_size, device, gen)
    error, is_ok = max_error(inputs.run(), inputs.ref)
    triton_ms = time_ms(inputs.run, device)
    torch_ms = time_ms(lambda: paged_attention(inputs.query, inputs.k_cache, inputs.v_cache, *inputs.ref_args), device)
    case = f"{sizes.prefill_seqs}x{sizes.prefill_len}, bs {block_size}"
    return Row("prefill", case, triton_ms, torch_ms, f"{inputs.work / triton_ms / 1e9:.1f} TFLOP/s", error, is_ok)


def decode_inputs(
    case: tuple[int, int, int], block_size: int, device: str, gen: torch.Generator, kv_dtype: torch.dtype = DTYPE
) -> AttentionInputs:
    """One decode step of num_seqs sequences with context_len cached tokens each. kv_dtype FP8: the caches hold
    the FP8 values of the random bf16 ones (scales 1; randn stays far below the formats' largest values), and the
    reference reads those values."""
    num_seqs, context_len, grid_context_len = case
    k_cache, v_cache, block_tables, context_lens = paged_cache(num_seqs, context_len, block_size, device, gen)
    k_cache, v_cache = k_cache.to(kv_dtype), v_cache.to(kv_dtype)
    query = torch.randn(num_seqs, NUM_HEADS, HEAD_DIM, generator=gen, device=device, dtype=DTYPE)
    kernel_args = (context_lens, grid_context_len, block_tables, HEAD_DIM**-0.5)
    cu_seqlens_q = torch.arange(num_seqs + 1, device=device, dtype=torch.int32)  # one query token each
    ref_args = (cu_seqlens_q, 1, context_lens, context_len, block_tables, HEAD_DIM**-0.5)
    ref = paged_attention(query.float(), k_cache.float(), v_cache.float(), *ref_args)
    kv_bytes = num_seqs * context_len * NUM_KV_HEADS * HEAD_DIM * 2 * k_cache.element_size()  # K and V
    return AttentionInputs(paged_decode_attention_triton, query, k_cache, v_cache, kernel_args, ref_args, ref, kv_bytes)


def bench_decode(
    case: tuple[int, int, int],
    block_size: int,
    device: str,
    gen: torch.Generator,
    copy_gbps: float,
    kv_dtype: torch.dtype = DTYPE,
) -> Row:
    """One decode step of num_seqs sequences with context_len cached tokens each."""
    num_seqs, context_len, grid_context_len = case
    inputs = decode_inputs(case, block_size, device, gen, kv_dtype)
    error, is_ok = max_error(inputs.run(), inputs.ref)

    triton_ms = time_graph_ms(inputs.run, device)
    eager_ms = time_ms(inputs.run, device)
    k_cache, v_cache = inputs.k_cache.to(DTYPE), inputs.v_cache.to(DTYPE)  # torch multiplies no FP8: bf16 copies
    torch_ms = time_ms(lambda: paged_attention(inputs.query, k_cache, v_cache, *inputs.ref_args), device)
    num_bytes = inputs.work + 2 * inputs.query.numel() * inputs.query.element_size()  # + query read, output written
    gbps = num_bytes / triton_ms / 1e6
    grid = "" if grid_context_len == context_len else f", grid {grid_context_len}"
    case_name = f"{num_seqs}x{context_len}, bs {block_size}{grid}" + ("" if kv_dtype == DTYPE else ", fp8")
    throughput = f"{gbps:.0f} GB/s ({100 * gbps / copy_gbps:.0f}% copy), eager {eager_ms:.3f} ms"
    return Row("decode", case_name, triton_ms, torch_ms, throughput, error, is_ok)


@dataclass(frozen=True)
class SweepCase:
    """One problem a sweep times every setting on."""

    name: str
    run: Callable[[], torch.Tensor]  # the kernel under the current setting
    ref: torch.Tensor  # the reference's output
    rate: Callable[[float], str]  # milliseconds -> what the cell shows beside them


def sweep(
    header: str, settings: Sequence[tuple[int, ...]], chosen: tuple[int, ...], apply: Callable[[tuple[int, ...]], None],
    cases: list[SweepCase], device: str,
) -> int:  # fmt: skip
    """Print each setting's GPU time on every case (a CUDA graph), each checked against the reference, then the
    fastest per case; ``apply`` sets a setting as an edit of the kernel's constants would, and ``chosen`` is put
    back at the end. A setting too big for the GPU's shared memory is skipped. Returns how many were wrong."""
    print(f"{header:<28}" + "".join(f"{case.name:>22}" for case in cases))
    best: dict[str, tuple[float, tuple[int, ...]]] = {}
    num_wrong = 0
    try:
        for setting in settings:
            apply(setting)
            cells = []
            for case in cases:
                try:
                    _, is_ok = max_error(case.run(), case.ref)
                except OutOfResources:
                    cells.append("out of resources")
                    continue
                ms = time_graph_ms(case.run, device)
                cells.append(f"{ms * 1e3:.1f} ({case.rate(ms)})" + ("" if is_ok else " FAIL"))
                num_wrong += not is_ok
                if is_ok and (case.name not in best or ms < best[case.name][0]):
                    best[case.name] = (ms, setting)
            label = ", ".join(map(str, setting)) + (" *" if tuple(setting) == tuple(chosen) else "")
            print(f"{label:<28}" + "".join(f"{cell:>22}" for cell in cells), flush=True)
    finally:
        apply(chosen)
    for case_name, (ms, setting) in best.items():
        print(f"fastest at {case_name}: {setting} ({ms * 1e3:.1f} us)")
    return num_wrong


def sweep_decode(sizes: Sizes, device: str, gen: torch.Generator, copy_gbps: float, kv_dtype: torch.dtype) -> int:
    """The decode kernel under each setting of DECODE_SWEEP at every decode case (block size 256)."""
    element_size = min(kv_dtype.itemsize, 2)  # the key of triton_decode_attention.DECODE_TILES

    def apply(setting: tuple[int, ...]) -> None:
        triton_decode_attention.DECODE_TILES[element_size] = triton_decode_attention.DecodeTiles(*setting)

    cases = []
    for num_seqs, context_len, grid_context_len in sizes.decode_cases:
        grid = "" if grid_context_len == context_len else f" g{grid_context_len}"
        inputs = decode_inputs((num_seqs, context_len, grid_context_len), 256, device, gen, kv_dtype)
        share = partial(lambda kv_bytes, ms: f"{100 * kv_bytes / ms / 1e6 / copy_gbps:.0f}%", inputs.work)
        cases.append(SweepCase(f"{num_seqs}x{context_len}{grid}", inputs.run, inputs.ref, share))
    print(f"\ndecode GPU time (us) and share of the {copy_gbps:.0f} GB/s copy rate; * = the current constants")
    settings = DECODE_SWEEP if device == "cuda" else DECODE_SWEEP_SMOKE
    current = triton_decode_attention.DECODE_TILES[element_size]
    return sweep("BLOCK_N, warps, stages", settings, current, apply, cases, device)


def sweep_prefill(sizes: Sizes, device: str, gen: torch.Generator) -> int:
    """The prefill kernel under each setting of PREFILL_SWEEP: the prefill case, and on a GPU bench.py's prompt mix
    (prompts of 100-1,024 tokens, 16,384 in all: one of its prefill steps), at block size 256."""
    cases = []
    prompt_mixes = [(f"{sizes.prefill_seqs}x{sizes.prefill_len}", [sizes.prefill_len] * sizes.prefill_seqs)]
    if device == "cuda":  # under the interpreter one case costs seconds a setting
        prompt_mixes.append(("bench mix", bench_prompt_lens(sizes)))
    for name, prompt_lens in prompt_mixes:
        inputs = prefill_inputs(prompt_lens, 256, device, gen)
        tflops = partial(lambda flops, ms: f"{flops / ms / 1e9:.0f} TF/s", inputs.work)
        cases.append(SweepCase(name, inputs.run, inputs.ref, tflops))
    print("\nprefill GPU time (us) and TFLOP/s; * = the current constants")
    settings = PREFILL_SWEEP if device == "cuda" else PREFILL_SWEEP_SMOKE

    def apply(setting: tuple[int, ...]) -> None:
        triton_prefill_attention.PREFILL_TILES = triton_prefill_attention.PrefillTiles(*setting)

    current = triton_prefill_attention.PREFILL_TILES
    return sweep("BLOCK_M, BLOCK_N, warps, stages", settings, current, apply, cases, device)


def bench_race(case: tuple[int, int], device: str, gen: torch.Generator, copy_gbps: float) -> Row:
    """The temperature-only race of one decode step: bf16 logits, temperatures 0.6 (every 8th row greedy)."""
    num_rows, vocab_size = case
    logits = (torch.randn(num_rows, vocab_size, generator=gen, device=device) * 3).to(DTYPE)
    temperatures = torch.full((num_rows,), 0.6, device=device)
    temperatures[::8] = 0.0
    engine_keys = torch.randint(-(1 << 31), 1 << 31, (2,), generator=gen, device=device, dtype=torch.int32)
    draw_count = torch.tensor(7, device=device)

    def run() -> torch.Tensor:
        return race_winners_triton(logits, engine_keys, draw_count, temperatures)

    num_differing = int((run() != keyed_sample(logits, temperatures, engine_keys, draw_count)).sum())

    triton_ms = time_graph_ms(run, device)
    eager_ms = time_ms(run, device)
    # The torch path compiled as the engine runs it without Triton: the keys, then the fused race.
    reference = torch.compile(keyed_sample) if device == "cuda" else keyed_sample
    torch_ms = time_graph_ms(lambda: reference(logits, temperatures, engine_keys, draw_count), device)
    gbps = logits.numel() * logits.element_size() / triton_ms / 1e6
    throughput = f"{gbps:.0f} GB/s ({100 * gbps / copy_gbps:.0f}% copy), eager {eager_ms:.3f} ms"
    return Row(
        "race", f"{num_rows}x{vocab_size} bf16", triton_ms, torch_ms, throughput, num_differing, num_differing == 0
    )


def bench_gated(case: tuple[int, int], device: str, gen: torch.Generator, copy_gbps: float) -> Row:
    """SiLU(gate) * up of a gated MLP (bf16). The torch column is the function the engine compiles without Triton
    (layers/activation.py, dynamic shapes as in prefill), eager calls both."""
    num_rows, d = case
    x = (3 * torch.randn(num_rows, 2 * d, generator=gen, device=device)).to(DTYPE)
    ref = gated(ACTIVATIONS["silu"])(x.float())
    error, is_ok = max_error(gated_activation_triton(x, "silu"), ref)
    compiled = maybe_compile(gated(ACTIVATIONS["silu"]), device == "cuda")
    triton_ms = time_ms(lambda: gated_activation_triton(x, "silu"), device)
    torch_ms = time_ms(lambda: compiled(x), device)
    gbps = 3 * num_rows * d * x.element_size() / triton_ms / 1e6  # 2 d values read and d written per row
    torch_gbps = 3 * num_rows * d * x.element_size() / torch_ms / 1e6
    throughput = f"{gbps:.0f} GB/s ({100 * gbps / copy_gbps:.0f}% copy), torch {100 * torch_gbps / copy_gbps:.0f}%"
    return Row("silu*up", f"{num_rows} x {d} bf16", triton_ms, torch_ms, throughput, error, is_ok)


def keyed_sample(
    logits: torch.Tensor, temperatures: torch.Tensor, engine_keys: torch.Tensor, draw_count: torch.Tensor
) -> torch.Tensor:
    """The torch reference of race_winners_triton: this draw's noise keys, then the race."""
    return sample(logits, temperatures, noise_keys(engine_keys, draw_count, logits.shape[0], None, None))


def copy_bandwidth_gbps(num_bytes: int, device: str) -> float:
    """Device memory bandwidth of a plain tensor copy: bytes read + bytes written per second."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * num_bytes / time_ms(lambda: dst.copy_(src), device) / 1e6


def parse_benchmark_args(parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, str]:
    """The kernel benchmarks' command line: ``parser``'s own arguments and --smoke, and the device to run on
    (the full benchmark needs a CUDA GPU; --smoke runs anywhere)."""
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to test the script (CPU works)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        parser.error("the full benchmark needs a CUDA GPU; use --smoke to test the script on CPU")
    return args, device


def report(rows: list[Row], copy_gbps: float, tolerance: float | None = None) -> int:
    """Prints the table and the verdict; returns the exit code: 1 if a check failed."""
    print_table(rows, copy_gbps)
    num_failed = sum(not row.is_ok for row in rows)
    within = f" (tolerance {tolerance})" if tolerance is not None else ""
    print(f"\n{num_failed} check(s) failed{within}" if num_failed else "\nall checks passed")
    return 1 if num_failed else 0


def print_table(rows: list[Row], copy_gbps: float) -> None:
    header = f"{'kernel':<9}{'case':<34}{'triton ms':>11}{'torch ms':>11}  {'throughput':<44}{'max err':>9}  check"
    print(f"\ndevice copy bandwidth: {copy_gbps:.0f} GB/s\n{header}\n{'-' * len(header)}")
    for row in rows:
        torch_ms = f"{row.torch_ms:.3f}" if row.torch_ms is not None else "-"
        check = "ok" if row.is_ok else "FAIL"
        print(
            f"{row.kernel:<9}{row.case:<34}{row.triton_ms:>11.3f}{torch_ms:>11}  {row.throughput:<44}"
            f"{row.max_error:>9.2e}  {check}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sweep_kind = parser.add_mutually_exclusive_group()
    sweep_kind.add_argument("--sweep-decode", action="store_true", help="time the decode kernel's settings instead")
    sweep_kind.add_argument("--sweep-prefill", action="store_true", help="time the prefill kernel's settings instead")
    parser.add_argument("--kv-cache-dtype", choices=sorted(KV_DTYPES), default="auto", help="the decode rows' caches")
    parsed, device = parse_benchmark_args(parser)
    kv_dtype = KV_DTYPES[parsed.kv_cache_dtype]
    sizes = SMOKE if parsed.smoke else FULL
    gen = torch.Generator(device=device).manual_seed(0)
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (Triton interpreter)'}")

    copy_gbps = copy_bandwidth_gbps(sizes.copy_bytes, device)
    if parsed.sweep_decode or parsed.sweep_prefill:
        if parsed.sweep_decode:
            num_wrong = sweep_decode(sizes, device, gen, copy_gbps, kv_dtype)
        else:
            num_wrong = sweep_prefill(sizes, device, gen)
        print(f"\n{num_wrong} setting(s) gave a wrong result" if num_wrong else "\nall settings correct")
        return 1 if num_wrong else 0
    rows = []
    for block_size in BLOCK_SIZES:
        rows.append(bench_store_kv(sizes, block_size, device, gen))
        rows.append(bench_prefill(sizes, block_size, device, gen))
        for case in sizes.decode_cases:
            rows.append(bench_decode(case, block_size, device, gen, copy_gbps, kv_dtype))
        if device == "cuda":
            torch.cuda.empty_cache()
    rows += [bench_race(case, device, gen, copy_gbps) for case in sizes.race_cases]
    rows += [bench_gated(case, device, gen, copy_gbps) for case in sizes.gated_cases]
    return report(rows, copy_gbps)


if __name__ == "__main__":
    sys.exit(main())
