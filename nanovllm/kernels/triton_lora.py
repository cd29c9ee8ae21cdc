# mypy: disable-error-code="no-untyped-def"
# (@triton.jit kernels take untyped pointers and scalars; the Python wrappers are typed.)
"""Triton LoRA shrink (x @ A^T) and expand (+= scaling * . @ B^T) over the adapter slots, Punica style.

Same contract as kernels/lora_reference.py. The tokens of a batch are grouped by slot (LoRAMetadata's
``sorted_token_ids`` and ``slot_starts``), and program (slot, m, ...) takes the m-th tile of BLOCK_M tokens
of its slot, so it reads that adapter's weights once for the whole tile:

    slot_starts = [0, 2, 2, 5]      slot 0: tokens sorted[0:2] -> 1 tile; slot 1: none; slot 2: sorted[2:5]
    grid axis 1 = tiles of the longest possible slot (N tokens): a program past its slot's end returns at once

The grid depends only on N, max_loras and the layer's shape, never on the batch's adapters, so a CUDA graph
captures it, and base-model tokens (in no slot) cost nothing.
"""

import torch
import triton
import triton.language as tl

from nanovllm.kernels.triton_attention import MIN_DOT_SIZE
from nanovllm.utils.lora_metadata import LoRAMetadata

MAX_BLOCK_M = 64  # tokens per program in long prefills (Triton's matmul tutorial tiles 64-128 rows)
SHRINK_BLOCK_K = 64  # input features per loop step of the shrink
EXPAND_BLOCK_N = 64  # output features per expand program


