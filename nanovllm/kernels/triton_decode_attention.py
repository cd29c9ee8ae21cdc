# mypy: disable-error-code="no-untyped-def"
# (@triton.jit kernels take untyped pointers and scalars; the Python wrappers are typed.)
"""Triton decode attention (flash decoding): one query token per sequence over its cache, the context split
over several programs (phase 1) whose partial results are merged (phase 2); the paged layout and the online
softmax are triton_attention.py's.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from nanovllm.kernels.triton_attention import (
    LOG2E,
    attention_dot_options,
    block_dim,
    cache_row_offsets,
    check_cache,
    load_kv_tile,
    online_softmax_step,
    query_for_dot,
)
from nanovllm.kernels.triton_dots import MIN_DOT_SIZE


class DecodeTiles(NamedTuple):
    """The decode kernel's tile and launch settings."""

    block_n: int  # key positions per loop step
    num_warps: int
    num_stages: int


# Per cache element size (bytes; float32 caches take 2's): the fastest of an H200 sweep
# (`benchmarks/kernels.py --sweep-decode [--kv-cache-dtype fp8]`). An FP8 step of 64 keys reads the bytes of a
# bfloat16 step of 32, and without software pipelining (1 stage) its conversions get the registers.
DECODE_TILES = {2: DecodeTiles(block_n=32, num_warps=2, num_stages=2), 1: DecodeTiles(64, 2, 1)}
# Decode splits the context until the grid has about this many programs: an H100 has 132 SMs and
# each holds 8 of the decode kernel's programs at once (its 124 registers a thread, at 2 warps, allow 8),
# so ~1000 programs fill it.
TARGET_DECODE_PROGRAMS = 1024
# A split shorter than this spends more on writing and merging its partial result than on K/V.
MIN_TOKENS_PER_SPLIT = 256
# Upper bound on splits, so the reduction kernel's [num_splits, head_dim] tile stays small.
MAX_DECODE_SPLITS = 64


@triton.jit
def _first_visible_key(context_len, sliding_window, IS_SLIDING: tl.constexpr):
    """The first key position a sequence's decode query (at context_len - 1) sees: 0, or the window's start."""
    if IS_SLIDING:
        return tl.maximum(context_len - sliding_window, 0)
    return 0


@triton.jit
def _split_len(num_keys, num_splits, min_split_len, BLOCK_N: tl.constexpr):
    """Key positions per split of one sequence: the keys it sees over num_splits, in whole BLOCK_N tiles.

    Sized from the sequence's own keys, not the batch's longest possible context, so a CUDA graph
    captured for max_model_len still spreads a short context over all its splits. No split is
    shorter than min_split_len, so a short context uses fewer splits.
    """
    split_len = tl.cdiv(tl.cdiv(tl.maximum(num_keys, 1), num_splits), BLOCK_N) * BLOCK_N
    return tl.maximum(split_len, min_split_len)


