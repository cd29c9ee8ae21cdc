# mypy: disable-error-code="no-untyped-def"
# (@triton.jit kernels take untyped pointers and scalars; the Python wrappers are typed.)
"""Triton kernel that writes each new token's key and value into the paged KV cache.

Same contract as :func:`nanovllm.kernels.reference.store_kv`. The cache is a pool of
fixed-size blocks; ``slot_mapping`` names, per token, the flat slot to write:

    slot_mapping:  [ 37, 38, -1 ]          (block_size = 16)
    slot 37  ->  block 37 // 16 = 2, offset 37 % 16 = 5   ->  k_cache[2, 5, :, :]
    slot 38  ->  block 2, offset 6                         ->  k_cache[2, 6, :, :]
    slot -1  ->  skipped (a padded CUDA-graph lane)

Each value is stored as x / scale (the layer's k_scale or v_scale). An FP8 cache gets the byte of that
value rounded to nearest even and saturated at the format's largest finite value; the kernel encodes the
byte itself (kernels/triton_fp8.py) and writes it through a uint8 view of the cache.
"""

import torch
import triton
import triton.language as tl

from nanovllm.kernels.triton_fp8 import encode_fp8, fp8_format

# One program copies at most this many heads of one token; with head_dim 128 that is 8 x 128
# = 1024 elements per tensor, enough to keep the loads wide without spilling registers.
MAX_HEADS_PER_PROGRAM = 8


@triton.jit
def _store_kv_kernel(
    key_ptr,  # [N, num_kv_heads, head_dim]
    value_ptr,  # [N, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [N] int64
    k_inv_scale,  # 1 / k_scale, float32
    v_inv_scale,
    num_kv_heads,
    head_dim,
    block_size,
    stride_k_token,  # key and value may have their own strides (value is often a view of the fused qkv output)
    stride_k_head,
    stride_v_token,
    stride_v_head,
    stride_cache_block,  # k_cache and v_cache share strides
    stride_cache_slot,
    stride_cache_head,
    BLOCK_H: tl.constexpr,  # heads per program (power of two)
    BLOCK_D: tl.constexpr,  # head_dim rounded up to a power of two
    FP8_MANTISSA_BITS: tl.constexpr,  # 0: the cache has the model's dtype; else 3 (e4m3) or 2 (e5m2)
    FP8_EXPONENT_BIAS: tl.constexpr,
    FP8_MAX: tl.constexpr,  # largest finite value of the FP8 format
):
    """Copy heads [h0, h0 + BLOCK_H) of token ``program_id(0)`` to its slot, unless the slot is -1.

    The copy is a masked [BLOCK_H, BLOCK_D] tile; the mask covers head counts and head
    dimensions that are not powers of two.
    """
    token_idx = tl.program_id(0).to(tl.int64)
    head_offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    dim_offs = tl.arange(0, BLOCK_D)  # [BLOCK_D]

    slot = tl.load(slot_mapping_ptr + token_idx).to(tl.int64)
    if slot < 0:
        return  # a padded lane: nothing to store
    block_idx = slot // block_size
    block_offset = slot % block_size
    mask = (head_offs[:, None] < num_kv_heads) & (dim_offs[None, :] < head_dim)  # [BLOCK_H, BLOCK_D]

    k_offs = token_idx * stride_k_token + head_offs[:, None] * stride_k_head + dim_offs[None, :]
    v_offs = token_idx * stride_v_token + head_offs[:, None] * stride_v_head + dim_offs[None, :]
    dst_offs = (
        block_idx * stride_cache_block
        + block_offset * stride_cache_slot
        + head_offs[:, None] * stride_cache_head
        + dim_offs[None, :]
    )  # [BLOCK_H, BLOCK_D]
    key = tl.load(key_ptr + k_offs, mask=mask).to(tl.float32) * k_inv_scale
    value = tl.load(value_ptr + v_offs, mask=mask).to(tl.float32) * v_inv_scale
    if FP8_MANTISSA_BITS > 0:  # the caches are uint8 views of FP8 tensors
        key = encode_fp8(key, FP8_MANTISSA_BITS, FP8_EXPONENT_BIAS, FP8_MAX)
        value = encode_fp8(value, FP8_MANTISSA_BITS, FP8_EXPONENT_BIAS, FP8_MAX)
    tl.store(k_cache_ptr + dst_offs, key.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst_offs, value.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv_triton(
    key: torch.Tensor,  # [N, num_kv_heads, head_dim]
    value: torch.Tensor,  # [N, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [N] int64, -1 = skip this token (a padded graph lane)
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write each token's new key and value into its cache slot, divided by the scales (module docstring)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    # Views of the fused qkv output are read where they lie (their own strides); only a strided head_dim is copied.
    key = key if key.stride(2) == 1 else key.contiguous()
    value = value if value.stride(2) == 1 else value.contiguous()
    if k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1:
        raise ValueError(
            f"k_cache and v_cache must share strides with a contiguous head_dim, got {k_cache.stride()} "
            f"and {v_cache.stride()}; allocate both as contiguous tensors of the same shape"
        )
    block_heads = min(triton.next_power_of_2(num_kv_heads), MAX_HEADS_PER_PROGRAM)
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_heads))
    fp8 = fp8_format(k_cache.dtype)
    if fp8.mantissa_bits:
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)  # the kernel writes the bytes
    _store_kv_kernel[grid](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        1.0 / k_scale,
        1.0 / v_scale,
        num_kv_heads,
        head_dim,
        k_cache.shape[1],
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        BLOCK_H=block_heads,
        BLOCK_D=triton.next_power_of_2(head_dim),
        FP8_MANTISSA_BITS=fp8.mantissa_bits,
        FP8_EXPONENT_BIAS=fp8.exponent_bias,
        FP8_MAX=fp8.max_value,
    )