@triton.jit
def _slot_tile(sorted_token_ids_ptr, slot_starts_ptr, slot, tile, BLOCK_M: tl.constexpr):
    """Tile ``tile`` of ``slot``'s tokens: their indices [BLOCK_M] int64 and which rows are real (past the slot's
    end they are not; a tile that starts past it has none)."""
    start = tl.load(slot_starts_ptr + slot)
    end = tl.load(slot_starts_ptr + slot + 1)
    rows = start + tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] positions in sorted_token_ids
    row_mask = rows < end
    token_ids = tl.load(sorted_token_ids_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    return token_ids, row_mask


@triton.jit
def _tile_is_empty(slot_starts_ptr, slot, tile, BLOCK_M: tl.constexpr):
    return tl.load(slot_starts_ptr + slot) + tile * BLOCK_M >= tl.load(slot_starts_ptr + slot + 1)


@triton.jit
def _shrink_kernel(
    x_ptr,  # [N, in_features]
    a_ptr,  # [max_loras, num_slices, max_rank, in_features]
    out_ptr,  # [num_slices, N, max_rank] float32
    sorted_token_ids_ptr,  # [N] int32
    slot_starts_ptr,  # [max_loras + 1] int32
    in_features,
    stride_x_token,
    stride_a_slot, stride_a_slice, stride_a_rank,
    stride_out_slice, stride_out_token,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, MAX_RANK: tl.constexpr,
    FP32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """out[slice, token, :] = x[token] @ A[slot, slice]^T for one tile of one slot's tokens."""
    slot, tile, slice_idx = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if _tile_is_empty(slot_starts_ptr, slot, tile, BLOCK_M):
        return
    token_ids, row_mask = _slot_tile(sorted_token_ids_ptr, slot_starts_ptr, slot, tile, BLOCK_M)
    rank_offs = tl.arange(0, MAX_RANK)
    a_base = a_ptr + slot.to(tl.int64) * stride_a_slot + slice_idx * stride_a_slice
    acc = tl.zeros([BLOCK_M, MAX_RANK], dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        k_offs = k0 + tl.arange(0, BLOCK_K)
        k_mask = k_offs < in_features
        x = tl.load(
            x_ptr + token_ids[:, None] * stride_x_token + k_offs[None, :], mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )  # fmt: skip  # [BLOCK_M, BLOCK_K]
        a_t = tl.load(a_base + rank_offs[None, :] * stride_a_rank + k_offs[:, None], mask=k_mask[:, None], other=0.0)
        if FP32_DOT:
            x, a_t = x.to(tl.float32), a_t.to(tl.float32)
        acc += tl.dot(x, a_t.to(x.dtype), input_precision=DOT_PRECISION)  # [BLOCK_M, MAX_RANK]
    out_offs = slice_idx * stride_out_slice + token_ids[:, None] * stride_out_token + rank_offs[None, :]
    tl.store(out_ptr + out_offs, acc, mask=row_mask[:, None])


@triton.jit
def _expand_kernel(
    y_ptr,  # [N, out_features], updated in place
    shrunk_ptr,  # [N, max_rank] float32
    b_ptr,  # [max_loras, out_features, max_rank]
    scalings_ptr,  # [max_loras] float32
    sorted_token_ids_ptr,  # [N] int32
    slot_starts_ptr,  # [max_loras + 1] int32
    out_features,
    stride_y_token, stride_shrunk_token, stride_b_slot, stride_b_row,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MAX_RANK: tl.constexpr,
    FP32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """y[token, cols] += scaling[slot] * shrunk[token] @ B[slot, cols]^T for one tile of tokens and of columns."""
    slot, tile, col_block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if _tile_is_empty(slot_starts_ptr, slot, tile, BLOCK_M):
        return
    token_ids, row_mask = _slot_tile(sorted_token_ids_ptr, slot_starts_ptr, slot, tile, BLOCK_M)
    rank_offs = tl.arange(0, MAX_RANK)
    col_offs = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = col_offs < out_features
    h = tl.load(
        shrunk_ptr + token_ids[:, None] * stride_shrunk_token + rank_offs[None, :], mask=row_mask[:, None], other=0.0
    )
    b_offs = slot.to(tl.int64) * stride_b_slot + col_offs[None, :] * stride_b_row + rank_offs[:, None]
    b_t = tl.load(b_ptr + b_offs, mask=col_mask[None, :], other=0.0)  # [MAX_RANK, BLOCK_N]
    if FP32_DOT:
        b_t = b_t.to(tl.float32)
    delta = tl.dot(h.to(b_t.dtype), b_t, input_precision=DOT_PRECISION) * tl.load(scalings_ptr + slot)
    y_offs = token_ids[:, None] * stride_y_token + col_offs[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    y = tl.load(y_ptr + y_offs, mask=mask)
    tl.store(y_ptr + y_offs, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=mask)


def _dot_options(weights: torch.Tensor) -> dict[str, bool | str]:
    """Float32 products are exact ("ieee"; the GPU default rounds them to tf32). On CPU the operands are upcast,
    as Triton's interpreter multiplies the raw bits of bfloat16 operands (triton-lang/triton#11584)."""
    fp32_dot = weights.dtype == torch.float32 or weights.device.type == "cpu"
    return {"FP32_DOT": fp32_dot, "DOT_PRECISION": "ieee" if fp32_dot else "tf32"}


def _block_m(num_tokens: int) -> int:
    """Tokens per program: small for decode batches, where few tokens share an adapter."""
    return max(MIN_DOT_SIZE, min(MAX_BLOCK_M, triton.next_power_of_2(max(num_tokens, 1))))


def lora_shrink_triton(x: torch.Tensor, lora_a: torch.Tensor, metadata: LoRAMetadata) -> torch.Tensor:
    """x [N, in_features] @ A^T per token's slot: [num_slices, N, max_rank] float32, zero for base-model tokens."""
    num_slots, num_slices, max_rank, in_features = lora_a.shape
    num_tokens = x.shape[0]
    shrunk = torch.zeros(num_slices, num_tokens, max_rank, dtype=torch.float32, device=x.device)
    block_m = _block_m(num_tokens)
    grid = (num_slots, triton.cdiv(num_tokens, block_m), num_slices)
    _shrink_kernel[grid](
        x, lora_a, shrunk, metadata.sorted_token_ids, metadata.slot_starts, in_features,
        x.stride(0), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2), shrunk.stride(0), shrunk.stride(1),
        BLOCK_M=block_m, BLOCK_K=SHRINK_BLOCK_K, MAX_RANK=max_rank, **_dot_options(lora_a),
    )  # fmt: skip
    return shrunk


def lora_expand_triton(
    y: torch.Tensor, shrunk: torch.Tensor, lora_b: torch.Tensor, scalings: torch.Tensor, metadata: LoRAMetadata
) -> None:
    """y [N, out_features] += scaling * shrunk [N, max_rank] @ B^T per token's slot, in place."""
    num_slots, out_features, max_rank = lora_b.shape
    num_tokens = y.shape[0]
    block_m = _block_m(num_tokens)
    grid = (num_slots, triton.cdiv(num_tokens, block_m), triton.cdiv(out_features, EXPAND_BLOCK_N))
    _expand_kernel[grid](
        y, shrunk, lora_b, scalings, metadata.sorted_token_ids, metadata.slot_starts, out_features,
        y.stride(0), shrunk.stride(0), lora_b.stride(0), lora_b.stride(1),
        BLOCK_M=block_m, BLOCK_N=EXPAND_BLOCK_N, MAX_RANK=max_rank, **_dot_options(lora_b),
    )  # fmt: skip
