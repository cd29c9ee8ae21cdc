"""The Triton kernels (KV store, paged attention, norm + rotary, the sampler's race) against the plain-PyTorch
references.

On CPU the kernels run in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1), which
executes every program in Python, so the sizes here are small. On a GPU the same tests run
compiled kernels.
"""

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from nanovllm.kernels.reference import paged_attention, store_kv
from nanovllm.kernels.triton_decode_attention import default_num_splits, paged_decode_attention_triton
from nanovllm.kernels.triton_kv_store import store_kv_triton
from nanovllm.kernels.triton_prefill_attention import PREFILL_TILES, paged_prefill_attention_triton
from nanovllm.sampling.race import noise_keys, race_winners, sample
from nanovllm.sampling.triton_race import BLOCK_V, race_winners_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Absolute and relative tolerance against a float32 reference on the same (rounded) inputs:
# float32 differs only by summation order; 16-bit outputs carry one rounding of the output
# (bf16 has 8 mantissa bits, fp16 11) plus the probabilities rounded for the P @ V product.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@dataclass
class PagedBatch:
    """Random queries and a paged cache holding each sequence's context, as the engine lays them out."""

    query: torch.Tensor  # [N, num_heads, head_dim], a strided view like the model's q of a fused qkv
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim], random everywhere
    v_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    k_poisoned: torch.Tensor  # k_cache with NaN in every slot outside all contexts and windows (block 0 included)
    v_poisoned: torch.Tensor  # v_cache, likewise
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    context_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32, shuffled block ids, padded with 0
    max_seqlen_q: int  # longest query, in tokens
    max_context_len: int  # longest context, in tokens
    sliding_window: int | None  # keys each query sees, itself included; None: every key before it


