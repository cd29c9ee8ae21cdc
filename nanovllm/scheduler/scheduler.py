"""Continuous batching: which sequences run in the next engine step, and how many tokens each.

Every step is either a prefill step (prompts, possibly in chunks) or a decode step (one
token for each running sequence). Prefill goes first whenever a prompt is waiting and fits.
A step computes, for each of its sequences, the K/V of tokens
``[num_computed_tokens, num_computed_tokens + num_new_tokens)``; that one rule covers a
whole prompt, a chunk of a long prompt, a prompt behind a cached prefix, and a decode.
With LoRA, a prompt whose adapter would be one more than the device slots hold is passed over
(scheduler/lora_admission.py).
"""

from collections import deque
from dataclasses import dataclass

from nanovllm.scheduler.batch import ScheduledBatch, StepSamples
from nanovllm.scheduler.block_manager import BlockManager
from nanovllm.scheduler.lora_admission import LoRAAdmission
from nanovllm.scheduler.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int  # most sequences running at once
    max_num_batched_tokens: int  # most tokens computed in one step
    max_model_len: int  # longest prompt + completion, in tokens
    max_loras: int | None = None  # most distinct LoRA adapters among sequences holding KV blocks; None = LoRA off


class Scheduler:
    def __init__(self, block_manager: BlockManager, limits: SchedulerLimits, eos_token_ids: set[int]) -> None:
        self.block_manager = block_manager
        self.limits = limits
        self.eos_token_ids = eos_token_ids  # tokens that end a sequence unless it ignores EOS
        self.waiting: deque[Sequence] = deque()  # to be prefilled; the head may be mid-prefill
        self.running: deque[Sequence] = deque()  # prefilled and decoding, oldest first
        self.num_preemptions = 0  # sequences preempted so far, for logs and tests

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
        if seq.params.n > self.limits.max_num_seqs:  # its completions could never run together
            raise ValueError(
                f"n={seq.params.n} completions exceed max_num_seqs={self.limits.max_num_seqs}, the most sequences "
                "that run at once; lower n or raise max_num_seqs"
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
        batch = self._schedule_prefill(self.limits.max_num_batched_tokens)
        if batch.seqs:
            return batch
        return self._schedule_decode()

    def _schedule_prefill(self, budget: int) -> ScheduledBatch:
        """Waiting prompts, in order, as many tokens as ``budget`` allows (the last one maybe in part)."""
        seqs: list[Sequence] = []
        num_new_tokens: list[int] = []
        adapters = LoRAAdmission(self.limits.max_loras, self._block_holders)
        passed_over: list[Sequence] = []  # prompts whose LoRA adapter has no device slot now; they keep their place
        while self.waiting and budget > 0 and len(self.running) + len(seqs) < self.limits.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_pending_tokens:
                break  # preempted by this very schedule (a mixed step's decode) with its newest token on the device
            if not seq.block_table:
                if not adapters.can_admit(seq):
                    passed_over.append(self.waiting.popleft())
                    continue
                if not self.block_manager.can_allocate(seq):
                    break
                self.block_manager.allocate(seq)
                adapters.admit(seq)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            seqs.append(seq)
            num_new_tokens.append(num_new)
            budget -= num_new
            if seq.num_computed_tokens + num_new < seq.num_tokens:
                break  # chunked prefill: this prompt goes on at the head of the queue next step
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        self.waiting.extendleft(reversed(passed_over))
        return ScheduledBatch(seqs, num_new_tokens, is_prefill=True)

    def _block_holders(self) -> list[Sequence]:
        """The sequences holding KV blocks: the running ones and a prompt in the middle of its prefill."""
        return [*self.running, *(seq for seq in self.waiting if seq.block_table)]

    def _schedule_decode(self) -> ScheduledBatch:
        """Every running sequence decodes one token, oldest first; when the cache runs out of blocks, the newest
        running sequences are preempted to make room."""
        max_batch = min(self.limits.max_num_seqs, self.limits.max_num_batched_tokens)
        seqs: list[Sequence] = []
        while self.running and len(seqs) < max_batch:
            seq = self.running.popleft()
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
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def postprocess(self, batch: ScheduledBatch, samples: StepSamples) -> list[Sequence]:
        """Record what the step computed and sampled; return the sequences that finished."""
        return self.record_samples(batch, self.advance(batch), samples)

    def advance(self, batch: ScheduledBatch) -> list[int]:
        """Account for a launched step before its samples arrive; returns the rows that sample a real token.

        Each such row's sequence counts its sample as a pending token, so the next step can be scheduled
        while this one runs on the device. A sequence that thereby reaches max_tokens is done: it leaves the
        running queue and frees its blocks now, and record_samples() gives its finish reason.
        """
        rows: list[int] = []
        num_ended = 0
        for row, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            if seq.is_finished:
                continue  # a stop token or string ended it while this step was in flight: its row is wasted
            seq.num_computed_tokens += num_new
            self.block_manager.register_computed(seq)  # the blocks the step filled, for later prompts to reuse
            if seq.num_computed_tokens < seq.num_tokens:
                continue  # a prompt chunk that is not the last: its sample is not a real token
            seq.num_pending_tokens += 1
            rows.append(row)
            if seq.num_output_tokens >= seq.params.max_tokens:
                self._end(seq)
                num_ended += 1
        if num_ended:
            self._drop_finished()
        return rows

    def record_samples(self, batch: ScheduledBatch, rows: list[int], samples: StepSamples) -> list[Sequence]:
        """Append the sampled tokens of ``rows`` (from advance()), which were pending; return the sequences that
        finished, by a stop token or by length."""
        finished: list[Sequence] = []
        for row in rows:
            seq, token_id = batch.seqs[row], samples.token_ids[row]
            seq.token_ids.append(token_id)
            seq.num_pending_tokens -= 1
            seq.record_logprobs(samples.sampled_logprobs[row], samples.top_logprobs[row])
            finish_reason, stop_reason = self._finish_reason(seq, token_id)
            if finish_reason is None:
                continue
            if not seq.is_finished:  # a stop token: advance() could not know, so it is still queued
                self._end(seq)
            seq.finish_reason, seq.stop_reason = finish_reason, stop_reason
            finished.append(seq)
        if finished:
            self._drop_finished()
        return finished

    def _drop_finished(self) -> None:
        """Take finished sequences out of the queues (a step scheduled meanwhile may have preempted one). Called
        only once one ended, not every step: the scan reads the status of every queued sequence."""
        if any(seq.is_finished for seq in self.running):
            self.running = deque(seq for seq in self.running if not seq.is_finished)
        if any(seq.is_finished for seq in self.waiting):
            self.waiting = deque(seq for seq in self.waiting if not seq.is_finished)

    def _end(self, seq: Sequence) -> None:
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
        if seq.num_output_tokens >= params.max_tokens:
            return "length", None
        return None, None

    def stop(self, seq: Sequence, stop_reason: str) -> None:
        """Finish a sequence that a stop string ended (found by the engine in the detokenized text)."""
        if not seq.is_finished:  # else the same step ended it by a token or length; the stop string still wins
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
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "abort"

    def abort_all(self) -> None:
        """Drop every unfinished sequence and free its blocks."""
        for seq in (*self.waiting, *self.running):
            self.block_manager.free(seq)
        self.waiting.clear()
        self.running.clear()
