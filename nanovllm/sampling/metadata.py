"""A batch's SamplingParams as the sampler's device tensors, rebuilt only when the batch changes.

Decode steps usually run the same sequences in the same order as the step before, so the
per-row tensors of :class:`~nanovllm.sampling.sampler.SamplingTensors` are kept from the last
decode step and reused while the batch holds the same sequences and the same rows are still
below min_tokens. Only seeded rows need something new every step: their (seed, output position)
hash keys.
"""

import dataclasses
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass

import torch

from nanovllm.sampling.race import hash_keys
from nanovllm.sampling.sampler import PenaltyTensors, SamplerOutput, SamplingTensors, TokenEntries
from nanovllm.sampling_params import SamplingParams
from nanovllm.scheduler.batch import ScheduledBatch
from nanovllm.scheduler.sequence import Sequence
from nanovllm.utils.device import to_device


def check_params_for_vocab(params: SamplingParams, vocab_size: int) -> None:
    """Token ids in a request's sampling settings must exist in the model's vocabulary."""
    for name, ids in (("logit_bias", params.logit_bias or {}), ("stop_token_ids", params.stop_token_ids or [])):
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise ValueError(f"SamplingParams.{name} has token ids >= vocab_size={vocab_size}: {bad[:5]}")
    if params.logprobs is not None and params.logprobs > vocab_size:
        raise ValueError(f"SamplingParams.logprobs={params.logprobs} exceeds vocab_size={vocab_size}")


class PenaltyTable:
    """Prompt-token masks and output-token counts of the sequences that use penalties, one table row each.

    The table lives on the device and is updated in place after every step, so penalties never copy
    token lists to the device. It is a cache: a sequence outside the current batch may lose its row
    (least recently used first), and a row whose count disagrees with its sequence is rebuilt from
    the sequence's tokens. Allocated on first use: 5 bytes x num_rows x vocab_size.

    When the engine schedules ahead, a sequence's newest token may still be on the device (pending),
    which a rebuild could not count; no rebuild meets one. The token is pending only while the step
    that samples it is in flight, and only the next batch is built meanwhile. If the sequence is in
    that batch, it holds the row it had in the step in flight, which counted the token when that step
    was launched (record()), and keeps it while in the batch. If not, it may lose its row, but is
    rebuilt in a later batch, after the token landed.
    """

    def __init__(self, num_rows: int, vocab_size: int, device: torch.device) -> None:
        self.num_rows = num_rows
        self.vocab_size = vocab_size
        self.device = device
        self.output_counts: torch.Tensor | None = None  # [num_rows, vocab_size] int32
        self.prompt_mask: torch.Tensor | None = None  # [num_rows, vocab_size] bool
        self.row_of: OrderedDict[int, int] = OrderedDict()  # seq_id -> table row, least recently used first
        self.num_counted: list[int] = [0] * num_rows  # output tokens counted in each table row

    def rows_for(self, seqs: list[Sequence]) -> list[int]:
        """A table row per sequence, in sync with its tokens; every sequence of the list keeps its row."""
        if self.output_counts is None:
            shape = (self.num_rows, self.vocab_size)
            self.output_counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
            self.prompt_mask = torch.zeros(shape, dtype=torch.bool, device=self.device)
        in_batch = {seq.seq_id for seq in seqs}
        rows = []
        for seq in seqs:
            row = self.row_of.pop(seq.seq_id, None)
            if row is None:
                row = self._free_row(in_batch)
                self._rebuild(row, seq)
            elif self.num_counted[row] != seq.num_output_tokens:
                self._rebuild(row, seq)
            self.row_of[seq.seq_id] = row
            rows.append(row)
        return rows

    def _free_row(self, in_batch: Collection[int]) -> int:
        used = set(self.row_of.values())
        for row in range(self.num_rows):
            if row not in used:
                return row
        victim = next(seq_id for seq_id in self.row_of if seq_id not in in_batch)
        return self.row_of.pop(victim)

    def _rebuild(self, row: int, seq: Sequence) -> None:
        assert self.output_counts is not None and self.prompt_mask is not None
        if seq.num_pending_tokens:  # cannot happen (the class's docstring says why): fail loudly
            raise RuntimeError(f"sequence {seq.seq_id}'s penalty counts would be rebuilt with its newest token pending")
        prompt_ids = torch.tensor(seq.token_ids[: seq.num_prompt_tokens], device=self.device)
        output_ids = torch.tensor(seq.output_token_ids, dtype=torch.int64, device=self.device)
        self.prompt_mask[row].zero_()
        self.prompt_mask[row, prompt_ids] = True
        self.output_counts[row].zero_()
        self.output_counts[row].index_put_((output_ids,), torch.ones_like(output_ids, dtype=torch.int32), True)
        self.num_counted[row] = seq.num_output_tokens

    def record(self, table_rows: torch.Tensor, token_ids: torch.Tensor, host_table_rows: list[int]) -> None:
        """Count each row's newly sampled token (table_rows [K] int64, token_ids [K] int64, on the device)."""
        assert self.output_counts is not None
        ones = torch.ones_like(token_ids, dtype=torch.int32)
        self.output_counts.index_put_((table_rows, token_ids), ones, accumulate=True)
        for row in host_table_rows:
            self.num_counted[row] += 1


