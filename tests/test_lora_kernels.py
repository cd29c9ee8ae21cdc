"""The LoRA kernels (Triton: fused, and shrink then expand) against the torch reference, and the slot layouts they
read.

On CPU the Triton kernels run in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1), so the sizes are
small; they still cover tiles that span slots, an empty slot, base-model tokens, adapters of a rank below the
slots', column tiles that straddle slices, and masked feature, token and column edges.
"""

from collections.abc import Callable

import numpy as np
import pytest
import torch

from nanovllm.kernels.lora import select_lora_kernels, slot_rank
from nanovllm.kernels.lora_reference import lora_apply
from nanovllm.kernels.triton_lora import (
    FUSED_MAX_TOKENS,
    lora_apply_triton,
    lora_fused_triton,
    lora_shrink_expand_triton,
)
from nanovllm.layers.lora import LoRASlots, ShardRange
from nanovllm.lora.metadata import build_lora_metadata, group_tokens_by_slot
from nanovllm.runner.decode_staging import DecodeStaging
from nanovllm.sampling_params import SamplingParams
from nanovllm.scheduler.batch import ScheduledBatch
from nanovllm.scheduler.sequence import Sequence
from nanovllm.utils.context import AttentionMetadata, attention_context
from nanovllm.utils.lora_metadata import NO_ADAPTER, LoRAMetadata

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Against a float32 reference on the same inputs: float32 differs by summation order only; bfloat16 rounds the
# operands of the products (8 mantissa bits) and the output once.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
MAX_LORAS = 3
ADAPTER_RANKS = (8, 16, 4)  # each slot's adapter's rank, below the slots' 16 but slot 1's: the rest is zero
# Output slices of a fused q, k, v projection: 150 columns end mid-way through a 64- and a 128-column tile, and
# the edges at 40 and 56 fall inside the first tile, which straddles all three slices.
SLICE_SIZES = (40, 16, 94)
IN_FEATURES = 80  # not a multiple of the shrink's 64-feature loop step: the last step is masked
TRITON_PATHS = {"fused": lora_fused_triton, "shrink_expand": lora_shrink_expand_triton}


