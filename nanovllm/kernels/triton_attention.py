# mypy: disable-error-code="no-untyped-def"
# (@triton.jit kernels take untyped pointers and scalars; the Python wrappers are typed.)
"""Triton attention over the paged KV cache: a prefill kernel and a split-KV decode kernel.

Same contract as :func:`nanovllm.kernels.reference.paged_attention`; the new tokens' K/V
must already be in the cache. Both kernels read keys in tiles of BLOCK_N positions and
find each position's cache row through the block table, so a tile may span cache blocks:

    block_size = 4, block_tables[b] = [7, 2, 0, 0]   (0 = padding past the last block)
    key position:   0  1  2  3 | 4  5  6  7
    cache block:    7  7  7  7 | 2  2  2  2           block = block_tables[b][pos // block_size]
    row in block:   0  1  2  3 | 0  1  2  3           row   = pos % block_size

Positions at or past ``context_len`` are masked on load, so padding entries and unwritten
(possibly NaN) slots are never used. A layer with a sliding window (Mistral, Gemma 3) starts each
loop at the first key its queries can see, so the blocks before the window are not read at all:

    window = 4, query at position 9 (decode):   keys 0 1 2 3 4 5 | 6 7 8 9
                                                  never loaded    | loaded: key > 9 - 4

Softmax runs in the base-2 domain: the scale is multiplied by log2(e) once so the kernels can call ``exp2``.

An FP8 cache is dequantized per tile, in registers: each K/V tile is loaded in FP8 and converted to
the dot's dtype (exact: every FP8 value is a float16, bfloat16 and float32 value). Its scales ride on
scalars instead of on every element: (q . k * k_scale) * scale is q . k times (scale * k_scale), and
softmax(scores) @ (V * v_scale) is (softmax(scores) @ V) * v_scale.
"""

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

LOG2E = math.log2(math.e)  # exp(x) == exp2(x * LOG2E)
# tl.dot needs every matrix dimension to be at least 16 on NVIDIA GPUs (mma instruction shape).
MIN_DOT_SIZE = 16
FLOAT16_MAX = tl.constexpr(65504.0)  # the largest finite float16


class PrefillTiles(NamedTuple):
    """The prefill kernel's tile and launch settings."""

    block_m: int  # query rows per program
    block_n: int  # key positions per loop step
    num_warps: int
    num_stages: int