@dataclass(frozen=True)
class _BatchTensors:
    tensors: SamplingTensors  # everything but the per-step seed keys
    penalty_record_rows: torch.Tensor | None  # [K] int64, batch rows whose real sample the penalty table counts
    penalty_record_table_rows: torch.Tensor | None  # [K] int64, their penalty table rows
    host_record_table_rows: list[int]  # the same table rows on the host
    seeded_rows: list[int]  # batch rows with a seed
    decode_seqs: list[Sequence] | None = None  # the decode batch these were built for; None after a prefill
    min_tokens_rows: tuple[int, ...] = ()  # rows with a min_tokens, the only ones whose masking can change
    below_min: tuple[int, ...] = ()  # of those, the rows below their min_tokens when built


class SamplingMetadataBuilder:
    """Builds :class:`SamplingTensors` for each batch and keeps the penalty table in step with the samples."""

    def __init__(
        self, max_num_seqs: int, vocab_size: int, device: torch.device, eos_token_ids: Collection[int] = ()
    ) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.eos_token_ids = sorted(eos_token_ids)  # masked while a sequence is below its min_tokens
        self.penalty_table = PenaltyTable(max_num_seqs, vocab_size, device)
        self._cached: _BatchTensors | None = None

    def build(self, batch: ScheduledBatch) -> SamplingTensors:
        """The batch's sampling tensors, reusing last step's when the batch is the same."""
        seqs = batch.seqs
        cached = self._cached
        # `==` on lists of Sequences compares identities, in C: cheap next to rebuilding at batch 256.
        if batch.is_prefill or cached is None or cached.decode_seqs != seqs or self._below_min_changed(cached):
            is_real = [
                s.num_computed_tokens + n == s.num_tokens for s, n in zip(seqs, batch.num_new_tokens, strict=True)
            ]
            min_tokens_rows = tuple(i for i, s in enumerate(seqs) if s.params.min_tokens > 0)
            below_min = tuple(i for i in min_tokens_rows if seqs[i].num_output_tokens < seqs[i].params.min_tokens)
            cached = self._build_batch(seqs, set(below_min), is_real)
            decode_seqs = None if batch.is_prefill else list(seqs)
            self._cached = cached = dataclasses.replace(
                cached, decode_seqs=decode_seqs, min_tokens_rows=min_tokens_rows, below_min=below_min
            )
        if not cached.seeded_rows:
            return cached.tensors
        keys = [(0, 0)] * len(seqs)
        for row in cached.seeded_rows:
            seq = seqs[row]
            keys[row] = hash_keys(seq.params.seed or 0, seq.sample_index, seq.num_output_tokens)
        return dataclasses.replace(cached.tensors, seed_keys=self._to_device(keys, torch.int32))

    @staticmethod
    def _below_min_changed(cached: _BatchTensors) -> bool:
        """Whether a row of the cached decode batch has reached its min_tokens since it was built."""
        seqs = cached.decode_seqs
        assert seqs is not None
        rows = cached.min_tokens_rows
        return tuple(i for i in rows if seqs[i].num_output_tokens < seqs[i].params.min_tokens) != cached.below_min

    def record(self, output: SamplerOutput) -> None:
        """Count the step's real samples in the penalty table (on the device, no sync)."""
        cached = self._cached
        if cached is None or cached.penalty_record_rows is None or cached.penalty_record_table_rows is None:
            return
        token_ids = output.token_ids[cached.penalty_record_rows]  # [K]
        self.penalty_table.record(cached.penalty_record_table_rows, token_ids, cached.host_record_table_rows)

    def _build_batch(self, seqs: list[Sequence], below_min: set[int], is_real: list[bool]) -> _BatchTensors:
        params = [seq.params for seq in seqs]
        top_ks = [p.top_k_or_none or self.vocab_size for p in params]
        has_top_k = [p.top_k_or_none is not None for p in params]
        asked = [p.logprobs for p in params if p.logprobs is not None]
        penalty_rows = [i for i, p in enumerate(params) if p.has_penalties]
        seeded_rows = [i for i, p in enumerate(params) if p.seed is not None]
        tensors = SamplingTensors(
            temperatures=self._to_device([p.temperature for p in params], torch.float32),
            top_ks=self._to_device(top_ks, torch.int64),
            top_ps=self._to_device([p.top_p for p in params], torch.float32),
            min_ps=self._to_device([p.min_p for p in params], torch.float32),
            logit_edits=self._logit_edits(params, below_min),
            penalties=None,
            seed_keys=None,
            is_seeded=self._to_device([p.seed is not None for p in params], torch.bool) if seeded_rows else None,
            max_top_k=max(top_ks) if all(has_top_k) else None,
            use_top_k_top_p=any(has_top_k) or any(p.top_p < 1.0 for p in params),
            use_min_p=any(p.min_p > 0.0 for p in params),
            is_all_greedy=all(p.is_greedy for p in params),
            num_logprobs=max(asked) if asked else None,
        )
        if not penalty_rows:
            return _BatchTensors(tensors, None, None, [], seeded_rows)
        table_rows = self.penalty_table.rows_for([seqs[i] for i in penalty_rows])
        table_row_of = dict(zip(penalty_rows, table_rows, strict=True))
        record_rows = [i for i in penalty_rows if is_real[i]]
        record_table_rows = [table_row_of[i] for i in record_rows]
        tensors = dataclasses.replace(tensors, penalties=self._penalties(params, table_row_of))
        return _BatchTensors(
            tensors,
            self._to_device(record_rows, torch.int64),
            self._to_device(record_table_rows, torch.int64),
            record_table_rows,
            seeded_rows,
        )

    def _penalties(self, params: list[SamplingParams], table_row_of: dict[int, int]) -> PenaltyTensors:
        table = self.penalty_table
        assert table.output_counts is not None and table.prompt_mask is not None
        # Rows without penalties read table row 0 with neutral factors, so the whole batch is one tensor op.
        return PenaltyTensors(
            output_counts=table.output_counts,
            prompt_mask=table.prompt_mask,
            table_rows=self._to_device([table_row_of.get(i, 0) for i in range(len(params))], torch.int64),
            repetition=self._to_device([p.repetition_penalty for p in params], torch.float32),
            frequency=self._to_device([p.frequency_penalty for p in params], torch.float32),
            presence=self._to_device([p.presence_penalty for p in params], torch.float32),
        )

    def _logit_edits(self, params: list[SamplingParams], below_min: set[int]) -> TokenEntries | None:
        """logit_bias entries, and -inf on EOS and stop_token_ids for rows below min_tokens."""
        rows: list[int] = []
        token_ids: list[int] = []
        values: list[float] = []
        for row, p in enumerate(params):
            for token_id, bias in (p.logit_bias or {}).items():
                rows.append(row)
                token_ids.append(token_id)
                values.append(bias)
            if row in below_min:
                banned = set(p.stop_token_ids or []) | (set() if p.ignore_eos else set(self.eos_token_ids))
                rows.extend([row] * len(banned))
                token_ids.extend(sorted(banned))
                values.extend([-float("inf")] * len(banned))
        if not rows:
            return None
        return TokenEntries(
            self._to_device(rows, torch.int64),
            self._to_device(token_ids, torch.int64),
            self._to_device(values, torch.float32),
        )

    def _to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return to_device(values, dtype, self.device)