def make_batch(
    q_lens: list[int], context_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
    dtype: torch.dtype = torch.float32, seed: int = 0, sliding_window: int | None = None,
) -> PagedBatch:  # fmt: skip
    """Sequence b has context_lens[b] cached tokens, the last q_lens[b] of which are queries.

    Block ids are shuffled and start at 1: block 0 is what padding entries point at, and it
    holds only NaN in the poisoned caches, like every slot past a sequence's end and, with a
    sliding window, every slot before the window of the sequence's first query.
    """
    gen = torch.Generator().manual_seed(seed)
    num_seqs = len(q_lens)
    blocks_per_seq = [-(-context_len // block_size) for context_len in context_lens]
    num_blocks = 1 + sum(blocks_per_seq) + 1  # padding block 0, the sequences' blocks, one spare
    block_ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    block_tables = torch.zeros(num_seqs, max(blocks_per_seq) + 1, dtype=torch.int32)  # one column of padding
    is_used = torch.zeros(num_blocks * block_size, dtype=torch.bool)  # [num_slots]
    for seq_idx, (num_seq_blocks, context_len) in enumerate(zip(blocks_per_seq, context_lens, strict=True)):
        seq_blocks = [block_ids.pop() for _ in range(num_seq_blocks)]
        block_tables[seq_idx, :num_seq_blocks] = torch.tensor(seq_blocks, dtype=torch.int32)
        first_query_pos = context_len - q_lens[seq_idx]
        first_seen = 0 if sliding_window is None else max(0, first_query_pos - sliding_window + 1)
        positions = torch.arange(first_seen, context_len)  # [keys some query of the sequence sees]
        seq_block_ids = torch.tensor(seq_blocks, dtype=torch.long)[positions // block_size]  # [context_len]
        is_used[seq_block_ids * block_size + positions % block_size] = True

    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    v_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    k_poisoned, v_poisoned = k_cache.clone(), v_cache.clone()
    k_poisoned.view(-1, num_kv_heads, head_dim)[~is_used] = float("nan")
    v_poisoned.view(-1, num_kv_heads, head_dim)[~is_used] = float("nan")
    qkv = torch.randn(sum(q_lens), num_heads + 2 * num_kv_heads, head_dim, generator=gen).to(dtype)
    cu_seqlens_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return PagedBatch(
        query=qkv[:, :num_heads].to(DEVICE), k_cache=k_cache.to(DEVICE), v_cache=v_cache.to(DEVICE),
        k_poisoned=k_poisoned.to(DEVICE), v_poisoned=v_poisoned.to(DEVICE), cu_seqlens_q=cu_seqlens_q.to(DEVICE),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=DEVICE), block_tables=block_tables.to(DEVICE),
        max_seqlen_q=max(q_lens), max_context_len=max(context_lens), sliding_window=sliding_window,
    )  # fmt: skip


def reference_attention(batch: PagedBatch, scale: float) -> torch.Tensor:
    """The reference in float32 on the batch's (possibly 16-bit) values and the clean cache."""
    return paged_attention(
        batch.query.float(), batch.k_cache.float(), batch.v_cache.float(), batch.cu_seqlens_q, batch.max_seqlen_q,
        batch.context_lens, batch.max_context_len, batch.block_tables, scale, batch.sliding_window,
    )  # fmt: skip


@contextmanager
def nan_filled_empty() -> Iterator[None]:
    """Inside, torch.empty returns NaN, so an output element a kernel never writes shows up as NaN."""
    was_enabled = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # turns on fill_uninitialized_memory
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_enabled, warn_only=was_warn_only)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Elementwise |out - ref| <= tol * (1 + |ref|); NaN counts as a mismatch."""
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype, f"output dtype {out.dtype}, expected {dtype}"
    error = (out.float() - ref).abs()
    is_ok = error <= tol * (1 + ref.abs())
    assert is_ok.all(), (
        f"{(~is_ok).sum().item()} of {ref.numel()} elements off (NaN: {out.isnan().sum().item()}); "
        f"max abs error {error.nan_to_num(float('inf')).max().item():.3g}, tolerance {tol}"
    )


@pytest.mark.parametrize(
    ("num_kv_heads", "head_dim", "key_dtype", "cache_dtype"),
    [
        (2, 16, torch.float32, torch.float32),
        (3, 40, torch.float32, torch.float32),
        (16, 64, torch.bfloat16, torch.bfloat16),
        # float32 -> float16 only: the CPU interpreter truncates float32 -> bfloat16 casts instead of rounding.
        (1, 128, torch.float32, torch.float16),
    ],
)
def test_store_kv_matches_reference(
    num_kv_heads: int, head_dim: int, key_dtype: torch.dtype, cache_dtype: torch.dtype
) -> None:
    """Guards against wrong slot -> (block, offset) arithmetic, writing padded lanes (slot -1),
    dropping heads when num_kv_heads is not a power of two or exceeds one program's head block,
    skipping the cast to the cache dtype, and reading the value with the key's strides (they differ)."""
    gen = torch.Generator().manual_seed(1)
    num_tokens, num_blocks, block_size = 12, 5, 16
    kv = torch.randn(num_tokens, 3 * num_kv_heads, head_dim, generator=gen).to(DEVICE, key_dtype)  # like a fused qkv
    # The key contiguous, as the norm + rotary kernel returns it; the value a view of the fused qkv output.
    key, value = kv[:, num_kv_heads : 2 * num_kv_heads].contiguous(), kv[:, 2 * num_kv_heads :]
    slot_mapping = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(DEVICE)
    slot_mapping[[2, 7]] = -1
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(DEVICE, cache_dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(DEVICE, cache_dtype)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    store_kv(key, value, k_expected, v_expected, slot_mapping)

    k_before = k_cache.clone()
    store_kv_triton(key, value, k_cache, v_cache, slot_mapping)

    assert torch.equal(k_cache, k_expected), f"k_cache max diff {(k_cache.float() - k_expected.float()).abs().max()}"
    assert torch.equal(v_cache, v_expected), f"v_cache max diff {(v_cache.float() - v_expected.float()).abs().max()}"
    num_changed = (k_cache != k_before).any(-1).any(-1).sum().item()
    assert num_changed == num_tokens - 2, f"{num_changed} slots changed, expected {num_tokens - 2} (two are -1)"


PREFILL_CASES = {
    # name: (q_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size)
    "ragged_no_prefix": ([5, 17, 33], [5, 17, 33], 4, 2, 32, 16),
    "cached_prefixes": ([7, 1, 20, 3], [16, 40, 36, 48], 4, 2, 32, 16),
    "gqa_8_to_1_bs32_d16": ([9, 40], [9, 70], 8, 1, 16, 32),
    "two_query_tiles_d64": ([PREFILL_TILES.block_m + 6], [PREFILL_TILES.block_m + 11], 2, 2, 64, 16),
    "d128_bs32": ([12, 3], [12, 50], 4, 1, 128, 32),
}


@pytest.mark.parametrize("case", PREFILL_CASES)
def test_prefill_attention_matches_reference(case: str) -> None:
    """Guards against a wrong causal mask with cached prefixes (chunks that start mid-block, at a
    block boundary, or are one token long), cu_seqlens/ragged indexing, block-table lookups across
    blocks, GQA head mapping, query tiles past the first, masked head_dim padding, and reading
    slots past context_len or through padding entries (those hold NaN here)."""
    q_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size = PREFILL_CASES[case]
    batch = make_batch(q_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size)
    _check_prefill(batch, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_attention_16bit(dtype: torch.dtype) -> None:
    """Guards against 16-bit inputs breaking the float32 accumulation or the output cast."""
    batch = make_batch(*PREFILL_CASES["cached_prefixes"], dtype=dtype, seed=2)
    _check_prefill(batch, dtype)


def _check_prefill(batch: PagedBatch, dtype: torch.dtype) -> None:
    scale = batch.query.shape[-1] ** -0.5
    with nan_filled_empty():
        out = paged_prefill_attention_triton(
            batch.query, batch.k_poisoned, batch.v_poisoned, batch.cu_seqlens_q, batch.max_seqlen_q,
            batch.context_lens, batch.max_context_len, batch.block_tables, scale, batch.sliding_window,
        )  # fmt: skip
    assert_close(out, reference_attention(batch, scale), dtype)


DECODE_CASES = {
    # name: (context_lens, num_heads, num_kv_heads, head_dim, block_size, num_splits)
    "auto_splits": ([300, 37, 513, 1], 4, 2, 32, 16, None),
    "one_split": ([300, 37, 513, 1], 4, 2, 32, 16, 1),
    "more_splits_than_needed": ([300, 37, 513, 1], 4, 2, 32, 16, 16),
    "gqa_8_to_1_d128_bs32": ([200, 65], 8, 1, 128, 32, 2),
    "mha_d16_bs64": ([150, 7, 64], 2, 2, 16, 64, 3),
    "d64": ([100, 257], 4, 2, 64, 16, None),
    "d80_not_pow2": ([129, 40], 4, 1, 80, 16, 2),
}
# A CUDA graph launches decode with max_context_len = max_model_len, far above the real contexts.
GRAPH_MAX_CONTEXT_LEN = 4096


@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_attention_matches_reference(case: str) -> None:
    """Guards against a wrong split-KV merge (log-sum-exp weights, empty splits of short sequences,
    a split ending mid-tile), GQA groups padded to 16 rows for tl.dot, block-table lookups over long
    shuffled tables, and reading slots past context_len (those hold NaN here)."""
    context_lens, num_heads, num_kv_heads, head_dim, block_size, num_splits = DECODE_CASES[case]
    batch = make_batch([1] * len(context_lens), context_lens, num_heads, num_kv_heads, head_dim, block_size)
    _check_decode(batch, torch.float32, num_splits)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_attention_16bit(dtype: torch.dtype, num_splits: int) -> None:
    """Guards against 16-bit inputs breaking the float32 partial results or the output cast."""
    batch = make_batch([1] * 4, *DECODE_CASES["auto_splits"][:-1], dtype=dtype, seed=3)
    _check_decode(batch, dtype, num_splits=num_splits)


def test_decode_attention_graph_sized_grid() -> None:
    """Guards against splits sized for the graph's max_context_len instead of each sequence's own context
    (most splits empty, or the merge reading splits that phase 1 never wrote)."""
    batch = make_batch([1] * 4, [300, 37, 1100, 1], 4, 2, 32, 16)
    _check_decode(batch, torch.float32, num_splits=8, max_context_len=GRAPH_MAX_CONTEXT_LEN, min_split_len=256)
    _check_decode(batch, torch.float32, num_splits=None, max_context_len=GRAPH_MAX_CONTEXT_LEN, min_split_len=256)


def _check_decode(
    batch: PagedBatch,
    dtype: torch.dtype,
    num_splits: int | None,
    max_context_len: int | None = None,
    min_split_len: int = 1,  # 1: the tiny test contexts still use every split they are given
) -> None:
    scale = batch.query.shape[-1] ** -0.5
    with nan_filled_empty():
        out = paged_decode_attention_triton(
            batch.query, batch.k_poisoned, batch.v_poisoned, batch.context_lens,
            max_context_len or batch.max_context_len, batch.block_tables, scale, num_splits, min_split_len,
            batch.sliding_window,
        )  # fmt: skip
    assert_close(out, reference_attention(batch, scale), dtype)


PREFILL_WINDOW_CASES = {
    # name: (q_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size, sliding_window)
    # Prefixes longer than the window, a one-token chunk, a fresh prompt, and one of two query tiles.
    "window_16": ([7, 1, 20, PREFILL_TILES.block_m + 6], [60, 40, 36, PREFILL_TILES.block_m + 26], 4, 2, 32, 16, 16),
    "window_1_gqa": ([5, 12], [30, 12], 4, 1, 16, 16, 1),  # each query sees itself alone
}


@pytest.mark.parametrize("case", PREFILL_WINDOW_CASES)
def test_prefill_attention_sliding_window(case: str) -> None:
    """Guards against a window off by one (the query itself counts: key > query - window), a tile that starts
    its keys at the tile's last query instead of its first, and reading keys before every query's window
    (those hold NaN here: the blocks wholly before it must not be read)."""
    *shape, sliding_window = PREFILL_WINDOW_CASES[case]
    _check_prefill(make_batch(*shape, sliding_window=sliding_window), torch.float32)


def test_decode_attention_sliding_window() -> None:
    """Guards against splits that divide the whole context instead of the window (empty or NaN splits), a
    merge that counts splits of the whole context, and reading keys before the window (NaN here); contexts
    shorter than the window see all of it. Three splits of the window, then as many as a graph-sized grid
    for max_model_len would choose."""
    batch = make_batch([1] * 5, [300, 37, 130, 1, 64], 4, 2, 32, 16, sliding_window=64)
    _check_decode(batch, torch.float32, num_splits=3)
    _check_decode(batch, torch.float32, num_splits=None, max_context_len=GRAPH_MAX_CONTEXT_LEN)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_empty_context_gives_zeros(num_splits: int) -> None:
    """Guards against NaN from a padded decode lane (context_len 0) whose splits are all empty, one or several."""
    batch = make_batch([1, 1], [1, 20], 4, 2, 32, 16)
    context_lens = batch.context_lens.clone()
    context_lens[0] = 0
    with nan_filled_empty():
        out = paged_decode_attention_triton(
            batch.query, batch.k_poisoned, batch.v_poisoned, context_lens, 20, batch.block_tables, 0.2, num_splits, 1
        )
    assert torch.equal(out[0], torch.zeros_like(out[0])), f"padded lane gave {out[0]}"
    assert_close(out[1:], reference_attention(batch, 0.2)[1:], torch.float32)


def test_default_num_splits() -> None:
    """Guards against a heuristic that splits short contexts or leaves a small batch's GPU idle."""
    assert default_num_splits(num_seqs=256, num_kv_heads=8, max_context_len=1000) == 1
    assert default_num_splits(num_seqs=1, num_kv_heads=8, max_context_len=100) == 1
    assert default_num_splits(num_seqs=1, num_kv_heads=8, max_context_len=8192) == 32
    assert default_num_splits(num_seqs=64, num_kv_heads=8, max_context_len=8192) == 2


@pytest.mark.parametrize(
    "num_heads, num_kv_heads, head_dim, has_norm, dtype, unit_offset",
    [
        (4, 2, 32, True, torch.float32, False),  # the tiny Qwen3
        (16, 8, 128, True, torch.float32, False),  # Qwen3-0.6B
        (6, 1, 64, False, torch.float32, False),  # rotary alone (LLaMA), head counts not powers of two
        (16, 8, 128, True, torch.float16, False),
        (8, 4, 256, True, torch.float32, True),  # Gemma 3: (1 + w) norm weights, head_dim 256
    ],
)
def test_norm_rotary_matches_unfused_ops(
    num_heads: int, num_kv_heads: int, head_dim: int, has_norm: bool, dtype: torch.dtype, unit_offset: bool
) -> None:
    """Guards against the fused norm + rotary kernel computing another function than rms_norm then
    apply_rotary: wrong halves, a norm over the wrong width, Gemma's (1 + w) weights taken as w, a strided
    q/k view of the fused qkv read as contiguous, or heads dropped when their count is not a power of two."""
    from nanovllm.kernels.triton_rotary import norm_rotary_triton
    from nanovllm.layers.layernorm import rms_norm
    from nanovllm.layers.rotary import RotaryEmbedding, apply_rotary
    from nanovllm.models.arch import RopeConfig

    gen = torch.Generator().manual_seed(2)
    num_tokens, eps = 5, 1e-6
    rotary = RotaryEmbedding(head_dim, 4096, RopeConfig(theta=1_000_000.0)).to(DEVICE)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(DEVICE, dtype)
    query = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    key = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    positions = torch.tensor([0, 1, 17, 1000, 4095], device=DEVICE)
    weights = [torch.randn(head_dim, generator=gen).to(DEVICE, dtype) if has_norm else None for _ in range(2)]
    q_out, k_out = norm_rotary_triton(positions, query, key, *weights, eps, rotary.cos, rotary.sin, unit_offset)

    q32, k32 = query.float(), key.float()
    if has_norm:
        q32 = rms_norm(q32, weights[0].float(), eps, unit_offset)
        k32 = rms_norm(k32, weights[1].float(), eps, unit_offset)
    q_ref, k_ref = apply_rotary(positions, q32, k32, rotary.cos, rotary.sin)
    tolerance = TOLERANCE[dtype] * 4  # the reference rounds once at the end here; values reach ~4 after the norm
    for got, ref in ((q_out, q_ref), (k_out, k_ref)):
        assert got.dtype == dtype and got.is_contiguous()
        torch.testing.assert_close(got.float(), ref, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_temperatures", [False, True])
@pytest.mark.parametrize("with_seeds", [False, True])
@pytest.mark.parametrize("num_splits", [1, 2, 3, None])
def test_race_kernel_equals_reference(
    dtype: torch.dtype, with_temperatures: bool, with_seeds: bool, num_splits: int | None
) -> None:
    """Guards the fused race: the Triton kernel's keys, hash, noise and argmax must pick the reference's token
    in every row, over a vocabulary of several blocks with a ragged last one, masked (-inf) tokens, nearly
    flat rows (the noise alone decides), greedy rows (temperature 0), greedy ties within a block and across
    blocks (the first wins), seeded rows among unseeded ones, and a draw count past 2**32 (its low 32 bits
    count), with the vocabulary cut into 1, 2 (uneven) or 3 splits, or as many as chosen."""
    num_rows, vocab_size = 8, 2 * BLOCK_V + 37
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(num_rows, vocab_size, generator=gen) * 3
    scores[1] *= 1e-3  # nearly flat
    scores[2, ::3] = -torch.inf  # masked, as top-k and min_p leave them
    scores[3] = 0.0
    scores[3, [9, BLOCK_V + 5, BLOCK_V + 9]] = 1.0  # ties in and across blocks: the greedy row takes the first
    scores = scores.to(DEVICE, dtype)
    engine_keys = torch.randint(-(1 << 31), 1 << 31, (2,), generator=gen, dtype=torch.int32).to(DEVICE)
    draw_count = torch.tensor((5 << 32) + 12345, device=DEVICE)
    seed_keys = is_seeded = None
    if with_seeds:
        seed_keys = torch.randint(-(1 << 31), 1 << 31, (num_rows, 2), generator=gen, dtype=torch.int32).to(DEVICE)
        is_seeded = torch.tensor([True, False, True, False, False, True, True, False], device=DEVICE)
    keys = noise_keys(engine_keys, draw_count, num_rows, seed_keys, is_seeded)
    temperatures = None
    if with_temperatures:
        temperatures = torch.tensor([0.7, 1.0, 1.3, 0.0, 0.0, 0.5, 2.0, 1e-7], device=DEVICE)
        expected = sample(scores, temperatures, keys)
    else:
        expected = race_winners(scores.float(), keys)
    got = race_winners_triton(scores, engine_keys, draw_count, temperatures, seed_keys, is_seeded, num_splits)
    assert got.tolist() == expected.tolist()
    if with_temperatures:
        assert got[3].item() == 9
    assert draw_count.item() == (5 << 32) + 12345  # the caller counts the draw


# Each kernel benchmark's smoke run: script, flags, its last verdict.
SMOKE_RUNS = [
    ("kernels.py", (), "all checks passed"),
    ("kernels.py", ("--sweep-decode", "--kv-cache-dtype", "fp8"), "all settings correct"),
    ("kernels.py", ("--sweep-prefill",), "all settings correct"),
    ("moe_kernel.py", (), "all checks passed"),
    ("moe_kernel.py", ("--sweep",), "all settings correct"),
    ("quant_gemm.py", (), "all checks passed"),
    ("lora_kernel.py", (), "all checks passed"),
]


@pytest.mark.parametrize(("script", "flags", "verdict"), SMOKE_RUNS)
def test_kernel_benchmark_smoke_run(script: str, flags: tuple[str, ...], verdict: str) -> None:
    """Guards the kernel benchmarks in benchmarks/ themselves: each --smoke run checks its kernels against their
    references at tiny sizes (kernels.py with --sweep-decode: the decode kernel over FP8 caches under two
    settings; with --sweep-prefill: the prefill kernel under two; moe_kernel.py with --sweep: the fused MoE under
    three tile sets) and exits 0. Without a GPU each must switch Triton to the interpreter on its own, so the
    variable is not inherited."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--smoke", *flags], cwd=root, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert verdict in result.stdout


@pytest.mark.parametrize(
    ("script", "flags"),
    [("kernels.py", ("--sweep-decode", "--sweep-prefill")), ("step_breakdown.py", ("--profile", "--profile-prefill"))],
)
def test_benchmark_refuses_two_runs_at_once(script: str, flags: tuple[str, ...]) -> None:
    """Guards against a benchmark given two of its exclusive modes running one of them silently: argparse's error
    names both flags, before anything is built."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, f"benchmarks/{script}", *flags], cwd=root, capture_output=True, text=True)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"argument {flags[1]}: not allowed with argument {flags[0]}" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("name", ["silu", "gelu_pytorch_tanh", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("num_rows", "d"), [(5, 1100), (1, 64), (0, 64)])
def test_gated_activation_matches_torch(name: str, dtype: torch.dtype, num_rows: int, d: int) -> None:
    """Guards against the gated activation kernel computing another function than layers/activation.py's
    gated(act): gate and up swapped, the tanh GELU taken for the exact one, rows or columns past a tile's edge
    dropped (5 rows and d = 1100 cross both), or a row stride ignored (x is a column slice of a wider tensor)."""
    from nanovllm.kernels.triton_activation import gated_activation_triton
    from nanovllm.layers.activation import ACTIVATIONS, gated

    gen = torch.Generator().manual_seed(3)
    wide = (3 * torch.randn(num_rows, 2 * d + 8, generator=gen)).to(DEVICE, dtype)
    x = wide[:, : 2 * d]  # rows 2 d + 8 apart
    got = gated_activation_triton(x, name)
    ref = gated(ACTIVATIONS[name])(x.float())
    assert got.shape == (num_rows, d) and got.dtype == dtype
    torch.testing.assert_close(got.float(), ref, atol=TOLERANCE[dtype] * 8, rtol=TOLERANCE[dtype])


def test_gated_activation_refuses_what_it_cannot_compute() -> None:
    """Guards against an unknown activation name or an odd width running a wrong function silently."""
    from nanovllm.kernels.triton_activation import gated_activation_triton

    with pytest.raises(ValueError, match="no 'relu'"):
        gated_activation_triton(torch.zeros(2, 8, device=DEVICE), "relu")
    with pytest.raises(ValueError, match=r"\[N, 2 \* d\]"):
        gated_activation_triton(torch.zeros(2, 7, device=DEVICE), "silu")


@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("num_rows", "hidden"), [(3, 96), (1, 1024), (0, 64)])
def test_rms_norm_matches_torch(unit_offset: bool, dtype: torch.dtype, num_rows: int, hidden: int) -> None:
    """Guards against the RMSNorm kernel computing another function than layers/layernorm.py's rms_norm and
    add_rms_norm: a mean over the padded width (96 is not a power of two), Gemma's (1 + w) taken as w, the
    residual not added, or the new residual not x + residual."""
    from nanovllm.kernels.triton_norm import add_rms_norm_triton, rms_norm_triton
    from nanovllm.layers.layernorm import add_rms_norm, rms_norm

    gen = torch.Generator().manual_seed(4)
    x, residual = (3 * torch.randn(2, num_rows, hidden, generator=gen)).to(DEVICE, dtype)
    weight = torch.randn(hidden, generator=gen).to(DEVICE, dtype)
    tolerance = TOLERANCE[dtype] * 4  # values reach ~4 after the norm
    torch.testing.assert_close(
        rms_norm_triton(x, weight, 1e-6, unit_offset).float(),
        rms_norm(x, weight, 1e-6, unit_offset).float(),
        atol=tolerance,
        rtol=tolerance,
    )
    got, got_residual = add_rms_norm_triton(x, residual, weight, 1e-6, unit_offset)
    ref, ref_residual = add_rms_norm(x, residual, weight, 1e-6, unit_offset)
    # x + residual rounded once: exact in float32; in bf16 within one unit in the last place (Triton's interpreter
    # converts to bf16 by its own rule, not always torch's round to nearest even).
    ulp = 0.0 if dtype == torch.float32 else 2.0**-7
    torch.testing.assert_close(got_residual, ref_residual, atol=0, rtol=ulp)
    torch.testing.assert_close(got.float(), ref.float(), atol=tolerance, rtol=tolerance)
