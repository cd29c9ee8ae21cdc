# mypy: disable-error-code="no-untyped-def"
# (@triton.jit kernels take untyped pointers and scalars; the Python wrappers are typed.)
"""Triton LoRA over the adapter slots, Punica style: y += scaling * (x A^T) B^T with each token's adapter.

Same contract as kernels/lora_reference.py. Two ways to run it, chosen by the number of tokens alone:

    fused             (N <= FUSED_MAX_TOKENS: decode)   one launch. Each program computes x A^T of its tokens in
                                                        registers, then adds its tile of output columns
    shrink, expand    (longer batches: prefill)         x A^T of every slice into a float32 buffer, then one
                                                        expand over all the columns: two launches

A decode step's LoRA is launch-bound (the adapters' bytes take well under a microsecond), so the fused kernel
recomputes the small x A^T once per column tile rather than launching twice. In a long prefill that recomputation
would cost more than the second launch, so the shrink runs once on its own.

Tokens are grouped by slot (LoRAMetadata's ``sorted_token_ids`` and ``slot_starts``), and program (slot, m, ...)
takes the m-th tile of BLOCK_M tokens of its slot, so it reads that adapter's weights once for the whole tile:

    slot_starts = [0, 2, 2, 5]      slot 0: tokens sorted[0:2] -> 1 tile; slot 1: none; slot 2: sorted[2:5]
    grid axis 1 = tiles of the longest possible slot (N tokens): a program past its slot's end returns at once

The grid depends only on N, max_loras and the layer's shape, never on the batch's adapters, so a CUDA graph
captures it, and base-model tokens (in no slot) cost nothing. Grid axis 2 of the expand is tiles of y's columns,
which hold the slices one after another; a tile that straddles a slice's edge adds each slice's part with that
slice's x A^T:

    slice_starts = [0, 2048, 3072, 4096]    (q, k, v)
    column tile [1984, 2112):  columns 1984-2047 from x A[slot, q]^T,  2048-2111 from x A[slot, k]^T
"""

import torch
import triton
import triton.language as tl

from nanovllm.kernels.triton_dots import MIN_DOT_SIZE, dot_options
from nanovllm.utils.lora_metadata import LoRAMetadata

