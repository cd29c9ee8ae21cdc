# mypy: disable-error-code="no-untyped-def"
# (@triton.jit kernels take untyped pointers and scalars; the Python wrappers are typed.)
"""The slots of a mixture-of-experts layer grouped by expert, for the grouped GEMMs of triton_fused_moe.py.

Every token-expert pair is a *slot* ``t * top_k + j``. The slots are sorted by expert and each expert's group is
padded to whole blocks of ``block_m`` rows, so that every block of rows belongs to one expert:

    topk_ids (3 tokens, top_k=2, 3 experts): [[2, 0], [0, 1], [2, 0]]  ->  slots 0..5 go to experts 2 0 0 1 2 0
    block_m = 4:   | expert 0: slots 1 2 5 . | expert 1: slot 3 . . . | expert 2: slots 0 4 . . | ? ? ? ? |
    sorted_slot_ids  = [1 2 5 6  3 6 6 6  0 4 6 6  ? ? ? ?]      (6 = num_slots marks a padding row)
    block_expert_ids = [0, 1, 2, ?]
    num_padded_rows  = [12]                                      (rows from ? on are never read)

The arrays have a fixed length for a given number of slots, the most padding that can happen, so that a CUDA
graph can capture a decode step; the GEMMs' programs past num_padded_rows exit at once.

One launch does it all (at one decode token the torch version of this sort was some twenty small launches, more
GPU time than the GEMMs): program e counts every expert's slots (a histogram of all of topk_ids, which each
program reads whole: a few KB at decode sizes), takes its own group's first row from the padded counts of the
experts before it, and writes its slots there in slot order, its padding rows, and its blocks' expert.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Slots read per step of the kernel's loops: all of them up to 512 tokens at top-8 (every decode batch), as few
# steps as that in a long prefill (each program's steps run one after another); never below tl.arange's 16.
MIN_SORT_BLOCK_SLOTS = 16
MAX_SORT_BLOCK_SLOTS = 4096


@dataclass(frozen=True)
class ExpertBlocks:
    """Slots grouped by expert, each group padded to whole blocks (see the module docstring)."""

    sorted_slot_ids: torch.Tensor  # [num_blocks * block_m] int32: slot per row, num_slots on padding rows
    block_expert_ids: torch.Tensor  # [num_blocks] int32: expert per block, for blocks below num_padded_rows
    num_padded_rows: torch.Tensor  # [1] int32: rows that hold some expert's group (a multiple of block_m)
    block_m: int  # rows per block


@triton.jit
def _sort_by_expert_kernel(
    topk_ids_ptr,  # [num_slots] int: expert of each slot
    sorted_slot_ids_ptr,  # [num_blocks * BLOCK_M] int32, written
    block_expert_ids_ptr,  # [num_blocks] int32, written
    num_padded_rows_ptr,  # [1] int32, written
    num_slots,
    BLOCK_M: tl.constexpr,
    NUM_BINS: tl.constexpr,  # num_experts rounded up to a power of two
    BLOCK_SLOTS: tl.constexpr,
):
    """Program e: the rows of expert e's group (see the module docstring)."""
    expert = tl.program_id(0)
    # 1. Every expert's slot count, then its padded group's end: an exclusive scan gives each group's start.
    counts = tl.zeros([NUM_BINS], dtype=tl.int32)
    for step_start in range(0, num_slots, BLOCK_SLOTS):
        slots = step_start + tl.arange(0, BLOCK_SLOTS)  # [BLOCK_SLOTS]
        is_slot = slots < num_slots
        experts = tl.load(topk_ids_ptr + slots, mask=is_slot, other=0).to(tl.int32)  # [BLOCK_SLOTS]
        counts += tl.histogram(experts, NUM_BINS, mask=is_slot)  # [NUM_BINS]
    padded_counts = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # [NUM_BINS]
    is_mine = tl.arange(0, NUM_BINS) == expert  # [NUM_BINS]
    group_end = tl.sum(tl.where(is_mine, tl.cumsum(padded_counts, 0), 0))
    num_rows = tl.sum(tl.where(is_mine, padded_counts, 0))
    num_mine = tl.sum(tl.where(is_mine, counts, 0))
    group_start = group_end - num_rows
    if expert == 0:
        tl.store(num_padded_rows_ptr, tl.sum(padded_counts))
    # 2. This expert's slots, in slot order: a slot's row is the group start plus the number of its slots before it.
    num_before = 0
    for step_start in range(0, num_slots, BLOCK_SLOTS):
        slots = step_start + tl.arange(0, BLOCK_SLOTS)  # [BLOCK_SLOTS]
        experts = tl.load(topk_ids_ptr + slots, mask=slots < num_slots, other=-1)  # [BLOCK_SLOTS]
        is_routed = (experts == expert).to(tl.int32)  # [BLOCK_SLOTS]
        rows = group_start + num_before + tl.cumsum(is_routed, 0) - 1  # [BLOCK_SLOTS]
        tl.store(sorted_slot_ids_ptr + rows, slots, mask=is_routed != 0)
        num_before += tl.sum(is_routed)
    # 3. The padding rows of its last block (fewer than BLOCK_M), and the expert of each of its blocks.
    pad = tl.arange(0, BLOCK_M)  # [BLOCK_M]
    tl.store(sorted_slot_ids_ptr + group_start + num_mine + pad, num_slots, mask=num_mine + pad < num_rows)
    first_block = group_start // BLOCK_M
    for block_start in range(0, num_rows // BLOCK_M, BLOCK_SLOTS):
        blocks = block_start + tl.arange(0, BLOCK_SLOTS)  # [BLOCK_SLOTS]
        tl.store(block_expert_ids_ptr + first_block + blocks, expert, mask=blocks < num_rows // BLOCK_M)


def max_num_blocks(num_slots: int, num_experts: int, block_m: int) -> int:
    """The most blocks the groups can fill: every expert that gets a slot pads at most block_m - 1 rows, and at
    most min(num_experts, num_slots) experts get one. Shapes only, so a CUDA graph can capture it."""
    return triton.cdiv(num_slots + min(num_experts, num_slots) * (block_m - 1), block_m)


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertBlocks:
    """Group the slots of ``topk_ids`` [N, top_k] by expert, in slot order within a group, padded to blocks.

    Fixed shapes, no host reads, one launch (graph-capturable)."""
    num_slots = topk_ids.numel()
    num_blocks = max_num_blocks(num_slots, num_experts, block_m)
    device = topk_ids.device
    sorted_slot_ids = torch.empty(num_blocks * block_m, dtype=torch.int32, device=device)
    block_expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=device)
    num_padded_rows = torch.empty(1, dtype=torch.int32, device=device)
    block_slots = min(MAX_SORT_BLOCK_SLOTS, max(MIN_SORT_BLOCK_SLOTS, triton.next_power_of_2(num_slots)))
    _sort_by_expert_kernel[(num_experts,)](
        topk_ids.contiguous(), sorted_slot_ids, block_expert_ids, num_padded_rows, num_slots,
        BLOCK_M=block_m, NUM_BINS=triton.next_power_of_2(num_experts), BLOCK_SLOTS=block_slots,
    )  # fmt: skip
    return ExpertBlocks(sorted_slot_ids, block_expert_ids, num_padded_rows, block_m)
