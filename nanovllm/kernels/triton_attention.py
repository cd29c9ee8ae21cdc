# mypy: disable-error-code="no-untyped-def"
# (@triton.jit kernels take untyped pointers and scalars; the Python wrappers are typed.)
"""Triton attention over the paged KV cache: what the prefill kernel (triton_prefill_attention.py) and the
split-KV decode kernel (triton_decode_attention.py) share: the tile loads, the online softmax, the dots' dtype.

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

import torch
import triton
import triton.language as tl

from nanovllm.kernels.triton_dots import MIN_DOT_SIZE, dot_dtype, dot_options

LOG2E = math.log2(math.e)  # exp(x) == exp2(x * LOG2E)
FLOAT16_MAX = tl.constexpr(65504.0)  # the largest finite float16


@triton.jit
def cache_row_offsets(block_table_ptr, key_pos, key_mask, block_size, stride_block, stride_slot):
    """Element offset of each key position's cache row (block, row in block): [BLOCK_N] int64."""
    block_ids = tl.load(block_table_ptr + key_pos // block_size, mask=key_mask, other=0).to(tl.int64)
    return block_ids * stride_block + (key_pos % block_size) * stride_slot


@triton.jit
def load_kv_tile(k_head_ptr, v_head_ptr, row_offs, key_mask, head_dim, BLOCK_D: tl.constexpr):
    """K^T [BLOCK_D, BLOCK_N] and V [BLOCK_N, BLOCK_D] of one tile; zeros where key_mask is off."""
    dim_offs = tl.arange(0, BLOCK_D)
    dim_mask = dim_offs < head_dim
    k_mask = dim_mask[:, None] & key_mask[None, :]  # [BLOCK_D, BLOCK_N]
    k_t = tl.load(k_head_ptr + dim_offs[:, None] + row_offs[None, :], mask=k_mask, other=0.0)
    v_mask = key_mask[:, None] & dim_mask[None, :]  # [BLOCK_N, BLOCK_D]
    v = tl.load(v_head_ptr + row_offs[:, None] + dim_offs[None, :], mask=v_mask, other=0.0)
    return k_t, v


@triton.jit
def online_softmax_step(q, k_t, v, is_visible, m_i, l_i, acc, qk_scale, DOT_PRECISION: tl.constexpr):
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
def query_for_dot(q, DOT_DTYPE: tl.constexpr):
    """The query tile in the dtype of the kernel's dots. Only a float16 dot over a 16-bit query (an FP8 cache) can
    change a value: it clamps to float16's range, which no query of a working model comes near."""
    if DOT_DTYPE == tl.float16:  # noqa: SIM300 (DOT_DTYPE is a kernel argument, not a constant)
        q = tl.clamp(q.to(tl.float32), -FLOAT16_MAX, FLOAT16_MAX)
    return q.to(DOT_DTYPE)


def attention_dot_options(query: torch.Tensor, k_cache: torch.Tensor) -> dict[str, tl.dtype | str]:
    """The attention kernels' DOT_DTYPE and DOT_PRECISION: float16 for an FP8 cache read by a 16-bit query, else
    dot_options' float32 (a float32 query, or the CPU interpreter), else the query's dtype.

    An FP8 cache is read through float16 dots because its tiles' conversion, not their bytes, bounds decode:
    FP8 -> float16 is one instruction per two values on Hopper, FP8 -> bfloat16 adds one per value after it.
    Nothing is lost: every FP8 value is a float16 value, a bfloat16 query keeps its bits inside float16's range
    (10 mantissa bits to bfloat16's 7), and the softmax probabilities (in [0, 1]) gain bits. The CPU interpreter
    runs this path too (it multiplies float16 correctly; bfloat16 is what it gets wrong).
    """
    is_fp8_cache = k_cache.element_size() == 1 and query.dtype != torch.float32
    dtype = tl.float16 if is_fp8_cache else dot_dtype(query)
    return {"DOT_DTYPE": dtype, "DOT_PRECISION": dot_options(query)["DOT_PRECISION"]}


def block_dim(head_dim: int) -> int:
    """head_dim rounded up to a power of two of at least MIN_DOT_SIZE; the kernels mask the excess."""
    return max(MIN_DOT_SIZE, triton.next_power_of_2(head_dim))


def check_cache(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """The kernels index both caches with one set of strides and assume a contiguous head_dim."""
    num_heads, num_kv_heads = query.shape[1], k_cache.shape[2]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if query.stride(2) != 1 or k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1:
        raise ValueError(
            f"query and the caches need a contiguous head_dim and k_cache/v_cache equal strides; got query "
            f"{query.stride()}, k_cache {k_cache.stride()}, v_cache {v_cache.stride()}; call .contiguous() first"
        )
