# mypy: disable-error-code="no-untyped-def"
# (@triton.jit kernels take untyped pointers and scalars; the Python wrappers are typed.)
"""The experts of a mixture-of-experts layer as two grouped GEMMs in Triton.

Same contract as :func:`nanovllm.kernels.fused_moe.fused_moe`. The token-expert slots are first sorted by expert
and padded to blocks of ``block_m`` rows (kernels/triton_moe_sort.py), then one program per (block, column tile):

    0. sort by expert (one launch)                                                             -> blocks
    1. gate+up GEMM: the block's tokens times its expert's gate and up rows, silu(gate) * up  -> [slots, I]
    2. down GEMM:    each slot's row times its expert's down matrix, times its routing weight -> [slots, hidden]
    3. the top_k rows of each token summed (torch)                                             -> [N, hidden]

Four launches, nothing read back to the host: the launch sizes and tiles depend only on the tensors' shapes, so a
CUDA graph captures one call per batch size.

At decode sizes the GEMMs stream weights: one token reads its top_k experts' 3 * hidden * I weights and little
else. The time then goes to how many programs stream at once and how many loads each keeps in flight, so few
rows get narrow column tiles (more programs per expert) and deeper pipelines (see choose_tiles).
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nanovllm.kernels.triton_dots import dot_options
from nanovllm.kernels.triton_moe_sort import ExpertBlocks, sort_by_expert


@dataclass(frozen=True)
class GemmTiles:
    """How one grouped GEMM is cut into programs."""

    block_n: int  # output columns per program (gate+up: intermediate columns, reading gate and up rows for each)
    block_k: int  # reduction step for 16-bit operands; 32-bit ones take half of it (the same bytes per tile)
    num_warps: int
    num_stages: int  # the K loop's loads in flight (Triton's software pipeline): more hide more memory latency


@dataclass(frozen=True)
class MoeTiles:
    """The tiles of one fused-MoE call."""

    block_m: int  # rows per block: each expert's slots padded to a multiple of it; tl.dot's smallest size is 16
    gate_up: GemmTiles
    down: GemmTiles


# Starting points of the kind of vLLM's tuned Qwen3-30B-A3B configs for the H200. benchmarks/moe_kernel.py --sweep
# on an H200 (2026-12-03) found them within 1.5% of its fastest tile set from 1 to 128 tokens, and 5.5% slower at
# 256 (where blocks of 32 rows won). With at most one row per expert on average (decode up to num_experts / top_k
# tokens) the weights dominate: at one token Qwen3-30B-A3B's gate+up GEMM has 8 experts x 768 / block_n programs
# for the H200's 132 SMs, so its tiles are narrow and its pipeline deep.
DECODE_TILES = MoeTiles(16, gate_up=GemmTiles(32, 128, 4, 4), down=GemmTiles(64, 128, 4, 4))
# Up to 16 rows per expert (larger decode batches): one short block per expert still wastes little on padding.
SMALL_TILES = MoeTiles(16, gate_up=GemmTiles(64, 128, 4, 3), down=GemmTiles(64, 128, 4, 3))
# More rows (prefill): taller blocks reuse each weight tile across more rows.
LARGE_TILES = MoeTiles(64, gate_up=GemmTiles(64, 64, 4, 3), down=GemmTiles(64, 64, 4, 3))


def choose_tiles(num_slots: int, num_experts: int) -> MoeTiles:
    """The tiles for num_slots token-expert slots: from the shapes alone, so each graph bucket gets one."""
    if num_slots <= num_experts:
        return DECODE_TILES
    if num_slots <= num_experts * SMALL_TILES.block_m:
        return SMALL_TILES
    return LARGE_TILES


@triton.jit
def _expert_gemm_kernel(
    a_ptr,  # [num_a_rows, k_dim]: the hidden states (gate+up GEMM) or the intermediate (down GEMM)
    w_ptr,  # [num_experts, 2 * n_dim (GATED) or n_dim, k_dim]
    out_ptr,  # [num_slots, n_dim]
    sorted_slot_ids_ptr,  # [num_blocks * BLOCK_M] int32
    block_expert_ids_ptr,  # [num_blocks] int32
    num_padded_rows_ptr,  # [1] int32: blocks from here on are past the last expert's group
    topk_weights_ptr,  # [num_slots] float32; read only when WEIGHTED
    num_slots,
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
    if block_idx * BLOCK_M >= tl.load(num_padded_rows_ptr):
        return  # past the last expert's rows: padding of the fixed-size grid
    expert = tl.load(block_expert_ids_ptr + block_idx).to(tl.int64)
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
    tiles: GemmTiles,
) -> None:
    k_dim = w.shape[2]
    n_dim = out.shape[1]
    block_k = tiles.block_k * 2 // w.element_size()  # 16-bit weights: block_k; 32-bit: half of it
    grid = (blocks.block_expert_ids.numel(), triton.cdiv(n_dim, tiles.block_n))
    _expert_gemm_kernel[grid](
        a, w, out, blocks.sorted_slot_ids, blocks.block_expert_ids, blocks.num_padded_rows, topk_weights,
        out.shape[0], slots_per_a_row, n_dim, k_dim, a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        GATED=is_gated, WEIGHTED=not is_gated, **dot_options(a),
        BLOCK_M=blocks.block_m, BLOCK_N=tiles.block_n, BLOCK_K=block_k,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip


def fused_moe_triton(
    hidden_states: torch.Tensor,  # [N, hidden]
    gate_up_proj: torch.Tensor,  # [num_experts, 2 * intermediate, hidden]
    down_proj: torch.Tensor,  # [num_experts, hidden, intermediate]
    topk_weights: torch.Tensor,  # [N, top_k] float32
    topk_ids: torch.Tensor,  # [N, top_k] int, expert of each choice
    tiles: MoeTiles | None = None,  # None: choose_tiles's for this size (a benchmark may try others)
) -> torch.Tensor:  # [N, hidden]
    """Each token's routing-weighted sum of its experts' gated MLPs (see the module docstring)."""
    num_tokens, hidden_size = hidden_states.shape
    num_experts, num_gate_up_rows, _ = gate_up_proj.shape
    top_k = topk_ids.shape[1]
    num_slots = num_tokens * top_k
    if num_tokens == 0:
        return torch.zeros_like(hidden_states)
    tiles = tiles or choose_tiles(num_slots, num_experts)
    blocks = sort_by_expert(topk_ids, num_experts, tiles.block_m)
    x = hidden_states.contiguous()
    weights = topk_weights.float().contiguous().view(num_slots)  # [num_slots]
    intermediate = x.new_empty(num_slots, num_gate_up_rows // 2)  # [num_slots, I]
    _expert_gemm(x, gate_up_proj.contiguous(), intermediate, blocks, weights, top_k, True, tiles.gate_up)
    slot_out = x.new_empty(num_slots, hidden_size)  # [num_slots, hidden]
    _expert_gemm(intermediate, down_proj.contiguous(), slot_out, blocks, weights, 1, False, tiles.down)
    return slot_out.view(num_tokens, top_k, hidden_size).sum(dim=1)  # [N, hidden]
