"""The engine loop: tokenize requests, schedule a batch, run the model, record the tokens, repeat."""

import json
import os
import time
from collections.abc import Iterator
from collections.abc import Sequence as SequenceLike
from dataclasses import dataclass

from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from nanovllm.config import EngineConfig
from nanovllm.engine.block_manager import BlockManager, PrefixCacheStats
from nanovllm.engine.host_samples import HostSamples
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.request import Request
from nanovllm.engine.sampling_metadata import check_params_for_vocab
from nanovllm.engine.scheduler import ScheduledBatch, Scheduler, SchedulerLimits
from nanovllm.engine.sequence import Sequence, SequenceStatus
from nanovllm.models.arch import ModelArch, load_model_arch
from nanovllm.outputs import RequestOutput, StreamOutput
from nanovllm.sampling_params import SamplingParams

Prompt = str | list[int]


def effective_max_model_len(config: EngineConfig, arch: ModelArch) -> int:
    """config.max_model_len clamped to the model's limit; a sliding window shorter than it is refused."""
    max_model_len = min(config.max_model_len, arch.max_position_embeddings)
    if arch.sliding_window is not None and arch.sliding_window < max_model_len:
        raise ValueError(
            f"the model attends through a sliding window of {arch.sliding_window} tokens, which this engine does "
            f"not implement; set max_model_len <= {arch.sliding_window} (now {max_model_len})"
        )
    return max_model_len


def load_tokenizer(model_dir: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"could not load a tokenizer from {model_dir} ({e}); add its tokenizer files, or pass "
            "skip_tokenizer_init=True and give prompts as token ids"
        ) from e


