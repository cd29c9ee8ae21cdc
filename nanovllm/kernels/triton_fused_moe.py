# mypy: disable-error-code="no-untyped-def"
# (@triton.jit kernels take untyped pointers and scalars; the Python wrappers are typed.)
"""The experts of a mixture-of-experts layer as two grouped GEMMs in Triton.

Same contract as :func:`nanovllm.kernels.fused_moe.fused_moe`. Every token-expert pair is a *slot*
``t * top_k + j``. The slots are sorted by expert and each expert's group is padded to whole blocks of
``block_m`` rows, so that every block belongs to one expert (:func:`sort_by_expert`):

    topk_ids (3 tokens, top_k=2, 3 experts): [[2, 0], [0, 1], [2, 0]]  ->  slots 0..5 go to experts 2 0 0 1 2 0
    block_m = 4:   | expert 0: slots 1 2 5 . | expert 1: slot 3 . . . | expert 2: slots 0 4 . . | . . . . |
    sorted_slot_ids  = [1 2 5 6  3 6 6 6  0 4 6 6  6 6 6 6]      (6 = num_slots marks a padding row)
    block_expert_ids = [0, 1, 2, 3]                              (3 = num_experts: a block past the end)

The arrays have a fixed length for a given number of tokens, the most padding that can happen, so that a
CUDA graph can capture a decode step; blocks past the last expert's rows exit at once. Then one program per
(block, column tile):

    1. gate+up GEMM: the block's tokens times its expert's gate and up rows, silu(gate) * up  -> [slots, I]
    2. down GEMM:    each slot's row times its expert's down matrix, times its routing weight -> [slots, hidden]
    3. the top_k rows of each token summed (torch)                                             -> [N, hidden]

Nothing is read back to the host: the launch sizes depend only on the tensors' shapes.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nanovllm.kernels.triton_attention import _dot_options

# Tile sizes, untuned (of the kind of vLLM's defaults where it has no tuned config): few rows per expert, as in
# decode, want a short block so that padding each expert's group to it wastes little; many, as in prefill, a
# taller one. Decode streams weights, so the reduction step is long enough for wide loads.
SMALL_BLOCK_M = 16  # rows per block when experts average at most this many rows; tl.dot's smallest size
LARGE_BLOCK_M = 64  # rows per block otherwise
BLOCK_N = 64  # output columns per program
BLOCK_K = 64  # reduction step


@dataclass(frozen=True)
class ExpertBlocks:
    """Slots grouped by expert, each group padded to whole blocks (see the module docstring)."""

    sorted_slot_ids: torch.Tensor  # [num_blocks * block_m] int32: slot per row, num_slots on padding rows
    block_expert_ids: torch.Tensor  # [num_blocks] int32: expert per block, num_experts past the last group
    block_m: int  # rows per block


def choose_block_m(num_slots: int, num_experts: int) -> int:
    return SMALL_BLOCK_M if num_slots <= num_experts * SMALL_BLOCK_M else LARGE_BLOCK_M


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertBlocks:
    """Group the slots of ``topk_ids`` [N, top_k] by expert, in slot order within a group, padded to blocks.

    Fixed shapes and no host reads (graph-capturable): every expert that gets a slot pads at most
    block_m - 1 rows, and at most min(num_experts, num_slots) experts get one.
    """
    device = topk_ids.device
    num_slots = topk_ids.numel()
    expert_of_slot = topk_ids.flatten().long()  # [num_slots]
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, expert_of_slot, torch.ones_like(expert_of_slot))  # [num_experts] slots per expert
    padded_counts = (counts + block_m - 1) // block_m * block_m  # [num_experts]
    padded_ends = padded_counts.cumsum(0)  # [num_experts] where each expert's padded group ends
    order = expert_of_slot.argsort(stable=True)  # [num_slots] slots, expert by expert
    sorted_experts = expert_of_slot[order]  # [num_slots]
    # A slot's row: its expert's padded start, plus its rank among that expert's slots.
    rank = torch.arange(num_slots, device=device) - (counts.cumsum(0) - counts)[sorted_experts]  # [num_slots]
    rows = (padded_ends - padded_counts)[sorted_experts] + rank  # [num_slots]
    num_blocks = triton.cdiv(num_slots + min(num_experts, num_slots) * (block_m - 1), block_m)
    sorted_slot_ids = torch.full((num_blocks * block_m,), num_slots, dtype=torch.int32, device=device)
    sorted_slot_ids[rows] = order.to(torch.int32)
    block_starts = torch.arange(0, num_blocks * block_m, block_m, device=device)  # [num_blocks]
    block_expert_ids = torch.searchsorted(padded_ends, block_starts, right=True).to(torch.int32)  # [num_blocks]
    return ExpertBlocks(sorted_slot_ids, block_expert_ids, block_m)


@triton.jit
def _expert_gemm_kernel(
    a_ptr,  # [num_a_rows, k_dim]: the hidden states (gate+up GEMM) or the intermediate (down GEMM)
    w_ptr,  # [num_experts, 2 * n_dim (GATED) or n_dim, k_dim]
    out_ptr,  # [num_slots, n_dim]
    sorted_slot_ids_ptr,  # [num_blocks * BLOCK_M] int32
    block_expert_ids_ptr,  # [num_blocks] int32
    topk_weights_ptr,  # [num_slots] float32; read only when WEIGHTED
    num_slots,
    num_experts,
    slots_per_a_row,  # slot s reads row s // slots_per_a_row of a: top_k for the hidden states, else 1
    n_dim,
    k_dim,
    stride_a_row,
    stride_w_expert,
    stride_w_row,
    stride_out_row,
    GATED: tl.constexpr,  # w holds gate rows then up rows: store silu(a @ gate^T) * (a @ up^T)
    WEIGHTED: tl.constexpr,  # scale each row by its slot's routing weight
    FP32_DOT: tl.constexpr,  # upcast operands to float32 before tl.dot
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Rows [BLOCK_M] of block ``program_id(0)`` (one expert's slots) times that expert's columns
    [program_id(1) * BLOCK_N, + BLOCK_N), accumulated in float32 over k_dim."""
    block_idx = tl.program_id(0)
    expert = tl.load(block_expert_ids_ptr + block_idx).to(tl.int64)
    if expert >= num_experts:
        return  # past the last expert's rows: padding of the fixed-size grid
    slot = tl.load(sorted_slot_ids_ptr + block_idx * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
    is_real = slot < num_slots  # [BLOCK_M]
    a_rows = (slot // slots_per_a_row).to(tl.int64)  # [BLOCK_M]
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    is_col = cols < n_dim
    a_row_ptrs = a_ptr + a_rows[:, None] * stride_a_row  # [BLOCK_M, 1]
    w_col_ptrs = w_ptr + expert * stride_w_expert + cols[None, :].to(tl.int64) * stride_w_row  # [1, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, k_dim, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        is_k = ks < k_dim
        a = tl.load(a_row_ptrs + ks[None, :], mask=is_real[:, None] & is_k[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        w_mask = is_k[:, None] & is_col[None, :]
        w = tl.load(w_col_ptrs + ks[:, None], mask=w_mask, other=0.0)  # [BLOCK_K, BLOCK_N], w^T's tile
        if FP32_DOT:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        if GATED:  # the up rows sit n_dim rows below the gate rows
            w_up = tl.load(w_col_ptrs + n_dim * stride_w_row + ks[:, None], mask=w_mask, other=0.0)
            if FP32_DOT:
                w_up = w_up.to(tl.float32)
            acc_up = tl.dot(a, w_up, acc_up, input_precision=DOT_PRECISION)
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up  # silu(gate) * up
    if WEIGHTED:
        acc = acc * tl.load(topk_weights_ptr + slot, mask=is_real, other=0.0)[:, None]
    out_ptrs = out_ptr + slot[:, None].to(tl.int64) * stride_out_row + cols[None, :]  # [BLOCK_M, BLOCK_N]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=is_real[:, None] & is_col[None, :])


def _expert_gemm(
    a: torch.Tensor,  # [num_a_rows, k_dim], contiguous rows
    w: torch.Tensor,  # [num_experts, rows, k_dim], contiguous
    out: torch.Tensor,  # [num_slots, n_dim]
    blocks: ExpertBlocks,
    topk_weights: torch.Tensor,  # [num_slots] float32
    slots_per_a_row: int,
    is_gated: bool,
) -> None:
    num_experts, num_w_rows, k_dim = w.shape
    n_dim = out.shape[1]
    grid = (blocks.block_expert_ids.numel(), triton.cdiv(n_dim, BLOCK_N))
    _expert_gemm_kernel[grid](
        a, w, out, blocks.sorted_slot_ids, blocks.block_expert_ids, topk_weights,
        out.shape[0], num_experts, slots_per_a_row, n_dim, k_dim,
        a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        GATED=is_gated, WEIGHTED=not is_gated, **_dot_options(a),
        BLOCK_M=blocks.block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )  # fmt: skip


def fused_moe_triton(
    hidden_states: torch.Tensor,  # [N, hidden]
    gate_up_proj: torch.Tensor,  # [num_experts, 2 * intermediate, hidden]
    down_proj: torch.Tensor,  # [num_experts, hidden, intermediate]
    topk_weights: torch.Tensor,  # [N, top_k] float32
    topk_ids: torch.Tensor,  # [N, top_k] int, expert of each choice
) -> torch.Tensor:  # [N, hidden]
    """Each token's routing-weighted sum of its experts' gated MLPs (see the module docstring)."""
    num_tokens, hidden_size = hidden_states.shape
    num_experts, num_gate_up_rows, _ = gate_up_proj.shape
    top_k = topk_ids.shape[1]
    num_slots = num_tokens * top_k
    if num_tokens == 0:
        return torch.zeros_like(hidden_states)
    blocks = sort_by_expert(topk_ids, num_experts, choose_block_m(num_slots, num_experts))
    x = hidden_states.contiguous()
    weights = topk_weights.float().contiguous().view(num_slots)  # [num_slots]
    intermediate = x.new_empty(num_slots, num_gate_up_rows // 2)  # [num_slots, I]
    _expert_gemm(x, gate_up_proj.contiguous(), intermediate, blocks, weights, top_k, is_gated=True)
    slot_out = x.new_empty(num_slots, hidden_size)  # [num_slots, hidden]
    _expert_gemm(intermediate, down_proj.contiguous(), slot_out, blocks, weights, 1, is_gated=False)
    return slot_out.view(num_tokens, top_k, hidden_size).sum(dim=1)  # [N, hidden]
