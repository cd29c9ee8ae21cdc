"""The LoRA shrink and expand kernels (Triton) against the torch reference, and the slot layouts they read.

On CPU the Triton kernels run in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1), so the sizes are
small; they still cover tiles that span slots, an empty slot, base-model tokens and masked feature edges.
"""

import numpy as np
import pytest
import torch

from nanovllm.kernels.lora import slot_rank
from nanovllm.kernels.lora_reference import lora_expand, lora_shrink
from nanovllm.kernels.triton_lora import lora_expand_triton, lora_shrink_triton
from nanovllm.lora.metadata import build_lora_metadata, group_tokens_by_slot
from nanovllm.runner.decode_staging import DecodeStaging
from nanovllm.sampling_params import SamplingParams
from nanovllm.scheduler.batch import ScheduledBatch
from nanovllm.scheduler.sequence import Sequence
from nanovllm.utils.lora_metadata import NO_ADAPTER

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Against a float32 reference on the same inputs: float32 differs by summation order only; bfloat16 rounds the
# operands of the products (8 mantissa bits) and the output once.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
MAX_LORAS = 3
SLICE_SIZES = (32, 16, 16)  # a fused q, k, v projection's output slices
IN_FEATURES = 80  # not a multiple of the shrink's 64-feature loop step: the last step is masked


def random_rows(num_tokens: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """Rows of 1-3 tokens with slots 0, 2 or the base model (slot 1 stays empty), as the runner gives them."""
    rng = np.random.default_rng(seed)
    lengths: list[int] = []
    while sum(lengths) < num_tokens:
        lengths.append(int(rng.integers(1, 4)))
    lengths[-1] -= sum(lengths) - num_tokens
    return rng.choice(np.array([0, 2, NO_ADAPTER], dtype=np.int32), size=len(lengths)), lengths


# A prefill over several 64-token tiles, and a decode-sized batch (16-token tiles) in 16 bits.
@pytest.mark.parametrize("dtype,num_tokens", [(torch.float32, 100), (torch.bfloat16, 5)])
def test_triton_shrink_and_expand_match_reference(dtype: torch.dtype, num_tokens: int) -> None:
    """Guards against a token given another slot's weights (tiles spanning slots, the grouped order), a base-model
    token changed, lost rows at a tile's edge, and the scaling applied wrongly or twice."""
    gen = torch.Generator().manual_seed(num_tokens)
    row_slots, lengths = random_rows(num_tokens, seed=num_tokens)
    metadata = build_lora_metadata(row_slots, lengths, MAX_LORAS, DEVICE)
    rank = slot_rank(8)
    x = torch.randn(num_tokens, IN_FEATURES, generator=gen).to(dtype).to(DEVICE)
    lora_a = torch.randn(MAX_LORAS, len(SLICE_SIZES), rank, IN_FEATURES, generator=gen).to(dtype).to(DEVICE)
    lora_b = torch.randn(MAX_LORAS, sum(SLICE_SIZES), rank, generator=gen).to(dtype).to(DEVICE)
    scalings = torch.tensor([0.5, 3.0, 2.0], device=DEVICE)
    y = torch.randn(num_tokens, sum(SLICE_SIZES), generator=gen).to(dtype).to(DEVICE)

    want_shrunk = lora_shrink(x, lora_a, metadata)
    got_shrunk = lora_shrink_triton(x, lora_a, metadata)
    tol = TOLERANCE[dtype] * want_shrunk.abs().max().item()
    torch.testing.assert_close(got_shrunk, want_shrunk, atol=tol, rtol=0, msg=lambda m: f"shrink: {m}")

    want_y, got_y = y.clone(), y.clone()
    offset = 0
    for slice_idx, size in enumerate(SLICE_SIZES):
        cols = slice(offset, offset + size)
        lora_expand(want_y[:, cols], want_shrunk[slice_idx], lora_b[:, cols], scalings, metadata)
        lora_expand_triton(got_y[:, cols], want_shrunk[slice_idx], lora_b[:, cols], scalings, metadata)
        offset += size
    tol = TOLERANCE[dtype] * want_y.float().abs().max().item()
    torch.testing.assert_close(got_y.float(), want_y.float(), atol=tol, rtol=0, msg=lambda m: f"expand: {m}")
    is_base = (metadata.token_slots == NO_ADAPTER).cpu()
    assert torch.equal(got_y.cpu()[is_base], y.cpu()[is_base]), "a base-model token's output changed"
    assert not torch.equal(got_y.cpu()[~is_base], y.cpu()[~is_base]), "no adapter token's output changed"


def test_group_tokens_by_slot_as_documented() -> None:
    """Guards against a grouped order or slot starts that disagree with LoRAMetadata's documented example."""
    token_slots = np.array([2, NO_ADAPTER, 0, 2, 0], dtype=np.int32)
    sorted_token_ids, slot_starts = group_tokens_by_slot(token_slots, max_loras=3)
    assert sorted_token_ids.tolist() == [2, 4, 0, 3, 1], sorted_token_ids
    assert slot_starts.tolist() == [0, 2, 2, 4], slot_starts


def test_decode_staging_holds_the_batch_lora_metadata() -> None:
    """Guards against a decode graph reading adapter slots that differ from the eager path's (lane order, the
    grouped order, stale slots in padded lanes from a bigger batch before)."""
    staging = DecodeStaging(max_num_seqs=8, max_blocks=4, block_size=16, pin_memory=False, max_loras=MAX_LORAS)
    seqs = []
    for i in range(5):
        seq = Sequence([1, 2, 3 + i], SamplingParams())
        seq.block_table = [i]
        seqs.append(seq)
    batch = ScheduledBatch(seqs, [1] * 5, is_prefill=False)
    staging.stage(ScheduledBatch(seqs + seqs[:2], [1] * 7, is_prefill=False), 8, None, np.zeros(7, np.int32))
    row_slots = np.array([2, NO_ADAPTER, 0, 2, 1], dtype=np.int32)
    staging.stage(batch, bucket=8, lora_slots=row_slots)
    padded_slots = np.concatenate([row_slots, np.full(3, NO_ADAPTER, np.int32)])
    want = build_lora_metadata(padded_slots, [1] * 8, MAX_LORAS, torch.device("cpu"))
    fields = staging.arrays
    assert fields["lora_token_slots"][:8].tolist() == want.token_slots.tolist(), fields["lora_token_slots"]
    assert fields["lora_sorted_token_ids"][:8].tolist() == want.sorted_token_ids.tolist()
    assert fields["lora_slot_starts"].tolist() == want.slot_starts.tolist() == [0, 1, 2, 4], fields["lora_slot_starts"]