# The fastest on bench.py's prompt mix of an H200 sweep (`benchmarks/kernels.py --sweep-prefill`, 2026-12-03): 278 us
# against 314 us for the (64, 64, 4, 3) before it, and 188 against 203 us on 8 prompts of 1,024 tokens.
PREFILL_TILES = PrefillTiles(block_m=64, block_n=32, num_warps=4, num_stages=2)


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
def _cache_row_offsets(block_table_ptr, key_pos, key_mask, block_size, stride_block, stride_slot):
    """Element offset of each key position's cache row (block, row in block): [BLOCK_N] int64."""
    block_ids = tl.load(block_table_ptr + key_pos // block_size, mask=key_mask, other=0).to(tl.int64)
    return block_ids * stride_block + (key_pos % block_size) * stride_slot


@triton.jit
def _load_kv_tile(k_head_ptr, v_head_ptr, row_offs, key_mask, head_dim, BLOCK_D: tl.constexpr):
    """K^T [BLOCK_D, BLOCK_N] and V [BLOCK_N, BLOCK_D] of one tile; zeros where key_mask is off."""
    dim_offs = tl.arange(0, BLOCK_D)
    dim_mask = dim_offs < head_dim
    k_mask = dim_mask[:, None] & key_mask[None, :]  # [BLOCK_D, BLOCK_N]
    k_t = tl.load(k_head_ptr + dim_offs[:, None] + row_offs[None, :], mask=k_mask, other=0.0)
    v_mask = key_mask[:, None] & dim_mask[None, :]  # [BLOCK_N, BLOCK_D]
    v = tl.load(v_head_ptr + row_offs[:, None] + dim_offs[None, :], mask=v_mask, other=0.0)
    return k_t, v


@triton.jit
def _online_softmax_step(q, k_t, v, is_visible, m_i, l_i, acc, qk_scale, DOT_PRECISION: tl.constexpr):
    """Fold one key tile into the running max m_i, sum l_i and output acc of each query row.

    The new running max m_new rescales what was summed so far by exp2(m_i - m_new), so after
    the last tile acc / l_i equals softmax(scores) @ V without ever holding all the scores.
    is_visible is [rows, BLOCK_N] or [1, BLOCK_N]; rows of q are query tokens or query heads.
    """
    scores = tl.dot(q, k_t.to(q.dtype), input_precision=DOT_PRECISION) * qk_scale  # [rows, BLOCK_N], log2 units
    scores = tl.where(is_visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))  # [rows]
    # A row that has seen no key yet (a padded query row, or one whose window starts past this tile) keeps
    # m = -inf; subtracting 0 instead keeps its alpha and p at 0 rather than exp2(-inf - -inf) = NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # [rows]
    alpha = tl.exp2(m_i - m_shift)  # [rows], 0 on the first tile (m_i = -inf)
    p = tl.exp2(scores - m_shift[:, None])  # [rows, BLOCK_N]
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _query_for_dot(q, DOT_DTYPE: tl.constexpr):
    """The query tile in the dtype of the kernel's dots. Only a float16 dot over a 16-bit query (an FP8 cache) can
    change a value: it clamps to float16's range, which no query of a working model comes near."""
    if DOT_DTYPE == tl.float16:  # noqa: SIM300 (DOT_DTYPE is a kernel argument, not a constant)
        q = tl.clamp(q.to(tl.float32), -FLOAT16_MAX, FLOAT16_MAX)
    return q.to(DOT_DTYPE)


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
    q = _query_for_dot(q, DOT_DTYPE)  # every tl.dot follows q's dtype
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
        row_offs = _cache_row_offsets(
            block_table_ptr, key_pos, key_mask, block_size, stride_cache_block, stride_cache_slot
        )
        k_t, v = _load_kv_tile(k_head_ptr, v_head_ptr, row_offs, key_mask, head_dim, BLOCK_D)
        is_visible = (key_pos[None, :] <= q_pos[:, None]) & key_mask[None, :]  # [BLOCK_M, BLOCK_N], causal
        if IS_SLIDING:
            is_visible &= key_pos[None, :] > q_pos[:, None] - sliding_window
        m_i, l_i, acc = _online_softmax_step(q, k_t, v, is_visible, m_i, l_i, acc, qk_scale, DOT_PRECISION)

    out = acc * (v_scale / tl.maximum(l_i, 1.0))[:, None]  # [BLOCK_M, BLOCK_D]; l_i >= 1 in every row that saw a key
    out_offs = token_idx[:, None] * stride_o_token + head_idx * stride_o_head + dim_offs[None, :]
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def _dot_options(query: torch.Tensor) -> dict[str, bool | str]:
    """How the kernels' tl.dot calls run: operand dtype and precision.

    Float32 operands get exact products ("ieee"; the GPU default rounds them to tf32). On CPU
    the operands are upcast to float32 because Triton's interpreter multiplies the raw bits
    of bfloat16 operands (triton-lang/triton#11584); on GPU they stay 16-bit for tensor cores.
    """
    fp32_dot = query.dtype == torch.float32 or query.device.type == "cpu"
    return {"FP32_DOT": fp32_dot, "DOT_PRECISION": "ieee" if fp32_dot else "tf32"}


TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _dot_dtype(x: torch.Tensor) -> tl.dtype:
    """The dtype of tl.dot operands that _dot_options gives x: float32 where it says FP32_DOT, else x's own."""
    return tl.float32 if _dot_options(x)["FP32_DOT"] else TL_DTYPES[x.dtype]


