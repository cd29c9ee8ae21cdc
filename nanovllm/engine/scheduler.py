"""Continuous batching: which sequences run in the next engine step, and how many tokens each.

Every step is either a prefill step (prompts, possibly in chunks) or a decode step (one
token for each running sequence). Prefill goes first whenever a prompt is waiting and fits.
A step computes, for each of its sequences, the K/V of tokens
``[num_computed_tokens, num_computed_tokens + num_new_tokens)``; that one rule covers a
whole prompt, a chunk of a long prompt, a prompt behind a cached prefix, and a decode.
"""

from collections import deque
from dataclasses import dataclass

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.decode_lanes import DecodeLanes
from nanovllm.engine.sequence import PENDING_TOKEN, Sequence, SequenceStatus, StepSamples


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int  # most sequences running at once
    max_num_batched_tokens: int  # most tokens computed in one step
    max_model_len: int  # longest prompt + completion, in tokens


@dataclass
class ScheduledBatch:
    """What one engine step computes: the model runner's input."""

    seqs: list[Sequence]  # the sequences of this step, in batch order
    num_new_tokens: list[int]  # tokens each sequence computes this step (its query length)
    is_prefill: bool  # False: a decode step, exactly one new token per sequence
    lanes: DecodeLanes | None = None  # a decode step of the whole running queue: its lanes (decode_lanes.py)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, limits: SchedulerLimits, eos_token_ids: set[int]) -> None:
        self.block_manager = block_manager
        self.limits = limits
        self.eos_token_ids = eos_token_ids  # tokens that end a sequence unless it ignores EOS
        self.waiting: deque[Sequence] = deque()  # to be prefilled; the head may be mid-prefill
        self.running: deque[Sequence] = deque()  # prefilled and decoding, oldest first
        self.num_preemptions = 0  # sequences preempted so far, for logs and tests
        # The running queue as decode lanes while it stays the same; None once a sequence joins or leaves it.
        self.lanes: DecodeLanes | None = None

    def check_request(self, seq: Sequence) -> None:
        """Refuse a request that can never run, with an error that says why and what to change."""
        if seq.num_prompt_tokens == 0:
            raise ValueError("the prompt is empty; give at least one token")
        total = seq.num_prompt_tokens + seq.params.max_tokens
        if total > self.limits.max_model_len:
            raise ValueError(
                f"prompt ({seq.num_prompt_tokens} tokens) + max_tokens ({seq.params.max_tokens}) = {total} "
                f"exceeds max_model_len={self.limits.max_model_len}; shorten the prompt, lower max_tokens "
                "or raise max_model_len"
            )
        block_size = self.block_manager.block_size
        num_blocks = (total + block_size - 1) // block_size
        if num_blocks > self.block_manager.num_blocks:
            raise ValueError(
                f"the request needs {num_blocks} KV-cache blocks but the cache has "
                f"{self.block_manager.num_blocks}; raise num_kvcache_blocks or shorten the request"
            )

    def add(self, seq: Sequence, first: bool = False) -> None:
        """Queue a sequence for prefill: at the tail, or at the head when ``first`` (it runs next)."""
        self.check_request(seq)
        if first:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        """The next step's batch: prefill when a waiting prompt fits, otherwise decode."""
        batch = self._schedule_prefill()
        if batch.seqs:
            return batch
        return self._schedule_decode()

    def _schedule_prefill(self) -> ScheduledBatch:
        seqs: list[Sequence] = []
        num_new_tokens: list[int] = []
        budget = self.limits.max_num_batched_tokens
        while self.waiting and budget > 0 and len(self.running) + len(seqs) < self.limits.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                if not self.block_manager.can_allocate(seq):
                    break
                self.block_manager.allocate(seq)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            seqs.append(seq)
            num_new_tokens.append(num_new)
            budget -= num_new
            if seq.num_computed_tokens + num_new < seq.num_tokens:
                break  # chunked prefill: this prompt goes on at the head of the queue next step
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self.lanes = None
        return ScheduledBatch(seqs, num_new_tokens, is_prefill=True)

    def _schedule_decode(self) -> ScheduledBatch:
        max_batch = min(self.limits.max_num_seqs, self.limits.max_num_batched_tokens)
        block_size = self.block_manager.block_size
        if len(self.running) <= max_batch:
            # Most steps: every running sequence decodes, and the few whose newest token begins a block can
            # each have a free one. The lanes of the last decode step do the bookkeeping when the running
            # queue is the same (`==` on lists of Sequences compares identities, in C); else new lanes.
            seqs = list(self.running)
            lanes = self.lanes
            if lanes is None or lanes.seqs != seqs:
                lanes = DecodeLanes(seqs, block_size, self.eos_token_ids)
            short_lanes = lanes.lanes_without_slot()
            if len(short_lanes) <= self.block_manager.num_free_blocks:
                for lane in short_lanes:
                    self.block_manager.append_slot(lanes.seqs[lane])
                self.lanes = lanes
                return ScheduledBatch(lanes.seqs, lanes.num_new_tokens, is_prefill=False, lanes=lanes)
        self.lanes = None
        # Otherwise oldest first, preempting the newest sequences when the cache runs out of blocks.
        seqs = []
        while self.running and len(seqs) < max_batch:
            seq = self.running.popleft()
            if len(seq.block_table) * block_size >= len(seq.token_ids):
                seqs.append(seq)  # the newest token already has a slot: most steps, so checked inline
                continue
            while not self.block_manager.can_append(seq):
                if self.running:
                    self._preempt(self.running.pop())  # the newest running sequence makes room
                else:
                    self._preempt(seq)
                    break
            else:
                self.block_manager.append_slot(seq)
                seqs.append(seq)
        self.running.extendleft(reversed(seqs))
        return ScheduledBatch(seqs, [1] * len(seqs), is_prefill=False)

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it is recomputed later, ahead of new prompts."""
        self.lanes = None
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def postprocess(self, batch: ScheduledBatch, samples: StepSamples) -> list[Sequence]:
        """Record what the step computed and sampled; return the sequences that finished."""
        return self.record_samples(batch, self.advance(batch), samples)

    def advance(self, batch: ScheduledBatch) -> list[int]:
        """Account for a launched step before its samples arrive; returns the rows that sample a real token.

        Each such row gets a PENDING_TOKEN as its newest token, so the next step can be scheduled while
        this one runs on the GPU. A sequence that thereby reaches max_tokens is done: it leaves the running
        queue and frees its blocks now, and record_samples() gives its finish reason.
        """
        if batch.lanes is not None and batch.lanes is self.lanes:  # the same bookkeeping, known from the lanes' phases
            full_block_lanes, ended_lanes = batch.lanes.advance()
            for lane in full_block_lanes:
                self.block_manager.register_computed(batch.seqs[lane])  # its computed tokens fill a block
            for lane in ended_lanes:
                self._end(batch.seqs[lane])
            if ended_lanes:
                self.running = deque(seq for seq in self.running if not seq.is_finished)
            return batch.lanes.rows
        if not batch.is_prefill:
            return self._advance_decode(batch)
        rows: list[int] = []
        block_size = self.block_manager.block_size
        finished = SequenceStatus.FINISHED  # a local: this loop runs for every row of every step
        any_done = False
        for row, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            if seq.status is finished:
                continue  # a stop token ended it while this step was in flight: its row is wasted
            seq.num_computed_tokens += num_new
            if seq.num_computed_tokens // block_size > len(seq.block_hashes):
                self.block_manager.register_computed(seq)  # a block filled up (checked inline: rarely true)
            if seq.num_computed_tokens < len(seq.token_ids):
                continue  # a prompt chunk that is not the last: its sample is not a real token
            seq.token_ids.append(PENDING_TOKEN)
            rows.append(row)
            if len(seq.token_ids) - seq.num_prompt_tokens >= seq.params.max_tokens:  # num_output_tokens, inlined
                self._end(seq)
                any_done = True
        if any_done:
            self.running = deque(seq for seq in self.running if not seq.is_finished)
        return rows

    def _advance_decode(self, batch: ScheduledBatch) -> list[int]:
        """advance() for a decode step, where every row computes one token and samples the next.

        The same bookkeeping with fewer reads per row (a third less host time at batch 256): a row's
        newest token was its only uncomputed one, so its sample is real, and a block fills up exactly
        when the computed count reaches a multiple of the block size.
        """
        rows: list[int] = []
        block_size = self.block_manager.block_size
        finished = SequenceStatus.FINISHED
        any_done = False
        for row, seq in enumerate(batch.seqs):
            if seq.status is finished:
                continue  # a stop token ended it while this step was in flight: its row is wasted
            num_computed = seq.num_computed_tokens = seq.num_computed_tokens + 1
            if num_computed % block_size == 0:
                self.block_manager.register_computed(seq)
            token_ids = seq.token_ids
            token_ids.append(PENDING_TOKEN)
            rows.append(row)
            if len(token_ids) - seq.num_prompt_tokens >= seq.params.max_tokens:
                self._end(seq)
                any_done = True
        if any_done:
            self.running = deque(seq for seq in self.running if not seq.is_finished)
        return rows

    def record_samples(self, batch: ScheduledBatch, rows: list[int], samples: StepSamples) -> list[Sequence]:
        """Put the sampled tokens of ``rows`` (from advance()) in place of their PENDING_TOKENs; return the
        sequences that finished, by a stop token or by length."""
        lanes = batch.lanes
        if lanes is not None and rows is lanes.rows and lanes.record(samples.token_ids):
            # advance() took the lanes' path and no row sampled a stop token: only max_tokens ended any
            ended = []
            for lane in lanes.ended_lanes:
                seq = batch.seqs[lane]
                seq.finish_reason, seq.stop_reason = self._finish_reason(seq, samples.token_ids[lane])
                ended.append(seq)
            return ended
        finished: list[Sequence] = []
        seqs, token_ids, logprobs = batch.seqs, samples.token_ids, samples.sampled_logprobs
        eos_token_ids, is_finished = self.eos_token_ids, SequenceStatus.FINISHED
        any_stopped = False
        for row in rows:
            seq, token_id = seqs[row], token_ids[row]
            seq.token_ids[-1] = token_id
            if logprobs[row] is not None:
                seq.record_logprobs(logprobs[row], samples.top_logprobs[row])
            # Most rows neither end by length (advance() ended those) nor sampled a stop token: checked inline.
            if seq.status is not is_finished and not seq.params.stop_token_ids and token_id not in eos_token_ids:
                continue
            finish_reason, stop_reason = self._finish_reason(seq, token_id)
            if finish_reason is None:
                continue
            if not seq.is_finished:  # a stop token: advance() could not know, so it is still queued
                self._end(seq)
                any_stopped = True
            seq.finish_reason, seq.stop_reason = finish_reason, stop_reason
            finished.append(seq)
        if any_stopped:  # also from waiting: a step scheduled meanwhile may have preempted it
            self.running = deque(seq for seq in self.running if not seq.is_finished)
            self.waiting = deque(seq for seq in self.waiting if not seq.is_finished)
        return finished

    def _end(self, seq: Sequence) -> None:
        self.lanes = None
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free(seq)

    def _finish_reason(self, seq: Sequence, token_id: int) -> tuple[str | None, int | None]:
        """(finish_reason, stop_reason): EOS stops with stop_reason None, a stop_token_ids entry names itself.

        Before min_tokens the sampler masks both, so neither can appear here.
        """
        params = seq.params
        if params.stop_token_ids and token_id in params.stop_token_ids:
            return "stop", token_id
        if not params.ignore_eos and token_id in self.eos_token_ids:
            return "stop", None
        if len(seq.token_ids) - seq.num_prompt_tokens >= params.max_tokens:  # num_output_tokens, inlined: per row
            return "length", None
        return None, None

    def stop(self, seq: Sequence, stop_reason: str) -> None:
        """Finish a sequence that a stop string ended (found by the engine in the detokenized text)."""
        if not seq.is_finished:  # else the same step ended it by a token or length; the stop string still wins
            self.lanes = None
            self.running.remove(seq)
            self.block_manager.free(seq)
            seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.stop_reason = "stop", stop_reason

    def abort(self, seq: Sequence) -> None:
        """Drop one unfinished sequence, wherever it is queued, and free its blocks at once."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.running:
            self.running.remove(seq)
        else:
            return
        self.lanes = None
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "abort"

    def abort_all(self) -> None:
        """Drop every unfinished sequence and free its blocks."""
        for seq in (*self.waiting, *self.running):
            self.block_manager.free(seq)
        self.waiting.clear()
        self.running.clear()
        self.lanes = None