def random_rows(num_tokens: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """Rows of 1-3 tokens with slots 0, 2 or the base model (slot 1 stays empty), as the runner gives them."""
    rng = np.random.default_rng(seed)
    lengths: list[int] = []
    while sum(lengths) < num_tokens:
        lengths.append(int(rng.integers(1, 4)))
    lengths[-1] -= sum(lengths) - num_tokens
    return rng.choice(np.array([0, 2, NO_ADAPTER], dtype=np.int32), size=len(lengths)), lengths


def random_slots(dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A [MAX_LORAS, num_slices, rank, in] and B [MAX_LORAS, out, rank] holding adapters of ADAPTER_RANKS,
    zero-padded to the slots' rank as LoRASlots.load leaves them."""
    rank = slot_rank(max(ADAPTER_RANKS))
    lora_a = torch.randn(MAX_LORAS, len(SLICE_SIZES), rank, IN_FEATURES, generator=gen)
    lora_b = torch.randn(MAX_LORAS, sum(SLICE_SIZES), rank, generator=gen)
    for slot, adapter_rank in enumerate(ADAPTER_RANKS):
        lora_a[slot, :, adapter_rank:] = 0
        lora_b[slot, :, adapter_rank:] = 0
    return lora_a.to(dtype).to(DEVICE), lora_b.to(dtype).to(DEVICE)


# A prefill over several 64-token tiles, and decode-sized batches (16-token tiles) in 16 bits.
@pytest.mark.parametrize("path", sorted(TRITON_PATHS))
@pytest.mark.parametrize("dtype,num_tokens", [(torch.float32, 100), (torch.bfloat16, 5), (torch.bfloat16, 1)])
def test_triton_lora_matches_reference(path: str, dtype: torch.dtype, num_tokens: int) -> None:
    """Guards against a token given another slot's weights (tiles spanning slots, the grouped order), a column
    given another slice's shrink (tiles straddling slices), a base-model token changed, lost rows or columns at a
    tile's edge, and the scaling applied wrongly or twice."""
    gen = torch.Generator().manual_seed(num_tokens)
    row_slots, lengths = random_rows(num_tokens, seed=num_tokens)
    metadata = build_lora_metadata(row_slots, lengths, MAX_LORAS, DEVICE)
    lora_a, lora_b = random_slots(dtype, gen)
    x = torch.randn(num_tokens, IN_FEATURES, generator=gen).to(dtype).to(DEVICE)
    scalings = torch.tensor([0.5, 3.0, 2.0], device=DEVICE)
    slice_starts = torch.tensor([0, *np.cumsum(SLICE_SIZES)], dtype=torch.int32, device=DEVICE)
    y = torch.randn(num_tokens, sum(SLICE_SIZES), generator=gen).to(dtype).to(DEVICE)

    want_y, got_y = y.clone().float(), y.clone()  # clone first: float() of a float32 tensor is the tensor itself
    lora_apply(want_y, x.float(), lora_a.float(), lora_b.float(), scalings, metadata, slice_starts)
    TRITON_PATHS[path](got_y, x, lora_a, lora_b, scalings, metadata, slice_starts)
    tol = TOLERANCE[dtype] * want_y.abs().max().item()
    torch.testing.assert_close(got_y.float(), want_y, atol=tol, rtol=0, msg=lambda m: f"{path}: {m}")
    is_base = (metadata.token_slots == NO_ADAPTER).cpu()
    assert torch.equal(got_y.cpu()[is_base], y.cpu()[is_base]), "a base-model token's output changed"
    assert not torch.equal(got_y.cpu()[~is_base], y.cpu()[~is_base]), "no adapter token's output changed"


def test_triton_lora_path_depends_on_token_count_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against the choice between the fused and the two-kernel path reading the batch's adapters (a
    captured graph would replay one path for every mix) or sending decode batches to the two-kernel path."""
    calls: list[str] = []
    for name in TRITON_PATHS:
        monkeypatch.setattr(f"nanovllm.kernels.triton_lora.lora_{name}_triton", _recorder(calls, name))
    for num_tokens, row_slots in ((1, [NO_ADAPTER]), (FUSED_MAX_TOKENS, [0]), (FUSED_MAX_TOKENS + 1, [0])):
        metadata = build_lora_metadata(np.array(row_slots, np.int32), [num_tokens], MAX_LORAS, DEVICE)
        x = torch.zeros(num_tokens, IN_FEATURES)
        lora_apply_triton(x, x, x, x, x, metadata, x)
    assert calls == ["fused", "fused", "shrink_expand"], calls


def test_layer_gives_each_slice_its_columns_on_both_kernels() -> None:
    """Guards against LoRASlots passing the kernels slice edges that differ from where load() puts each slice's
    rows of B (a fused qkv whose k gets q's shrink), and against the Triton path differing from the torch one."""
    gen = torch.Generator().manual_seed(0)
    out_slices, offset = [], 0
    for size in SLICE_SIZES:
        out_slices.append(ShardRange(offset, size, full_start=0))
        offset += size
    weights = {  # slot -> per slice (A [rank, in], B [size, rank]) of an adapter of the slot's ADAPTER_RANKS
        slot: [(torch.randn(ADAPTER_RANKS[slot], IN_FEATURES, generator=gen), torch.randn(size, ADAPTER_RANKS[slot],
                generator=gen)) for size in SLICE_SIZES]
        for slot in (0, 2)
    }  # fmt: skip
    row_slots, lengths = random_rows(7, seed=7)
    metadata = build_lora_metadata(row_slots, lengths, MAX_LORAS, DEVICE)
    x = torch.randn(7, IN_FEATURES, generator=gen).to(DEVICE)
    y = torch.randn(7, sum(SLICE_SIZES), generator=gen).to(DEVICE)
    want = y.clone()
    for token, slot in enumerate(metadata.token_slots.tolist()):
        if slot != NO_ADAPTER:
            want[token] += 0.5 * torch.cat([x[token] @ a.T.to(DEVICE) @ b.T.to(DEVICE) for a, b in weights[slot]])
    outputs = {}
    for use_triton in (False, True):
        kernels = select_lora_kernels(use_triton)
        layer = LoRASlots(ShardRange(0, IN_FEATURES, 0), tuple(out_slices), MAX_LORAS, 16, kernels, like=y)
        for slot, slices in weights.items():
            layer.clear(slot, scaling=0.5)
            for slice_idx, (lora_a, lora_b) in enumerate(slices):
                layer.load(slot, slice_idx, lora_a, lora_b)
        with attention_context(_decode_metadata(metadata)):
            outputs[kernels.name] = layer(x, y.clone())
    for name, got in outputs.items():
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def _decode_metadata(lora: LoRAMetadata) -> AttentionMetadata:
    """An attention context that carries only the LoRA slots (a LoRA layer reads nothing else)."""
    empty = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    return AttentionMetadata(False, empty, 1, empty, 0, empty.long(), empty[None], lora=lora)


def _recorder(calls: list[str], name: str) -> Callable[..., None]:
    return lambda *args: calls.append(name)


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