def read_eos_token_ids(model_dir: str, arch: ModelArch, tokenizer: PreTrainedTokenizerBase | None) -> set[int]:
    """Every end-of-sequence id named by config.json, generation_config.json and the tokenizer."""
    eos_ids = set(arch.eos_token_ids)
    path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        eos_ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    return eos_ids


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, for logs and metrics."""

    num_running: int  # requests prefilled and decoding
    num_waiting: int  # requests queued for prefill (new, mid-chunk or preempted)
    kv_cache_usage: float  # share of KV-cache blocks held by unfinished requests, 0..1
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache so far
    prefix_cache_hits: int  # of those, tokens found cached


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.arch = load_model_arch(config.model)
        self.max_model_len = effective_max_model_len(config, self.arch)
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(config.model)
        eos_ids = read_eos_token_ids(config.model, self.arch, self.tokenizer)
        self.runner = ModelRunner(config, self.arch, self.max_model_len, eos_ids)
        block_manager = BlockManager(
            self.runner.num_kvcache_blocks, config.kvcache_block_size, config.enable_prefix_caching
        )
        limits = SchedulerLimits(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len)
        self.scheduler = Scheduler(block_manager, limits, eos_ids)
        self.requests: dict[str, Request] = {}  # unfinished requests by id
        self._requests_by_seq: dict[int, Request] = {}  # the same requests by Sequence.seq_id
        # ids of requests with per-row work after each step: outputs to stream, text to follow or siblings to queue
        self._checked_per_step: set[str] = set()
        # The step launched ahead of the host's bookkeeping and not recorded yet: its batch, the rows that sample a
        # token (Scheduler.advance) and its samples on their way to the host. Only between turns of _step_ahead().
        self._in_flight: tuple[ScheduledBatch, list[int], HostSamples] | None = None

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any. Closing twice is harmless."""
        self.runner.close()

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        return self.scheduler.block_manager.stats

    def stats(self) -> EngineStats:
        block_manager = self.scheduler.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=1.0 - block_manager.num_free_blocks / block_manager.num_blocks,
            prefix_cache_queries=block_manager.stats.num_queried_tokens,
            prefix_cache_hits=block_manager.stats.num_hit_tokens,
        )

    def make_sequence(self, prompt: Prompt, params: SamplingParams) -> Sequence:
        """Tokenize and check one request; raises before anything is queued."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a prompt is a string but skip_tokenizer_init=True; give token ids")
            token_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            token_ids = list(prompt)
            bad = [t for t in token_ids if not 0 <= t < self.arch.vocab_size]
            if bad:
                raise ValueError(f"the prompt has token ids outside [0, {self.arch.vocab_size}): {bad[:5]}")
        else:
            raise TypeError(f"a prompt must be a str or a list of int token ids, got {type(prompt).__name__}")
        check_params_for_vocab(params, self.arch.vocab_size)
        seq = Sequence(token_ids, params)
        self.scheduler.check_request(seq)
        return seq

    def add_request(
        self, prompt: Prompt, params: SamplingParams, request_id: str | None = None, stream_text: bool = True
    ) -> str:
        """Queue one request; it runs from the next step on. Returns its id.

        With ``stream_text`` each step's output carries the text its tokens completed.
        """
        if request_id is not None and request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running; ids must be unique")
        seq = self.make_sequence(prompt, params)
        request_id = f"req-{seq.seq_id}" if request_id is None else request_id
        self._enqueue(request_id, seq, stream_text)
        return request_id

    def _enqueue(self, request_id: str, seq: Sequence, stream_text: bool) -> Request:
        request = Request.build(request_id, seq, self.tokenizer, stream_text)
        self.requests[request_id] = request
        for sample in request.seqs:
            self._requests_by_seq[sample.seq_id] = request
        if stream_text or len(request.seqs) > 1 or any(text is not None for text in request.texts):
            self._checked_per_step.add(request_id)
        self.scheduler.add(seq)
        return request

    def _forget(self, request: Request) -> None:
        del self.requests[request.request_id]
        self._checked_per_step.discard(request.request_id)
        for seq in request.seqs:
            del self._requests_by_seq[seq.seq_id]

    def abort_request(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks now; False if no such request is unfinished."""
        request = self.requests.get(request_id)
        if request is None:
            return False
        self._forget(request)
        for seq in request.seqs[: request.num_queued]:
            self.scheduler.abort(seq)
        if not self.requests:
            self._finish_in_flight()  # left with only the aborted rows: nothing stays launched while idle
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[StreamOutput]:
        """Run one batch; one output per request that got tokens or finished in it."""
        if self._in_flight is not None:
            raise RuntimeError(
                "a step launched by step_ahead() is still running; go on with step_ahead() until no request is "
                "unfinished (or abort them) before calling step()"
            )
        return self._step()[0]

    def step_ahead(self) -> list[StreamOutput]:
        """step() with the host one step ahead of the device, where the engine may schedule ahead (one GPU,
        ``async_scheduling``; else it is step()): launch the next batch, then record the batch the previous call
        launched and return its outputs, one per request that got tokens or finished in it.

        The server's engine loop steps this way, so that each step's bookkeeping overlaps the next step's run.
        A call with no step in flight returns no outputs. Once no request is unfinished, nothing is left running.
        If it raises, the step in flight is dropped: abort the unfinished requests then (the server's loop does).
        """
        if not self._can_schedule_ahead():
            return self.step()
        return self._step_ahead(every_request=True)[2]

    def _schedule(self) -> ScheduledBatch:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            raise RuntimeError("the scheduler found nothing it could run although requests are pending")
        return batch

    def _step(self) -> tuple[list[StreamOutput], ScheduledBatch]:
        batch = self._schedule()
        sampled = self.runner.run(batch)
        rows = self.scheduler.advance(batch)  # Scheduler.postprocess, in its two halves: the rows with a sample
        finished = self.scheduler.record_samples(batch, rows, sampled)
        stopped, outputs = self._follow_landed_rows(batch, rows, every_request=True)
        self._forget_finished(finished + stopped)
        return outputs, batch

    def _step_quietly(self) -> tuple[int, ScheduledBatch]:
        """A step for generate(): (sequences finished, batch), building no per-row outputs.

        When no request has text to follow (stop strings) or siblings to queue (n > 1), only the rows
        that finished need the engine's attention: at batch 256 that saves a Python loop over every
        row of every step, host time the GPU would wait for. Otherwise it is step()'s loop.
        """
        if self._checked_per_step:
            outputs, batch = self._step()
            return sum(output.finished for output in outputs), batch
        batch = self._schedule()
        return self._forget_finished(self.scheduler.postprocess(batch, self.runner.run(batch))), batch

    def _follow_landed_rows(
        self, batch: ScheduledBatch, rows: list[int], every_request: bool = False
    ) -> tuple[list[Sequence], list[StreamOutput]]:
        """Once a step's samples are recorded: the text to follow (stop strings, streamed text) and the siblings
        to queue (n > 1) of the rows that sampled a token, for the requests with per-step work (or, with
        ``every_request``, all: step() reports every row); returns the completions a stop string ended, and
        those rows' outputs.

        Scheduling ahead, it runs before the step in flight is accounted for (Scheduler.advance), so a
        completion a stop string ends has its row in that step wasted, as one a stop token ends; siblings are
        scheduled from the step after.
        """
        stopped, outputs = [], []
        for row in rows:
            seq = batch.seqs[row]
            request = self._requests_by_seq.get(seq.seq_id)
            if request is None or not (every_request or request.request_id in self._checked_per_step):
                continue
            was_finished = seq.is_finished
            output = self._stream_output(request, seq, len(seq.token_ids) - 1)  # one new token: the row's sample
            outputs.append(output)
            for sibling in request.siblings_to_queue():
                self.scheduler.add(sibling, first=True)
            if output.finished and not was_finished:
                stopped.append(seq)
        return stopped, outputs

    def _forget_finished(self, finished_seqs: list[Sequence]) -> int:
        """Forget the requests whose completions have all finished; returns how many completions finished."""
        for seq in finished_seqs:
            request = self._requests_by_seq.get(seq.seq_id)  # None once a sibling that finished with it forgot it
            if request is not None and request.is_finished:
                self._forget(request)
        return len(finished_seqs)

    def _can_schedule_ahead(self) -> bool:
        """Whether generate(), stream() and step_ahead() may launch each step before the previous one's tokens reach
        the host.

        Not under tensor parallelism (the workers take each step's tokens from rank 0's messages).
        Penalties may: their table counts each step's samples on the device as the step is launched, and
        never rebuilds a sequence's row while its newest token is pending (engine/sampling_metadata.py).
        So may stop strings and n > 1: _follow_landed_rows() does their per-row work between steps.
        """
        return self.config.async_scheduling and self.runner.workers is None

    def _stream_output(self, request: Request, seq: Sequence, num_tokens_before: int) -> StreamOutput:
        """Detokenize the new tokens, end the completion if they complete a stop string, and report them."""
        new_token_ids = seq.token_ids[num_tokens_before:]
        finished = seq.status is SequenceStatus.FINISHED  # read once: this runs for every row of every step
        text = request.texts[seq.sample_index]
        text_delta = ""
        if text is not None:
            stop_string = text.push(new_token_ids)
            if stop_string is not None:
                self.scheduler.stop(seq, stop_string)
                finished = True
            if finished:
                text.finish()
            text_delta = text.take_delta(finished)
        logprobs = None
        if seq.params.logprobs is not None:
            logprobs = seq.output_logprobs[len(seq.output_logprobs) - len(new_token_ids) :]
        return StreamOutput(
            request.request_id,
            new_token_ids,
            text_delta,
            finished,
            seq.finish_reason,
            seq.sample_index,
            logprobs,
            seq.stop_reason,
        )

    def generate(
        self,
        prompts: SequenceLike[Prompt],
        sampling_params: SamplingParams | SequenceLike[SamplingParams],
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in input order."""
        seqs = self._make_sequences("generate", prompts, sampling_params)
        requests = [self._enqueue(f"gen-{seq.seq_id}", seq, stream_text=False) for seq in seqs]
        try:
            self._run_to_completion(sum(seq.params.n for seq in seqs), use_tqdm)
        finally:
            self.abort_all()  # after an error or interrupt, leave the engine empty and usable
        return [request.to_output(i, self.tokenizer) for i, request in enumerate(requests)]

    def stream(
        self, prompts: SequenceLike[Prompt], sampling_params: SamplingParams | SequenceLike[SamplingParams]
    ) -> Iterator[StreamOutput]:
        """Run every prompt, yielding what each step adds; a prompt's request id is its index as a string.

        Leaving the loop early (break, exception) aborts the requests still running.
        """
        seqs = self._make_sequences("stream", prompts, sampling_params)  # bad input raises here, not when iterated
        return self._stream_sequences(seqs)

    def _stream_sequences(self, seqs: list[Sequence]) -> Iterator[StreamOutput]:
        self._check_idle("stream")
        for index, seq in enumerate(seqs):
            self._enqueue(str(index), seq, stream_text=True)
        try:
            if self._can_schedule_ahead():  # each step's outputs come once the step after it is launched
                for _, _, outputs in self._steps_ahead():
                    yield from outputs
            else:
                while self.requests:
                    yield from self.step()
        finally:
            self.abort_all()

    def _make_sequences(
        self, caller: str, prompts: SequenceLike[Prompt], sampling_params: SamplingParams | SequenceLike[SamplingParams]
    ) -> list[Sequence]:
        """Check every request before queueing any; the engine must be idle."""
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(
                f"got {len(prompts)} prompts but {len(sampling_params)} SamplingParams; give one or one each"
            )
        self._check_idle(caller)
        pairs = zip(prompts, sampling_params, strict=True)
        return [self._make_indexed_sequence(i, prompt, params) for i, (prompt, params) in enumerate(pairs)]

    def _make_indexed_sequence(self, index: int, prompt: Prompt, params: SamplingParams) -> Sequence:
        try:
            return self.make_sequence(prompt, params)
        except (ValueError, TypeError) as e:
            raise type(e)(f"prompt {index}: {e}") from e

    def _check_idle(self, caller: str) -> None:
        if self.requests:
            raise RuntimeError(
                f"{caller}() needs an idle engine, but {len(self.requests)} requests added with add_request are "
                "unfinished; step() them to completion or abort them first"
            )

    def abort_all(self) -> None:
        """Drop every unfinished request and free its blocks."""
        self._in_flight = None  # its samples are never read; their buffer is released when they are collected
        self.scheduler.abort_all()
        self.requests.clear()
        self._requests_by_seq.clear()
        self._checked_per_step.clear()

    def _run_to_completion(self, num_requests: int, use_tqdm: bool) -> None:
        with tqdm(total=num_requests, desc="Generating", dynamic_ncols=True, disable=not use_tqdm) as bar:
            rates = {"prefill": 0.0, "decode": 0.0}
            steps = self._steps_ahead() if self._can_schedule_ahead() else self._steps_in_turn()
            start = time.perf_counter()
            for num_finished, batch, _ in steps:
                if not use_tqdm:
                    continue  # the rates below are the bar's alone: no host time on them per step
                now = time.perf_counter()
                rates["prefill" if batch.is_prefill else "decode"] = batch.num_tokens / (now - start)
                start = now
                bar.set_postfix({f"{k} tok/s": f"{v:,.0f}" for k, v in rates.items()}, refresh=False)
                bar.update(num_finished)

    def _steps_in_turn(self) -> Iterator[tuple[int, ScheduledBatch, list[StreamOutput]]]:
        """(sequences finished, batch, no outputs) per step, each step run to its end before the next is scheduled."""
        while self.requests:
            yield *self._step_quietly(), []

    def _steps_ahead(self) -> Iterator[tuple[int, ScheduledBatch, list[StreamOutput]]]:
        """(sequences finished, batch, the outputs of its rows whose requests stream, follow their text or queue
        siblings) per step, the host one step ahead of the device (_step_ahead())."""
        while self.requests:
            num_finished, landed, outputs = self._step_ahead(every_request=False)
            if landed is not None:
                yield num_finished, landed, outputs

    def _step_ahead(self, every_request: bool) -> tuple[int, ScheduledBatch | None, list[StreamOutput]]:
        """Launch step N+1 while step N runs, then record step N: the device does not wait for the host's
        bookkeeping between steps.

            host:    schedule N+1 | launch N+1 | wait for N, record its tokens | advance N+1 | schedule N+2
            device:  ...... step N ...........| step N+1 .........................................

        Step N+1's sequences hold a PENDING_TOKEN for the token step N samples; the device reads that
        token from step N's samples (ModelRunner.launch). A sequence that step N ends with a stop token
        has a wasted row in step N+1, skipped when it is recorded. Returns (sequences finished, batch N, the
        outputs of its rows: every row's with ``every_request``, else those whose requests have per-step work),
        or (0, None, []) when no step N was in flight.
        """
        in_flight, self._in_flight = self._in_flight, None  # dropped if this turn raises
        # With a step in flight the batch may be empty (its sequences all ended): that step is still recorded.
        batch = self._schedule() if in_flight is None else self.scheduler.schedule()
        launched = self.runner.launch(batch, in_flight[0] if in_flight else None) if batch.seqs else None
        result: tuple[int, ScheduledBatch | None, list[StreamOutput]] = (0, None, [])
        if in_flight is not None:
            landed, rows, samples = in_flight
            finished = self.scheduler.record_samples(landed, rows, samples.wait(landed.seqs))
            outputs: list[StreamOutput] = []
            if every_request or self._checked_per_step:
                stopped, outputs = self._follow_landed_rows(landed, rows, every_request)
                finished += stopped
            result = (self._forget_finished(finished), landed, outputs)
        if launched is not None:
            self._in_flight = (batch, self.scheduler.advance(batch), launched)
        if not self.requests:
            self._finish_in_flight()
        return result

    def _finish_in_flight(self) -> None:
        """With no request unfinished, the step in flight has only rows wasted on ended sequences: let the device
        finish it, and drop it."""
        if self._in_flight is not None:
            batch, _, samples = self._in_flight
            self._in_flight = None
            samples.wait(batch.seqs)
