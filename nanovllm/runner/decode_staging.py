"""The pinned host buffer a decode graph copies its inputs from (runner/cuda_graphs.py), and how each decode
step fills it: lane b holds the inputs of the batch's b-th sequence."""

import math

import numpy as np
import torch

from nanovllm.lora.metadata import decode_staging_fields, stage_decode_slots
from nanovllm.runner.model_inputs import PendingTokens
from nanovllm.scheduler.batch import ScheduledBatch

FIELD_ALIGNMENT = 16  # bytes: each input field starts at a multiple of this in the staging buffer


class DecodeStaging:
    """A pinned host buffer holding one decode step's inputs, lane b for the b-th sequence of the batch.

    The fields lie one after another in one byte buffer, block tables last, so that the bytes every
    field needs for lanes < bucket are one prefix of it, copied to the device in one go:

        | input_ids | is_pending | source_rows | positions | slot_mapping | context_lens | block_tables |
        |<--------------------- max_num_seqs lanes each ------------------------------->| bucket rows...|
        |<------------------------------------ num_bytes(bucket) --------------------------------->|

    With LoRA (``max_loras`` > 0) each lane's adapter slot comes before the block tables (lora/metadata.py).
    """

    def __init__(
        self, max_num_seqs: int, max_blocks: int, block_size: int, pin_memory: bool, max_loras: int = 0
    ) -> None:
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.max_loras = max_loras  # adapter slots; 0 = no LoRA fields
        self.shapes = {
            "input_ids": ((max_num_seqs,), torch.int64),  # each sequence's newest token (0 where pending)
            "is_pending": ((max_num_seqs,), torch.bool),  # whether it is on the device only (PendingTokens)
            "source_rows": ((max_num_seqs,), torch.int64),  # then, the row of the step before that sampled it
            "positions": ((max_num_seqs,), torch.int64),
            "slot_mapping": ((max_num_seqs,), torch.int64),
            "context_lens": ((max_num_seqs,), torch.int32),
            **(decode_staging_fields(max_num_seqs, max_loras) if max_loras else {}),
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
        # The block table each lane's row was last copied from. A decode step mostly runs the step before's
        # sequences in the same lanes, whose tables gain a block once every block_size steps: a row is copied
        # only when its table changed (comparing two short lists is ~20x cheaper than a numpy row copy).
        self.staged_block_tables: list[list[int]] = [[] for _ in range(max_num_seqs)]

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

    def stage(
        self,
        batch: ScheduledBatch,
        bucket: int,
        pending: PendingTokens | None = None,
        lora_slots: np.ndarray | None = None,  # [B] int32 each row's adapter slot (LoRAManager.activate)
    ) -> None:
        """Fill the pinned host buffer: each sequence computes its newest token, at position num_tokens - 1.

        slot of position p = block_tables[lane, p // block_size] * block_size + p % block_size
        """
        seqs = batch.seqs
        num_seqs = len(seqs)
        h = self.arrays
        h["input_ids"][:num_seqs] = [0 if seq.num_pending_tokens else seq.token_ids[-1] for seq in seqs]
        h["is_pending"][:num_seqs] = False if pending is None else pending.is_pending
        h["source_rows"][:num_seqs] = 0 if pending is None else pending.source_rows
        positions = np.array([seq.num_tokens - 1 for seq in seqs], dtype=np.int64)  # [B]
        h["positions"][:num_seqs] = positions
        h["context_lens"][:num_seqs] = positions + 1
        block_tables, staged = h["block_tables"], self.staged_block_tables
        for lane, seq in enumerate(seqs):
            if staged[lane] != seq.block_table:  # another sequence in this lane, or a new block
                block_tables[lane, : len(seq.block_table)] = seq.block_table
                staged[lane] = list(seq.block_table)
        block_indices, offsets = np.divmod(positions, self.block_size)
        block_ids = block_tables[np.arange(num_seqs), block_indices]  # [B]
        h["slot_mapping"][:num_seqs] = block_ids.astype(np.int64) * self.block_size + offsets
        if num_seqs < bucket:
            h["slot_mapping"][num_seqs:bucket] = -1  # padded lanes: nothing stored
            h["is_pending"][num_seqs:bucket] = False
            h["input_ids"][num_seqs:bucket] = 0  # padded lanes still embed a token
            h["context_lens"][num_seqs:bucket] = 0  # padded lanes: nothing attended
        if self.max_loras:
            stage_decode_slots(h, lora_slots, num_seqs, bucket, self.max_loras)