MAX_BLOCK_M = 64  # tokens per program in long prefills (Triton's matmul tutorial tiles 64-128 rows)
SHRINK_BLOCK_K = 64  # input features per loop step of the separate shrink
# Input features per loop step of the fused kernel's shrink. Its steps run one after another and each waits for its
# loads (an H200 took 6-10 us for 16-48 steps of 64 at one token), so they are wide: 256 for tiles of 16 tokens,
# 128 for wider tiles, whose x tiles would not fit the shared memory of a float32 dot in three stages.
FUSED_BLOCK_K = 256
FUSED_WIDE_BLOCK_K = 128
EXPAND_BLOCK_N = 64  # output features per program of the separate expand
# Output features per program of the fused kernel: each program redoes its tokens' shrink, so wider tiles redo it
# fewer times (32 times for Qwen3-0.6B's qkv) while still giving the GPU's SMs a program each.
FUSED_BLOCK_N = 128
# Largest batch the fused kernel takes: the decode batches of bench.py (256 sequences). Past it the shrink's
# recomputation per column tile (N x in_features input bytes per tile) outweighs a second launch.
FUSED_MAX_TOKENS = 256


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
def _shrink_tile(
    x_ptr,  # [N, in_features]
    a_slice_ptr,  # [max_rank, in_features], one slot's A of one slice
    token_ids, row_mask,  # [BLOCK_M] the tile's tokens, and which are real
    in_features, stride_x_token, stride_a_rank,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, MAX_RANK: tl.constexpr,
    FP32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """x[token_ids] @ A^T: [BLOCK_M, MAX_RANK] float32 (rows that are not real are zero)."""
    rank_offs = tl.arange(0, MAX_RANK)
    acc = tl.zeros([BLOCK_M, MAX_RANK], dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        k_offs = k0 + tl.arange(0, BLOCK_K)
        k_mask = k_offs < in_features
        x = tl.load(
            x_ptr + token_ids[:, None] * stride_x_token + k_offs[None, :], mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )  # fmt: skip  # [BLOCK_M, BLOCK_K]
        a_t = tl.load(a_slice_ptr + rank_offs[None, :] * stride_a_rank + k_offs[:, None], mask=k_mask[:, None])
        if FP32_DOT:
            x, a_t = x.to(tl.float32), a_t.to(tl.float32)
        acc += tl.dot(x, a_t.to(x.dtype), input_precision=DOT_PRECISION)  # [BLOCK_M, MAX_RANK]
    return acc


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
    a_slice_ptr = a_ptr + slot.to(tl.int64) * stride_a_slot + slice_idx * stride_a_slice
    acc = _shrink_tile(
        x_ptr, a_slice_ptr, token_ids, row_mask, in_features, stride_x_token, stride_a_rank,
        BLOCK_M, BLOCK_K, MAX_RANK, FP32_DOT, DOT_PRECISION,
    )  # fmt: skip
    out_offs = slice_idx * stride_out_slice + token_ids[:, None] * stride_out_token + tl.arange(0, MAX_RANK)[None, :]
    tl.store(out_ptr + out_offs, acc, mask=row_mask[:, None])


@triton.jit
def _expand_kernel(
    y_ptr,  # [N, out_features], updated in place
    x_ptr,  # [N, in_features]; fused only (else None)
    a_ptr,  # [max_loras, num_slices, max_rank, in_features]; fused only (else None)
    shrunk_ptr,  # [num_slices, N, max_rank] float32, the shrink kernel's output; unfused only (else None)
    b_ptr,  # [max_loras, out_features, max_rank]
    scalings_ptr,  # [max_loras] float32
    sorted_token_ids_ptr,  # [N] int32
    slot_starts_ptr,  # [max_loras + 1] int32
    slice_starts_ptr,  # [num_slices + 1] int32, where each slice's columns start in y
    in_features, out_features,
    stride_y_token, stride_x_token, stride_a_slot, stride_a_slice, stride_a_rank,
    stride_shrunk_slice, stride_shrunk_token, stride_b_slot, stride_b_row,
    NUM_SLICES: tl.constexpr, IS_FUSED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MAX_RANK: tl.constexpr,
    FP32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """y[token, cols] += scaling[slot] * (x[token] A[slot, slice]^T) @ B[slot, cols]^T for one tile of one slot's
    tokens and one tile of columns, each column with its own slice's x A^T: computed here (IS_FUSED) or read."""
    slot, tile, col_block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if _tile_is_empty(slot_starts_ptr, slot, tile, BLOCK_M):
        return
    token_ids, row_mask = _slot_tile(sorted_token_ids_ptr, slot_starts_ptr, slot, tile, BLOCK_M)
    rank_offs = tl.arange(0, MAX_RANK)
    col_start = col_block * BLOCK_N
    col_offs = col_start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    b_t_ptrs = b_ptr + slot.to(tl.int64) * stride_b_slot + col_offs[None, :] * stride_b_row + rank_offs[:, None]
    delta = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for slice_idx in tl.static_range(NUM_SLICES):  # mostly one slice overlaps the tile, at an edge two
        slice_start = tl.load(slice_starts_ptr + slice_idx)
        slice_end = tl.load(slice_starts_ptr + slice_idx + 1)
        if (slice_start < col_start + BLOCK_N) & (slice_end > col_start):
            if IS_FUSED:
                a_slice_ptr = a_ptr + slot.to(tl.int64) * stride_a_slot + slice_idx * stride_a_slice
                h = _shrink_tile(
                    x_ptr, a_slice_ptr, token_ids, row_mask, in_features, stride_x_token, stride_a_rank,
                    BLOCK_M, BLOCK_K, MAX_RANK, FP32_DOT, DOT_PRECISION,
                )  # fmt: skip  # [BLOCK_M, MAX_RANK]
            else:
                h_offs = slice_idx * stride_shrunk_slice + token_ids[:, None] * stride_shrunk_token + rank_offs[None, :]
                h = tl.load(shrunk_ptr + h_offs, mask=row_mask[:, None], other=0.0)  # [BLOCK_M, MAX_RANK]
            is_slice_col = (col_offs >= slice_start) & (col_offs < slice_end)  # [BLOCK_N]; false past out_features
            b_t = tl.load(b_t_ptrs, mask=is_slice_col[None, :], other=0.0)  # [MAX_RANK, BLOCK_N]
            if FP32_DOT:
                b_t = b_t.to(tl.float32)
            delta += tl.dot(h.to(b_t.dtype), b_t, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    y_offs = token_ids[:, None] * stride_y_token + col_offs[None, :]
    mask = row_mask[:, None] & (col_offs < out_features)[None, :]
    y = tl.load(y_ptr + y_offs, mask=mask)
    y_new = y.to(tl.float32) + delta * tl.load(scalings_ptr + slot)
    tl.store(y_ptr + y_offs, y_new.to(y_ptr.dtype.element_ty), mask=mask)


def _block_m(num_tokens: int) -> int:
    """Tokens per program: small for decode batches, where few tokens share an adapter."""
    return max(MIN_DOT_SIZE, min(MAX_BLOCK_M, triton.next_power_of_2(max(num_tokens, 1))))


def _fused_block_k(block_m: int) -> int:
    return FUSED_BLOCK_K if block_m <= MIN_DOT_SIZE else FUSED_WIDE_BLOCK_K


def lora_shrink_triton(x: torch.Tensor, lora_a: torch.Tensor, metadata: LoRAMetadata) -> torch.Tensor:
    """x [N, in_features] @ A^T per token's slot: [num_slices, N, max_rank] float32. The rows of base-model tokens
    are left unwritten (the expand never reads them)."""
    num_slots, num_slices, max_rank, in_features = lora_a.shape
    num_tokens = x.shape[0]
    shrunk = torch.empty(num_slices, num_tokens, max_rank, dtype=torch.float32, device=x.device)
    block_m = _block_m(num_tokens)
    grid = (num_slots, triton.cdiv(num_tokens, block_m), num_slices)
    _shrink_kernel[grid](
        x, lora_a, shrunk, metadata.sorted_token_ids, metadata.slot_starts, in_features,
        x.stride(0), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2), shrunk.stride(0), shrunk.stride(1),
        BLOCK_M=block_m, BLOCK_K=SHRINK_BLOCK_K, MAX_RANK=max_rank, **dot_options(lora_a),
    )  # fmt: skip
    return shrunk


def _launch_expand(
    y: torch.Tensor,
    lora_b: torch.Tensor,
    scalings: torch.Tensor,
    metadata: LoRAMetadata,
    slice_starts: torch.Tensor,
    fused: tuple[torch.Tensor, torch.Tensor] | None,  # (x, lora_a): shrink in the kernel
    shrunk: torch.Tensor | None,  # or lora_shrink_triton's output, when ``fused`` is None
) -> None:
    """The expand kernel over every column of y, one program per (slot, token tile, column tile)."""
    num_slots, out_features, max_rank = lora_b.shape
    num_tokens, num_slices = y.shape[0], slice_starts.shape[0] - 1
    x, lora_a, in_features = None, None, 0  # unused unless fused
    x_strides: tuple[int, ...] = (0, 0, 0, 0)
    if fused is not None:
        x, lora_a = fused
        in_features, x_strides = lora_a.shape[3], (x.stride(0), *lora_a.stride()[:3])
    shrunk_strides = (0, 0) if shrunk is None else shrunk.stride()[:2]
    block_m, block_n = _block_m(num_tokens), EXPAND_BLOCK_N if fused is None else FUSED_BLOCK_N
    grid = (num_slots, triton.cdiv(num_tokens, block_m), triton.cdiv(out_features, block_n))
    _expand_kernel[grid](
        y, x, lora_a, shrunk, lora_b, scalings, metadata.sorted_token_ids, metadata.slot_starts, slice_starts,
        in_features, out_features,
        y.stride(0), *x_strides, *shrunk_strides, lora_b.stride(0), lora_b.stride(1),
        NUM_SLICES=num_slices, IS_FUSED=fused is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=_fused_block_k(block_m) if fused is not None else SHRINK_BLOCK_K,
        MAX_RANK=max_rank, **dot_options(lora_b),
    )  # fmt: skip


def lora_fused_triton(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scalings: torch.Tensor,
    metadata: LoRAMetadata,
    slice_starts: torch.Tensor,
) -> None:
    """lora_reference.lora_apply in one launch: each program redoes its tokens' shrink for its column tile."""
    _launch_expand(y, lora_b, scalings, metadata, slice_starts, fused=(x, lora_a), shrunk=None)


def lora_shrink_expand_triton(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scalings: torch.Tensor,
    metadata: LoRAMetadata,
    slice_starts: torch.Tensor,
) -> None:
    """lora_reference.lora_apply in two launches: the shrink of every slice, then one expand of every column."""
    shrunk = lora_shrink_triton(x, lora_a, metadata)  # [num_slices, N, max_rank] float32
    _launch_expand(y, lora_b, scalings, metadata, slice_starts, fused=None, shrunk=shrunk)


def lora_apply_triton(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scalings: torch.Tensor,
    metadata: LoRAMetadata,
    slice_starts: torch.Tensor,
) -> None:
    """lora_reference.lora_apply: fused up to FUSED_MAX_TOKENS tokens (a shape, so a graph captures one way)."""
    run = lora_fused_triton if x.shape[0] <= FUSED_MAX_TOKENS else lora_shrink_expand_triton
    run(y, x, lora_a, lora_b, scalings, metadata, slice_starts)
