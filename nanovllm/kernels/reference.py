"""Plain-PyTorch attention over the paged KV cache.

This is what runs on CPU, and the oracle every GPU kernel is tested against. It favours
clarity over speed: it gathers each sequence's cached keys into a padded batch and calls
``scaled_dot_product_attention`` with an explicit mask.

Cache layout (shared by every backend, and what flash-attn expects):
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    slot s lives in block s // block_size at offset s % block_size.

An FP8 cache (float8_e4m3fn or float8_e5m2) holds each value divided by its layer's scale, rounded to
nearest and saturated at the format's largest finite value; attention reads it back times the scale:

    stored = fp8(clamp(x / k_scale, -max, max))      read = float(stored) * k_scale      (V likewise)

A cache in the model's dtype has scales 1.0, which makes both steps plain casts.
"""

import torch
import torch.nn.functional as F

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def quantize(x: torch.Tensor, scale: float, cache_dtype: torch.dtype) -> torch.Tensor:
    """What a cache of ``cache_dtype`` stores for ``x``: x / scale, saturated when FP8 (never inf or NaN)."""
    scaled = x.float() * (1.0 / scale)  # times the reciprocal, as the Triton store computes it
    if cache_dtype in FP8_DTYPES:
        finfo = torch.finfo(cache_dtype)
        scaled = scaled.clamp(finfo.min, finfo.max)
    return scaled.to(cache_dtype)


def dequantize(stored: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """What attention reads from cache values ``stored``: stored * scale, in ``dtype``."""
    return (stored.float() * scale).to(dtype)


def store_kv(
    key: torch.Tensor,  # [N, num_kv_heads, head_dim]
    value: torch.Tensor,  # [N, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [N] int64, -1 = skip this token (a padded graph lane)
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write each token's new key and value into its cache slot, quantized (see the module docstring)."""
    is_real = slot_mapping >= 0
    slots = slot_mapping[is_real]
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = quantize(key[is_real], k_scale, k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = quantize(value[is_real], v_scale, v_cache.dtype)


def paged_attention(
    query: torch.Tensor,  # [N, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    cu_seqlens_q: torch.Tensor,  # [B + 1] int32
    max_seqlen_q: int,
    context_lens: torch.Tensor,  # [B] int32, cached + new tokens per sequence
    max_context_len: int,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    scale: float,  # of the softmax: usually head_dim ** -0.5
    sliding_window: int | None = None,  # keys each query sees, itself included; None: all before it
    k_scale: float = 1.0,  # the caches' scales (see the module docstring)
    v_scale: float = 1.0,
) -> torch.Tensor:  # [N, num_heads, head_dim]
    """Causal attention of each sequence's new tokens over all its cached tokens (or the last ``sliding_window``).

    The new tokens' K/V must already be in the cache (call :func:`store_kv` first).
    """
    num_seqs = context_lens.numel()
    num_tokens = query.shape[0]
    block_size = k_cache.shape[1]
    device = query.device
    cu_seqlens_q = cu_seqlens_q.long()
    context_lens = context_lens.long()
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]  # [B]

    # Gather every sequence's cache into a padded batch: [B, max_context_len, num_kv_heads, head_dim].
    # Slots past a sequence's context were never written and may hold NaN: zero them, since even a
    # masked-out attention weight of 0 times NaN is NaN.
    num_blocks_used = (max_context_len + block_size - 1) // block_size
    table = block_tables[:, :num_blocks_used].long()  # [B, num_blocks_used]
    k_positions = torch.arange(max_context_len, device=device)  # [max_context_len]
    is_in_context = (k_positions[None, :] < context_lens[:, None])[:, :, None, None]  # [B, max_context_len, 1, 1]
    keys = dequantize(k_cache[table].flatten(1, 2)[:, :max_context_len], k_scale, query.dtype)
    keys = keys.where(is_in_context, 0.0)
    values = dequantize(v_cache[table].flatten(1, 2)[:, :max_context_len], v_scale, query.dtype)
    values = values.where(is_in_context, 0.0)

    # Scatter the flat queries into [B, max_seqlen_q, num_heads, head_dim].
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=device), q_lens)  # [N]
    offset_in_seq = torch.arange(num_tokens, device=device) - cu_seqlens_q[seq_of_token]  # [N]
    padded_q = query.new_zeros(num_seqs, max_seqlen_q, *query.shape[1:])
    padded_q[seq_of_token, offset_in_seq] = query

    # Query i of sequence b sits at position context_len - q_len + i and sees keys at or before it.
    q_positions = (context_lens - q_lens)[:, None] + torch.arange(max_seqlen_q, device=device)  # [B, max_seqlen_q]
    is_visible = k_positions[None, None, :] <= q_positions[:, :, None]  # [B, max_seqlen_q, max_context_len]
    is_visible &= (k_positions[None, :] < context_lens[:, None])[:, None, :]
    if sliding_window is not None:  # and within the window: key > query - window (transformers' rule)
        is_visible &= k_positions[None, None, :] > q_positions[:, :, None] - sliding_window

    out = F.scaled_dot_product_attention(
        padded_q.transpose(1, 2),  # [B, num_heads, max_seqlen_q, head_dim]
        keys.transpose(1, 2),  # [B, num_kv_heads, max_context_len, head_dim]
        values.transpose(1, 2),
        attn_mask=is_visible[:, None],
        scale=scale,
        enable_gqa=True,
    )  # [B, num_heads, max_seqlen_q, head_dim]
    return out.transpose(1, 2)[seq_of_token, offset_in_seq]