def _attention_dot_options(query: torch.Tensor, k_cache: torch.Tensor) -> dict[str, tl.dtype | str]:
    """The attention kernels' DOT_DTYPE and DOT_PRECISION: float16 for an FP8 cache read by a 16-bit query, else
    _dot_options' float32 (a float32 query, or the CPU interpreter), else the query's dtype.

    An FP8 cache is read through float16 dots because its tiles' conversion, not their bytes, bounds decode:
    FP8 -> float16 is one instruction per two values on Hopper, FP8 -> bfloat16 adds one per value after it.
    Nothing is lost: every FP8 value is a float16 value, a bfloat16 query keeps its bits inside float16's range
    (10 mantissa bits to bfloat16's 7), and the softmax probabilities (in [0, 1]) gain bits. The CPU interpreter
    runs this path too (it multiplies float16 correctly; bfloat16 is what it gets wrong).
    """
    is_fp8_cache = k_cache.element_size() == 1 and query.dtype != torch.float32
    dot_dtype = tl.float16 if is_fp8_cache else _dot_dtype(query)
    return {"DOT_DTYPE": dot_dtype, "DOT_PRECISION": _dot_options(query)["DOT_PRECISION"]}


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
    _check_cache(query, k_cache, v_cache)
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
        BLOCK_M=block_m, BLOCK_N=tiles.block_n, BLOCK_D=_block_dim(head_dim),
        **_attention_dot_options(query, k_cache), IS_SLIDING=sliding_window is not None, num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )  # fmt: skip
    return out


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


@triton.jit(do_not_specialize=["stride_table_seq"])  # see _prefill_kernel
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
    q = _query_for_dot(q, DOT_DTYPE)  # every tl.dot follows q's dtype

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    block_table_ptr = block_tables_ptr + seq_idx * stride_table_seq
    k_head_ptr = k_cache_ptr + kv_head_idx * stride_cache_head  # the cache seen as [num_blocks, block_size, head_dim]
    v_head_ptr = v_cache_ptr + kv_head_idx * stride_cache_head
    for key_start in range(split_start, split_end, BLOCK_N):
        key_pos = key_start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        key_mask = key_pos < split_end  # the one query token sees every key from first_key on
        row_offs = _cache_row_offsets(
            block_table_ptr, key_pos, key_mask, block_size, stride_cache_block, stride_cache_slot
        )
        k_t, v = _load_kv_tile(k_head_ptr, v_head_ptr, row_offs, key_mask, head_dim, BLOCK_D)
        m_i, l_i, acc = _online_softmax_step(q, k_t, v, key_mask[None, :], m_i, l_i, acc, qk_scale, DOT_PRECISION)

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
    _check_cache(query, k_cache, v_cache)
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
        BLOCK_D=_block_dim(head_dim), **_attention_dot_options(query, k_cache), **window_args,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    _decode_reduce_kernel[(num_seqs, num_heads)](
        partial_out, partial_lse, out, context_lens, num_heads, head_dim, num_splits, min_split_len,
        BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=_block_dim(head_dim), BLOCK_N=tiles.block_n,
        **window_args, num_warps=4,
    )  # fmt: skip
    return out


def _block_dim(head_dim: int) -> int:
    """head_dim rounded up to a power of two of at least MIN_DOT_SIZE; the kernels mask the excess."""
    return max(MIN_DOT_SIZE, triton.next_power_of_2(head_dim))


def _check_cache(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """The kernels index both caches with one set of strides and assume a contiguous head_dim."""
    num_heads, num_kv_heads = query.shape[1], k_cache.shape[2]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if query.stride(2) != 1 or k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1:
        raise ValueError(
            f"query and the caches need a contiguous head_dim and k_cache/v_cache equal strides; got query "
            f"{query.stride()}, k_cache {k_cache.stride()}, v_cache {v_cache.stride()}; call .contiguous() first"
        )
