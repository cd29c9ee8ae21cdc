"""The pinned host buffer a decode graph copies its inputs from (engine/cuda_graphs.py), and how each
decode step fills it: one lane per sequence of the batch, updated in place while the batch stays the same."""

import math
from collections.abc import Iterable

import numpy as np
import torch

from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sequence import Sequence

FIELD_ALIGNMENT = 16  # bytes: each input field starts at a multiple of this in the staging buffer


class DecodeStaging:
    """A pinned host buffer holding one decode step's inputs, lane b for the b-th sequence of the batch.

    The fields lie one after another in one byte buffer, block tables last, so that the bytes every
    field needs for lanes < bucket are one prefix of it:

        | input_ids | feed_rows | positions | slot_mapping | context_lens | block_tables (lane-major) |
        |<------------- max_num_seqs lanes each ----------------------->| bucket rows ...           |
        |<----------------------------- num_bytes(bucket) ------------------------->|
    """

    def __init__(self, max_num_seqs: int, max_blocks: int, block_size: int, pin_memory: bool) -> None:
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.shapes = {
            "input_ids": ((max_num_seqs,), torch.int64),  # the last sampled token of each sequence
            "feed_rows": ((max_num_seqs,), torch.int64),  # -1, or the row of last_sampled that holds it
            "positions": ((max_num_seqs,), torch.int64),
            "slot_mapping": ((max_num_seqs,), torch.int64),
            "context_lens": ((max_num_seqs,), torch.int32),
            "block_tables": ((max_num_seqs, max_blocks), torch.int32),
        }
        self.offsets: dict[str, int] = {}  # byte offset of each field in the buffer
        num_bytes = 0
        for name, (shape, dtype) in self.shapes.items():
            num_bytes = -(-num_bytes // FIELD_ALIGNMENT) * FIELD_ALIGNMENT
            self.offsets[name] = num_bytes
            num_bytes += math.prod(shape) * dtype.itemsize
        self.buffer = torch.zeros(num_bytes, dtype=torch.uint8, pin_memory=pin_memory)
        self.host = self.fields_of(self.buffer)
        self.arrays = {name: t.numpy() for name, t in self.host.items()}  # numpy views of the same memory
        self.lane_keys: list[tuple[int, int, int] | None] = [None] * max_num_seqs  # what each block-table row holds
        self.last_seqs: list[Sequence] = []  # the sequences staged last step, lane by lane

    def fields_of(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each field as a typed tensor over ``buffer`` (this layout's bytes: the host's or the device's)."""
        fields = {}
        for name, (shape, dtype) in self.shapes.items():
            start = self.offsets[name]
            fields[name] = buffer[start : start + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        return fields

    def num_bytes(self, bucket: int) -> int:
        """The buffer's prefix that holds every field for lanes < bucket: all of it up to the block tables'
        first ``bucket`` rows."""
        return self.offsets["block_tables"] + bucket * self.max_blocks * torch.int32.itemsize

    def stage(self, batch: ScheduledBatch, bucket: int, feed_rows: np.ndarray | None = None) -> None:
        """Fill the pinned host buffer: each sequence computes its last token, at position num_tokens - 1.

        One list comprehension per field and whole-array numpy arithmetic, not per-element writes:
        this runs every decode step for every sequence, so it is host time the GPU waits for. Most
        steps run the same sequences as the step before, each one token further: then positions,
        context lengths and slots move up by one in place, and only lanes that began a block re-read
        their table (the scheduler's decode lanes name those, when the batch carries them).
        """
        seqs = batch.seqs
        num_seqs = len(seqs)
        h = self.arrays
        h["feed_rows"][:num_seqs] = -1 if feed_rows is None else feed_rows
        # `==` on lists of Sequences compares identities, in C. The same sequences as last time, with no
        # other step in between (forget() is called after every step run without this staging), are
        # one token further, with their block tables only appended to.
        # slot of position p = block_tables[lane, p // block_size] * block_size + p % block_size
        if seqs == self.last_seqs and self._one_token_further(seqs):
            if feed_rows is None:  # else the step before was this batch's, and every lane is fed from it
                h["input_ids"][:num_seqs] = [seq.token_ids[-1] for seq in seqs]
            positions, slots = h["positions"][:num_seqs], h["slot_mapping"][:num_seqs]
            positions += 1
            h["context_lens"][:num_seqs] += 1
            slots += 1  # the next slot of the same block, except in lanes whose position begins a block:
            new_block_lanes = self._lanes_beginning_block(batch, positions)
            self._stage_block_tables(seqs, new_block_lanes)
            for lane in new_block_lanes:
                slots[lane] = int(h["block_tables"][lane, positions[lane] // self.block_size]) * self.block_size
        else:
            h["input_ids"][:num_seqs] = [seq.token_ids[-1] for seq in seqs]  # PENDING_TOKEN where fed
            positions = np.array([len(seq.token_ids) - 1 for seq in seqs], dtype=np.int64)  # [B]
            h["positions"][:num_seqs] = positions
            h["context_lens"][:num_seqs] = positions + 1
            self._stage_block_tables(seqs, range(num_seqs))
            self.last_seqs = list(seqs)
            block_indices, offsets = np.divmod(positions, self.block_size)
            block_ids = h["block_tables"][np.arange(num_seqs), block_indices]  # [B]
            h["slot_mapping"][:num_seqs] = block_ids.astype(np.int64) * self.block_size + offsets
        if num_seqs < bucket:
            h["slot_mapping"][num_seqs:bucket] = -1  # padded lanes: nothing stored
            h["feed_rows"][num_seqs:bucket] = -1
            h["input_ids"][num_seqs:bucket] = 0  # padded lanes still embed a token: never a stale PENDING_TOKEN
            h["context_lens"][num_seqs:bucket] = 0  # padded lanes: nothing attended

    def _lanes_beginning_block(self, batch: ScheduledBatch, positions: np.ndarray) -> list[int]:
        """Lanes whose position is a multiple of block_size: the scheduler's lanes know them without array work."""
        if batch.lanes is not None:
            return batch.lanes.lanes_beginning_block()
        return np.flatnonzero(positions % self.block_size == 0).tolist()

    def _one_token_further(self, seqs: list[Sequence]) -> bool:
        """Whether the first lane gained exactly one token since it was staged (not staged twice for one step)."""
        return len(seqs[0].token_ids) - 1 == self.arrays["positions"][0] + 1

    def forget(self) -> None:
        """A step ran without this staging (a prefill, or an eager decode): the next stage() starts afresh."""
        self.last_seqs = []

    def _stage_block_tables(self, seqs: list[Sequence], lanes: Iterable[int]) -> None:
        """Rewrite a lane's block-table row (of those in ``lanes``) only when its sequence or blocks changed.

        A block table only grows by appending, and a freed sequence gets a new list, so the list's
        identity, its length and its last block id tell whether the row already holds it.
        """
        rows = self.arrays["block_tables"]
        for lane in lanes:
            seq = seqs[lane]
            table = seq.block_table
            key = (id(table), len(table), table[-1])
            if self.lane_keys[lane] != key:
                rows[lane, : len(table)] = table
                self.lane_keys[lane] = key