# The block tables' width changes with every batch: compiled once, not once per 'multiple of 16' class.
@triton.jit(do_not_specialize=["stride_table_seq"])
def _decode_split_kernel(
    query_ptr, k_cache_ptr, v_cache_ptr, partial_out_ptr, partial_lse_ptr, context_lens_ptr, block_tables_ptr,
    qk_scale, v_scale, num_heads, num_queries_per_kv, head_dim, block_size, num_splits, min_split_len, sliding_window,
    stride_q_seq, stride_q_head, stride_cache_block, stride_cache_slot, stride_cache_head, stride_table_seq,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, IS_SLIDING: tl.constexpr,
):  # fmt: skip
    """Phase 1 of flash decoding: one sequence, one KV head, one split of the context.

    The query heads that share this KV head are the rows of one [BLOCK_G, BLOCK_D] tile, so
    each K/V element is read once per (sequence, kv_head). The split covers key positions
    [first + split_idx * split_len, first + (split_idx + 1) * split_len), first being the first
    key the query sees, and leaves, per query head, its output normalised over the split and the
    split's log-sum-exp (base 2) of the scores.
    """
    seq_idx, kv_head_idx, split_idx = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq_idx)
    first_key = _first_visible_key(context_len, sliding_window, IS_SLIDING)
    split_len = _split_len(context_len - first_key, num_splits, min_split_len, BLOCK_N)
    split_start = first_key + split_idx * split_len
    if split_start >= context_len:
        return  # past this sequence's end: phase 2 skips this split
    split_end = tl.minimum(split_start + split_len, context_len)

    group_offs = tl.arange(0, BLOCK_G)  # [BLOCK_G], padded to MIN_DOT_SIZE rows
    group_mask = group_offs < num_queries_per_kv
    head_offs = kv_head_idx * num_queries_per_kv + group_offs  # [BLOCK_G], query heads of this KV head
    dim_offs = tl.arange(0, BLOCK_D)
    q_mask = group_mask[:, None] & (dim_offs[None, :] < head_dim)  # [BLOCK_G, BLOCK_D]
    q_offs = seq_idx.to(tl.int64) * stride_q_seq + head_offs[:, None] * stride_q_head + dim_offs[None, :]
    q = tl.load(query_ptr + q_offs, mask=q_mask, other=0.0)  # [BLOCK_G, BLOCK_D]
    q = query_for_dot(q, DOT_DTYPE)  # every tl.dot follows q's dtype

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    block_table_ptr = block_tables_ptr + seq_idx * stride_table_seq
    k_head_ptr = k_cache_ptr + kv_head_idx * stride_cache_head  # the cache seen as [num_blocks, block_size, head_dim]
    v_head_ptr = v_cache_ptr + kv_head_idx * stride_cache_head
    for key_start in range(split_start, split_end, BLOCK_N):
        key_pos = key_start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        key_mask = key_pos < split_end  # the one query token sees every key from first_key on
        row_offs = cache_row_offsets(
            block_table_ptr, key_pos, key_mask, block_size, stride_cache_block, stride_cache_slot
        )
        k_t, v = load_kv_tile(k_head_ptr, v_head_ptr, row_offs, key_mask, head_dim, BLOCK_D)
        m_i, l_i, acc = online_softmax_step(q, k_t, v, key_mask[None, :], m_i, l_i, acc, qk_scale, DOT_PRECISION)

    # partial_lse: [B, num_heads, num_splits]; partial_out: [B, num_heads, num_splits, head_dim], both contiguous.
    lse_idx = (seq_idx * num_heads + head_offs) * num_splits + split_idx  # [BLOCK_G]
    tl.store(partial_lse_ptr + lse_idx, m_i + tl.log2(l_i), mask=group_mask)
    out_offs = lse_idx[:, None].to(tl.int64) * head_dim + dim_offs[None, :]  # [BLOCK_G, BLOCK_D]
    tl.store(partial_out_ptr + out_offs, acc * (v_scale / l_i)[:, None], mask=q_mask)


@triton.jit
def _decode_reduce_kernel(
    partial_out_ptr, partial_lse_ptr, out_ptr, context_lens_ptr, num_heads, head_dim, num_splits, min_split_len,
    sliding_window, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, IS_SLIDING: tl.constexpr,
):  # fmt: skip
    """Phase 2 of flash decoding: merge the splits of one (sequence, query head).

    Split s holds partial_s = sum_j 2^(x_j) v_j / 2^(lse_s) over its scores x_j, with
    lse_s = log2(sum_j 2^(x_j)). So the full softmax output is the lse-weighted mean
        out = sum_s 2^(lse_s) * partial_s / sum_s 2^(lse_s),
    computed with 2^(lse_s - max lse) so the largest weight is 1 and nothing overflows.
    """
    seq_idx, head_idx = tl.program_id(0), tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq_idx)
    num_keys = context_len - _first_visible_key(context_len, sliding_window, IS_SLIDING)
    split_len = _split_len(num_keys, num_splits, min_split_len, BLOCK_N)
    split_offs = tl.arange(0, BLOCK_S)  # [BLOCK_S]
    is_active = split_offs < tl.cdiv(num_keys, split_len)  # the splits phase 1 wrote
    dim_offs = tl.arange(0, BLOCK_D)
    lse_idx = (seq_idx * num_heads + head_idx) * num_splits + split_offs  # [BLOCK_S]
    lse = tl.load(partial_lse_ptr + lse_idx, mask=is_active, other=float("-inf"))
    lse_max = tl.maximum(tl.max(lse, 0), -1e30)  # finite even when no split is active
    weights = tl.where(is_active, tl.exp2(lse - lse_max), 0.0)  # [BLOCK_S]
    part_mask = is_active[:, None] & (dim_offs[None, :] < head_dim)  # [BLOCK_S, BLOCK_D]
    partial_offs = lse_idx[:, None].to(tl.int64) * head_dim + dim_offs[None, :]
    partial = tl.load(partial_out_ptr + partial_offs, mask=part_mask, other=0.0)  # [BLOCK_S, BLOCK_D]
    # The weights sum to >= 1 when any split is active; an empty context (a padded lane) gives 0.
    out = tl.sum(weights[:, None] * partial, 0) / tl.maximum(tl.sum(weights, 0), 1.0)  # [BLOCK_D]
    out_offs = (seq_idx * num_heads + head_idx).to(tl.int64) * head_dim + dim_offs
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=dim_offs < head_dim)


