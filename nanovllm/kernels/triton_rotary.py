# mypy: disable-error-code="no-untyped-def"
# (@triton.jit kernels take untyped pointers and scalars; the Python wrapper is typed.)
"""Triton kernel for the queries and keys of one layer: per-head RMSNorm (Qwen3, Gemma 3), then rotary.

Same function as ``rms_norm`` (layers/layernorm.py) followed by ``apply_rotary`` (layers/rotary.py),
in one kernel instead of four: a decode step runs it in every layer, where each small kernel costs
a few microseconds whatever its size. One program takes one token, all its query and key heads:

    qkv row of token t:  | q head 0 | ... | q head H-1 | k head 0 | ... | k head KV-1 | v ... |
    each head:           | x1 (first half of head_dim) | x2 (second half) |
    normalized:          x * rsqrt(mean(x^2) + eps) * weight            (when norm weights are given;
                                                                     Gemma's unit offset: * (1 + weight))
    rotated:             (x1 cos - x2 sin, x2 cos + x1 sin), cos/sin of the token's position

Arithmetic is float32 throughout, rounded once when stored (the unfused ops round after each step).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_rotate_heads(
    src_ptr, dst_ptr, weight_ptr, cos, sin, num_heads, stride_src_head, eps, weight_offset,
    HAS_NORM: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr,
):  # fmt: skip
    """Normalize and rotate heads [0, num_heads) of one token: src and dst point at its head 0."""
    heads = tl.arange(0, BLOCK_H)  # [BLOCK_H]
    dims = tl.arange(0, HALF)  # [HALF]
    mask = (heads < num_heads)[:, None]  # [BLOCK_H, 1]
    src_offs = heads[:, None] * stride_src_head + dims[None, :]  # [BLOCK_H, HALF]
    x1 = tl.load(src_ptr + src_offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src_ptr + src_offs + HALF, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        mean_square = (tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF)  # [BLOCK_H]
        scale = tl.rsqrt(mean_square + eps)[:, None]
        x1 = x1 * scale * (weight_offset + tl.load(weight_ptr + dims).to(tl.float32))[None, :]
        x2 = x2 * scale * (weight_offset + tl.load(weight_ptr + HALF + dims).to(tl.float32))[None, :]
    dst_offs = heads[:, None] * (2 * HALF) + dims[None, :]  # dst is contiguous [num_heads, head_dim]
    dtype = dst_ptr.dtype.element_ty
    tl.store(dst_ptr + dst_offs, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(dst_ptr + dst_offs + HALF, (x2 * cos + x1 * sin).to(dtype), mask=mask)


@triton.jit
def _norm_rotary_kernel(
    query_ptr, key_ptr, q_out_ptr, k_out_ptr, positions_ptr, q_weight_ptr, k_weight_ptr, cos_ptr, sin_ptr,
    num_heads, num_kv_heads, stride_q_token, stride_q_head, stride_k_token, stride_k_head, stride_table, eps,
    weight_offset, HAS_NORM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KV: tl.constexpr, HALF: tl.constexpr,
):  # fmt: skip
    """Token ``program_id(0)``: its query heads, then its key heads."""
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + position * stride_table + dims)[None, :]  # [1, HALF] float32
    sin = tl.load(sin_ptr + position * stride_table + dims)[None, :]
    head_dim = 2 * HALF
    _norm_rotate_heads(
        query_ptr + token * stride_q_token, q_out_ptr + token * num_heads * head_dim, q_weight_ptr, cos, sin,
        num_heads, stride_q_head, eps, weight_offset, HAS_NORM, BLOCK_H, HALF,
    )  # fmt: skip
    _norm_rotate_heads(
        key_ptr + token * stride_k_token, k_out_ptr + token * num_kv_heads * head_dim, k_weight_ptr, cos, sin,
        num_kv_heads, stride_k_head, eps, weight_offset, HAS_NORM, BLOCK_KV, HALF,
    )  # fmt: skip


def norm_rotary_triton(
    positions: torch.Tensor,  # [N] int64
    query: torch.Tensor,  # [N, num_heads, head_dim], may be a strided view of the fused qkv output
    key: torch.Tensor,  # [N, num_kv_heads, head_dim], likewise
    q_weight: torch.Tensor | None,  # [head_dim] RMSNorm weights, or None for rotary alone
    k_weight: torch.Tensor | None,
    eps: float,
    cos_table: torch.Tensor,  # [max_position, head_dim / 2] float32
    sin_table: torch.Tensor,
    unit_offset: bool = False,  # Gemma's norms: scale by (1 + weight)
) -> tuple[torch.Tensor, torch.Tensor]:  # contiguous [N, num_heads, head_dim], [N, num_kv_heads, head_dim]
    """Per-head RMSNorm (when weights are given) and rotary of queries and keys (see the module docstring)."""
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    if head_dim % 2 or head_dim & (head_dim - 1):
        raise ValueError(f"the Triton rotary kernel needs a power-of-two head_dim, got {head_dim}")
    if query.stride(2) != 1 or key.stride(2) != 1 or cos_table.stride() != sin_table.stride():
        raise ValueError("query and key need a contiguous head_dim, and the cos/sin tables equal strides")
    if cos_table.shape[1] != head_dim // 2:
        raise ValueError(
            f"the Triton rotary kernel rotates whole heads of {head_dim}; the table covers "
            f"{2 * cos_table.shape[1]} dimensions (partial rotary runs in layers/rotary.py)"
        )
    if (q_weight is None) != (k_weight is None):
        raise ValueError("give both RMSNorm weights (query and key) or neither")
    q_out = torch.empty(num_tokens, num_heads, head_dim, dtype=query.dtype, device=query.device)
    k_out = torch.empty(num_tokens, num_kv_heads, head_dim, dtype=key.dtype, device=key.device)
    if num_tokens == 0:
        return q_out, k_out
    has_norm = q_weight is not None
    _norm_rotary_kernel[(num_tokens,)](
        query, key, q_out, k_out, positions, q_weight if has_norm else query, k_weight if has_norm else key,
        cos_table, sin_table, num_heads, num_kv_heads, query.stride(0), query.stride(1), key.stride(0),
        key.stride(1), cos_table.stride(0), eps, 1.0 if unit_offset else 0.0,
        HAS_NORM=has_norm, BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_KV=triton.next_power_of_2(num_kv_heads),
        HALF=head_dim // 2,
    )  # fmt: skip
    return q_out, k_out
