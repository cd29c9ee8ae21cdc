# mypy: disable-error-code="no-untyped-def"
# (@triton.jit kernels take untyped pointers and scalars; the Python wrappers are typed.)
"""Triton prefill attention: each sequence's new tokens over its cached prefix and themselves, causal (or within
its sliding window), in query tiles of BLOCK_M rows (the paged layout and the online softmax: triton_attention.py).
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


class PrefillTiles(NamedTuple):
    """The prefill kernel's tile and launch settings."""

    block_m: int  # query rows per program
    block_n: int  # key positions per loop step
    num_warps: int
    num_stages: int


# The fastest on bench.py's prompt mix of an H200 sweep (`benchmarks/kernels.py --sweep-prefill`, 2026-12-03): 278 us
# against 314 us for the (64, 64, 4, 3) before it, and 188 against 203 us on 8 prompts of 1,024 tokens.
PREFILL_TILES = PrefillTiles(block_m=64, block_n=32, num_warps=4, num_stages=2)


# The block tables' width changes with every batch: compiled once, not once per 'multiple of 16' class.
@triton.jit(do_not_specialize=["stride_table_seq"])
def _prefill_kernel(
    query_ptr, k_cache_ptr, v_cache_ptr, out_ptr, cu_seqlens_q_ptr, context_lens_ptr, block_tables_ptr,
    qk_scale, v_scale, num_queries_per_kv, head_dim, block_size, sliding_window,
    stride_q_token, stride_q_head, stride_o_token, stride_o_head,
    stride_cache_block, stride_cache_slot, stride_cache_head, stride_table_seq,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, IS_SLIDING: tl.constexpr,
):  # fmt: skip
    """Flash attention for BLOCK_M query tokens of one sequence and one head.

    Query row i of the sequence sits at position prefix_len + i and sees keys 0..that
    position (IS_SLIDING: only the last sliding_window of them). Keys are streamed in BLOCK_N
    tiles with an online softmax, from the first key the tile's first query sees to the tile's
    last query position (causal), so no [q_len, context_len] matrix is ever built.
    """
    tile_idx, seq_idx, head_idx = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq_idx)
    q_len = tl.load(cu_seqlens_q_ptr + seq_idx + 1) - q_start
    if tile_idx * BLOCK_M >= q_len:
        return
    context_len = tl.load(context_lens_ptr + seq_idx)
    prefix_len = context_len - q_len  # tokens cached before this step
    kv_head_idx = head_idx // num_queries_per_kv

    rows = tile_idx * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M], query index within the sequence
    dim_offs = tl.arange(0, BLOCK_D)
    dim_mask = dim_offs < head_dim
    q_mask = (rows[:, None] < q_len) & dim_mask[None, :]  # [BLOCK_M, BLOCK_D]
    token_idx = (q_start + rows).to(tl.int64)  # [BLOCK_M], row in the flat batch
    q_offs = token_idx[:, None] * stride_q_token + head_idx * stride_q_head + dim_offs[None, :]
    q = tl.load(query_ptr + q_offs, mask=q_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    q = query_for_dot(q, DOT_DTYPE)  # every tl.dot follows q's dtype
    q_pos = prefix_len + rows  # [BLOCK_M], absolute positions

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    key_end = tl.minimum(context_len, prefix_len + (tile_idx + 1) * BLOCK_M)  # past the tile's last query
    key_begin = 0
    if IS_SLIDING:  # the first query of the tile sees keys > its position - sliding_window
        key_begin = tl.maximum(prefix_len + tile_idx * BLOCK_M - sliding_window + 1, 0)
    block_table_ptr = block_tables_ptr + seq_idx * stride_table_seq
    k_head_ptr = k_cache_ptr + kv_head_idx * stride_cache_head  # the cache seen as [num_blocks, block_size, head_dim]
    v_head_ptr = v_cache_ptr + kv_head_idx * stride_cache_head
    for key_start in range(key_begin, key_end, BLOCK_N):
        key_pos = key_start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        key_mask = key_pos < key_end
        row_offs = cache_row_offsets(
            block_table_ptr, key_pos, key_mask, block_size, stride_cache_block, stride_cache_slot
        )
        k_t, v = load_kv_tile(k_head_ptr, v_head_ptr, row_offs, key_mask, head_dim, BLOCK_D)
        is_visible = (key_pos[None, :] <= q_pos[:, None]) & key_mask[None, :]  # [BLOCK_M, BLOCK_N], causal
        if IS_SLIDING:
            is_visible &= key_pos[None, :] > q_pos[:, None] - sliding_window
        m_i, l_i, acc = online_softmax_step(q, k_t, v, is_visible, m_i, l_i, acc, qk_scale, DOT_PRECISION)

    out = acc * (v_scale / tl.maximum(l_i, 1.0))[:, None]  # [BLOCK_M, BLOCK_D]; l_i >= 1 in every row that saw a key
    out_offs = token_idx[:, None] * stride_o_token + head_idx * stride_o_head + dim_offs[None, :]
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def paged_prefill_attention_triton(
    query: torch.Tensor,  # [N, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    cu_seqlens_q: torch.Tensor,  # [B + 1] int32
    max_seqlen_q: int,
    context_lens: torch.Tensor,  # [B] int32, cached + new tokens per sequence
    max_context_len: int,
    block_tables: torch.Tensor,  # [B, max_blocks] int32, padded with 0
    scale: float,  # of the softmax
    sliding_window: int | None = None,  # keys each query sees, itself included; None: all before it
    k_scale: float = 1.0,  # the caches' scales: a value v is stored as v / scale (see kernels/reference.py)
    v_scale: float = 1.0,
) -> torch.Tensor:  # [N, num_heads, head_dim]
    """Causal attention of each sequence's new tokens over its whole cache (prefix + new), or its window."""
    num_tokens, num_heads, head_dim = query.shape
    check_cache(query, k_cache, v_cache)
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=query.dtype, device=query.device)
    num_seqs = context_lens.numel()
    if num_tokens == 0 or num_seqs == 0:
        return out
    tiles = PREFILL_TILES
    # Short chunks (decode-like rows in a mixed batch) get a smaller tile than tiles.block_m.
    block_m = max(MIN_DOT_SIZE, min(tiles.block_m, triton.next_power_of_2(max_seqlen_q)))
    grid = (triton.cdiv(max_seqlen_q, block_m), num_seqs, num_heads)
    _prefill_kernel[grid](
        query, k_cache, v_cache, out, cu_seqlens_q, context_lens, block_tables,
        scale * k_scale * LOG2E, v_scale, num_heads // k_cache.shape[2], head_dim, k_cache.shape[1],
        sliding_window or 0,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        BLOCK_M=block_m, BLOCK_N=tiles.block_n, BLOCK_D=block_dim(head_dim),
        **attention_dot_options(query, k_cache), IS_SLIDING=sliding_window is not None, num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )  # fmt: skip
    return out