def default_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int) -> int:
    """Splits per sequence: enough programs to fill the GPU, but none shorter than MIN_TOKENS_PER_SPLIT."""
    wanted = triton.cdiv(TARGET_DECODE_PROGRAMS, max(1, num_seqs * num_kv_heads))
    useful = triton.cdiv(max_context_len, MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, useful, MAX_DECODE_SPLITS))


def paged_decode_attention_triton(
    query: torch.Tensor,  # [B, num_heads, head_dim], one new token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    context_lens: torch.Tensor,  # [B] int32, cached tokens per sequence including the new one
    max_context_len: int,
    block_tables: torch.Tensor,  # [B, max_blocks] int32, padded with 0
    scale: float,  # of the softmax
    num_splits: int | None = None,
    min_split_len: int = MIN_TOKENS_PER_SPLIT,
    sliding_window: int | None = None,  # keys the query sees, itself included; None: all before it
    k_scale: float = 1.0,  # the caches' scales: a value v is stored as v / scale (see kernels/reference.py)
    v_scale: float = 1.0,
) -> torch.Tensor:  # [B, num_heads, head_dim]
    """Attention of one query token per sequence over its cache, split over the context (flash decoding).

    ``num_splits`` defaults to :func:`default_num_splits`; each sequence divides the keys it sees (its
    context, or the last ``sliding_window`` of it) into at most that many splits of at least
    ``min_split_len`` keys. A sequence with context_len 0 gets zeros.
    """
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    check_cache(query, k_cache, v_cache)
    out = torch.empty(num_seqs, num_heads, head_dim, dtype=query.dtype, device=query.device)
    if num_seqs == 0:
        return out
    if num_splits is None:
        max_keys = max_context_len if sliding_window is None else min(max_context_len, sliding_window)
        num_splits = default_num_splits(num_seqs, num_kv_heads, max_keys)
    window_args = dict(sliding_window=sliding_window or 0, IS_SLIDING=sliding_window is not None)
    partial_out = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=query.device)
    partial_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=query.device)
    group_size = num_heads // num_kv_heads
    tiles = DECODE_TILES[min(k_cache.element_size(), 2)]
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        query, k_cache, v_cache, partial_out, partial_lse, context_lens, block_tables,
        scale * k_scale * LOG2E, v_scale, num_heads, group_size, head_dim, k_cache.shape[1], num_splits,
        min_split_len,
        stride_q_seq=query.stride(0), stride_q_head=query.stride(1), stride_cache_block=k_cache.stride(0),
        stride_cache_slot=k_cache.stride(1), stride_cache_head=k_cache.stride(2),
        stride_table_seq=block_tables.stride(0),
        BLOCK_G=max(MIN_DOT_SIZE, triton.next_power_of_2(group_size)), BLOCK_N=tiles.block_n,
        BLOCK_D=block_dim(head_dim), **attention_dot_options(query, k_cache), **window_args,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    _decode_reduce_kernel[(num_seqs, num_heads)](
        partial_out, partial_lse, out, context_lens, num_heads, head_dim, num_splits, min_split_len,
        BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_dim(head_dim), BLOCK_N=tiles.block_n,
        **window_args, num_warps=4,
    )  # fmt: skip
    return out
