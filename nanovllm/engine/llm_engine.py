"""The engine loop: tokenize requests, schedule a batch, run the model, record the tokens, repeat.

Each call of :meth:`LLMEngine.step` is one turn of that loop. Where the engine schedules ahead (one
GPU, ``async_scheduling``) a turn launches the next step before it records the one before, so the
device never waits for the host's bookkeeping between steps:

    host:    schedule N+1 | launch N+1 | wait for N, record its tokens | account for N+1 | schedule N+2
    device:  ...... step N ...........| step N+1 ............................................

Otherwise a turn runs one step to its end. generate(), stream() and the server's loop all step this way.
"""

import time
from collections.abc import Iterator
from dataclasses import dataclass

from tqdm.auto import tqdm

from nanovllm.config import EngineConfig
from nanovllm.engine.lora_requests import LoRARequests, check_lora_request, lora_requests_per_prompt
from nanovllm.engine.model_files import effective_max_model_len, load_tokenizer, read_eos_token_ids
from nanovllm.engine.prompts import Prompt, PromptsArg, SamplingParamsArg, as_params_list, as_prompt_list
from nanovllm.engine.request import Request
from nanovllm.lora_request import LoRARequest
from nanovllm.models.arch import check_tensor_parallel_split
from nanovllm.models.quant_config import choose_quantization
from nanovllm.models.registry import load_model_arch
from nanovllm.outputs import PrefixCacheStats, RequestOutput, StreamOutput
from nanovllm.parallel.executor import StepExecutor, start_workers
from nanovllm.parallel.process_group import require_no_tensor_parallel_engine
from nanovllm.runner.host_samples import HostSamples
from nanovllm.runner.model_runner import ModelRunner, rank_device
from nanovllm.sampling.metadata import check_params_for_vocab
from nanovllm.sampling_params import SamplingParams
from nanovllm.scheduler.batch import ScheduledBatch
from nanovllm.scheduler.block_manager import BlockManager
from nanovllm.scheduler.mixed import build_scheduler
from nanovllm.scheduler.scheduler import SchedulerLimits
from nanovllm.scheduler.sequence import Sequence


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, for logs and metrics."""

    num_running: int  # requests prefilled and decoding
    num_waiting: int  # requests queued for prefill (new, mid-chunk or preempted)
    kv_cache_usage: float  # share of KV-cache blocks held by unfinished requests, 0..1
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache so far
    prefix_cache_hits: int  # of those, tokens found cached
    kv_cache_capacity_tokens: int  # tokens the KV cache holds (blocks x block size); FP8 holds 2x bfloat16's


@dataclass(frozen=True)
class StepInFlight:
    """A step launched on the device whose samples the host has not recorded yet."""

    batch: ScheduledBatch  # what the step computes
    sampled_rows: list[int]  # its rows whose sample is a real token (Scheduler.advance); their sequences wait for it
    samples: HostSamples  # the samples, on their way to the host


@dataclass(frozen=True)
class RecordedStep:
    """What one turn of the engine recorded."""

    batch: ScheduledBatch | None  # the step whose samples were recorded; None when no step had been launched
    outputs: list[StreamOutput]  # one per row of a request that reports its steps (see LLMEngine._enqueue)
    num_finished: int  # completions the step finished


NOTHING_RECORDED = RecordedStep(None, [], 0)


def check_one_replica(config: EngineConfig) -> None:
    """An engine driven on its own runs one replica of the model, its ranks started by itself."""
    if config.data_parallel_size > 1 or config.distributed_executor_backend == "external_launcher":
        raise ValueError(
            f"data_parallel_size={config.data_parallel_size} with distributed_executor_backend="
            f"{config.distributed_executor_backend!r} runs through LLM(...).generate() only; this engine (the "
            "server's, or one built directly) runs one replica: use data_parallel_size=1 with 'mp' or 'ray'"
        )


class LLMEngine:
    """One replica's engine, driven from this process (its rank 0).

    ``workers`` are the job's other ranks when someone else started them (engine/launched.py, under
    torchrun); otherwise the engine starts its tensor-parallel workers as the config's backend says.
    """

    def __init__(self, config: EngineConfig, workers: StepExecutor | None = None) -> None:
        self.config = config
        if workers is None:
            check_one_replica(config)
            require_no_tensor_parallel_engine()
        self.arch = load_model_arch(config.model)
        self.max_model_len = effective_max_model_len(config, self.arch)
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(config.model)
        eos_ids = read_eos_token_ids(config.model, self.arch, self.tokenizer)
        check_tensor_parallel_split(config.tensor_parallel_size, self.arch)
        choose_quantization(self.arch.quantization, config.quantization)  # refused here, before any device memory
        self.workers = workers  # the other ranks that take part in each step; None: this process alone
        if workers is None and config.tensor_parallel_size > 1:  # started first: all build their runners in lockstep
            self.workers = start_workers(config, self.arch, self.max_model_len)
        device = rank_device(config, 0) if self.workers is None else self.workers.device
        try:
            self.runner = ModelRunner(config, self.arch, self.max_model_len, eos_ids, device=device)
        except BaseException:
            if self.workers is not None:
                self.workers.close()
            raise
        block_manager = BlockManager(
            self.runner.num_kvcache_blocks, config.kvcache_block_size, config.enable_prefix_caching
        )
        max_loras = config.max_loras if config.enable_lora else None  # distinct adapters among running requests
        limits = SchedulerLimits(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len, max_loras)
        self.scheduler = build_scheduler(block_manager, limits, eos_ids, config.max_num_prefill_tokens)
        # Launch each step before recording the one before. Not under tensor parallelism: the workers take each
        # step's input tokens from rank 0's messages, so rank 0 must have them.
        self.schedules_ahead = config.async_scheduling and (self.workers is None or self.workers.can_schedule_ahead)
        self.requests: dict[str, Request] = {}  # unfinished requests by id
        self._requests_by_seq: dict[int, Request] = {}  # the same requests by Sequence.seq_id
        # Ids of requests with work after each of their steps: outputs to report, text to follow, siblings to queue.
        self._followed: set[str] = set()
        self._in_flight: StepInFlight | None = None  # launched by the last turn, recorded by the next

    def close(self) -> None:
        """Free the decode graphs and stop the tensor-parallel workers, if any. Closing twice is harmless."""
        self.runner.close(peers_alive=self.workers is None or not self.workers.has_failed)
        if self.workers is not None:
            self.workers.close()

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
            kv_cache_capacity_tokens=block_manager.num_blocks * block_manager.block_size,
        )

    # ---- requests in ----

    def make_sequence(
        self, prompt: Prompt, params: SamplingParams, lora_request: LoRARequest | None = None
    ) -> Sequence:
        """Tokenize and check one request (its LoRA adapter read and checked too); raises before anything is queued."""
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
        check_lora_request(self.runner.lora, lora_request)
        seq = Sequence(token_ids, params, lora_request=lora_request)
        self.scheduler.check_request(seq)
        return seq

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams,
        request_id: str | None = None,
        stream_text: bool = True,
        lora_request: LoRARequest | None = None,
    ) -> str:
        """Queue one request; it runs from the next step on, and step() reports each of its steps. Returns its id.

        With ``stream_text`` each step's output carries the text its tokens completed; with ``lora_request`` it
        runs with that LoRA adapter (None: the base model).
        """
        if request_id is not None and request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running; ids must be unique")
        seq = self.make_sequence(prompt, params, lora_request)
        request_id = f"req-{seq.seq_id}" if request_id is None else request_id
        self._enqueue(request_id, seq, stream_text, reports_steps=True)
        return request_id

    def _enqueue(self, request_id: str, seq: Sequence, stream_text: bool, reports_steps: bool) -> Request:
        """Queue a checked request. One that ``reports_steps`` gets an output for each of its rows of each step;
        the others only run to their end (generate()), followed only where they need text or queue siblings."""
        request = Request.build(request_id, seq, self.tokenizer, stream_text)
        self.requests[request_id] = request
        for sample in request.seqs:
            self._requests_by_seq[sample.seq_id] = request
        if reports_steps or len(request.seqs) > 1 or any(text is not None for text in request.texts):
            self._followed.add(request_id)
        self.scheduler.add(seq)
        return request

    def abort_request(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks now; False if no such request is unfinished."""
        request = self.requests.get(request_id)
        if request is None:
            return False
        self._forget(request)
        for seq in request.seqs[: request.num_queued]:
            self.scheduler.abort(seq)
        if not self.requests:
            self._drain()  # left with only the aborted rows: nothing stays launched while idle
        return True

    def abort_all(self) -> None:
        """Drop every unfinished request and free its blocks."""
        self._in_flight = None  # its samples are never read
        self.scheduler.abort_all()
        self.requests.clear()
        self._requests_by_seq.clear()
        self._followed.clear()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def has_launched(self, request_id: str) -> bool:
        """False while the request waits for its first step to be launched; True once one was (or it has left)."""
        request = self.requests.get(request_id)
        return request is None or request.seqs[0].num_computed_tokens > 0

    def _forget(self, request: Request) -> None:
        del self.requests[request.request_id]
        self._followed.discard(request.request_id)
        for seq in request.seqs:
            del self._requests_by_seq[seq.seq_id]

    # ---- the loop ----

    def step(self) -> list[StreamOutput]:
        """One turn of the engine: one output per row of an added request that got a token or finished.

        Scheduling ahead, a turn launches the next step and reports the one the turn before launched: outputs
        come one call late, and the first call of a run returns none. Once no request is unfinished, nothing
        is left running. If it raises, the step in flight is dropped: abort the unfinished requests then (the
        server's loop does).
        """
        return self._step().outputs

    def _step(self) -> RecordedStep:
        """Launch the next step, record the step before it; stepping in turn, record the new one at once."""
        landed, self._in_flight = self._in_flight, None  # dropped if this turn raises
        launched = self._launch_next(landed)
        recorded = self._record(landed)
        if launched is not None:
            self._in_flight = StepInFlight(launched[0], self.scheduler.advance(launched[0]), launched[1])
        if not self.schedules_ahead:
            recorded, self._in_flight = self._record(self._in_flight), None
        if not self.requests:
            self._drain()
        return recorded

    def _launch_next(self, in_flight: StepInFlight | None) -> tuple[ScheduledBatch, HostSamples] | None:
        """Schedule the next step and start it on the device; None when there is nothing to run."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            # With a step in flight the batch may be empty (its sequences all ended): that step is still recorded.
            if in_flight is None and self.requests:
                raise RuntimeError("the scheduler found nothing it could run although requests are pending")
            return None
        in_flight_batch = None if in_flight is None else in_flight.batch
        if self.workers is not None:  # the other ranks take part: they run the step too, or watch for deaths
            return batch, self.workers.launch(self.runner, batch, in_flight_batch)
        return batch, self.runner.launch(batch, in_flight_batch)

    def _record(self, step: StepInFlight | None) -> RecordedStep:
        """Wait for a step's samples, record them, then do the per-row work of the requests followed."""
        if step is None:
            return NOTHING_RECORDED
        batch = step.batch
        finished = self.scheduler.record_samples(batch, step.sampled_rows, step.samples.wait(batch.seqs))
        outputs: list[StreamOutput] = []
        if self._followed:
            stopped, outputs = self._follow(batch, step.sampled_rows)
            finished += stopped
        return RecordedStep(batch, outputs, self._forget_finished(finished))

    def _drain(self) -> None:
        """With no request unfinished, the step in flight holds only rows wasted on ended sequences: let the
        device finish it, and drop it."""
        if self._in_flight is not None:
            self._in_flight.samples.wait(self._in_flight.batch.seqs)
            self._in_flight = None

    def _follow(self, batch: ScheduledBatch, rows: list[int]) -> tuple[list[Sequence], list[StreamOutput]]:
        """Once a step's samples are recorded, for the followed requests' rows that sampled a token: the text to
        follow (stop strings, streamed text), the siblings to queue (n > 1) and the outputs; returns the
        completions a stop string ended, and those outputs.

        Scheduling ahead, this runs before the step in flight is accounted for (Scheduler.advance), so a
        completion a stop string ends has its row in that step wasted, as one a stop token ends; siblings are
        scheduled from the step after.
        """
        stopped, outputs = [], []
        for row in rows:
            seq = batch.seqs[row]
            request = self._requests_by_seq.get(seq.seq_id)
            if request is None or request.request_id not in self._followed:
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

    def _stream_output(self, request: Request, seq: Sequence, num_tokens_before: int) -> StreamOutput:
        """Detokenize the new tokens, end the completion if they complete a stop string, and report them."""
        new_token_ids = seq.token_ids[num_tokens_before:]
        finished = seq.is_finished
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

    # ---- whole runs: generate() and stream() ----

    def generate(
        self,
        prompts: PromptsArg,
        sampling_params: SamplingParamsArg = None,
        use_tqdm: bool = True,
        lora_request: LoRARequests = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in input order (a bare str or token-id list is one prompt)."""
        seqs = self._make_sequences("generate", prompts, sampling_params, lora_request)
        requests = [self._enqueue(f"gen-{seq.seq_id}", seq, False, reports_steps=False) for seq in seqs]
        try:
            self._run_to_completion(sum(seq.params.n for seq in seqs), use_tqdm)
        finally:
            self.abort_all()  # after an error or interrupt, leave the engine empty and usable
        return [request.to_output(i, self.tokenizer) for i, request in enumerate(requests)]

    def stream(
        self, prompts: PromptsArg, sampling_params: SamplingParamsArg = None, lora_request: LoRARequests = None
    ) -> Iterator[StreamOutput]:
        """Run every prompt, yielding what each step adds; a prompt's request id is its index as a string.

        Leaving the loop early (break, exception) aborts the requests still running.
        """
        seqs = self._make_sequences("stream", prompts, sampling_params, lora_request)  # bad input raises here
        return self._stream_sequences(seqs)

    def _stream_sequences(self, seqs: list[Sequence]) -> Iterator[StreamOutput]:
        self._check_idle("stream")
        for index, seq in enumerate(seqs):
            self._enqueue(str(index), seq, stream_text=True, reports_steps=True)
        try:
            while self.requests:
                yield from self._step().outputs
        finally:
            self.abort_all()

    def _make_sequences(
        self, caller: str, prompts: PromptsArg, sampling_params: SamplingParamsArg, lora_request: LoRARequests
    ) -> list[Sequence]:
        """Check every request before queueing any; the engine must be idle."""
        prompt_list = as_prompt_list(prompts)
        params_list = as_params_list(sampling_params, len(prompt_list))
        lora_requests = lora_requests_per_prompt(lora_request, len(prompt_list))
        self._check_idle(caller)
        requests = zip(prompt_list, params_list, lora_requests, strict=True)
        return [self._make_indexed_sequence(i, *request) for i, request in enumerate(requests)]

    def _make_indexed_sequence(
        self, index: int, prompt: Prompt, params: SamplingParams, lora_request: LoRARequest | None
    ) -> Sequence:
        try:
            return self.make_sequence(prompt, params, lora_request)
        except (ValueError, TypeError) as e:
            raise type(e)(f"prompt {index}: {e}") from e

    def _check_idle(self, caller: str) -> None:
        if self.requests:
            raise RuntimeError(
                f"{caller}() needs an idle engine, but {len(self.requests)} requests added with add_request are "
                "unfinished; step() them to completion or abort them first"
            )

    def _run_to_completion(self, num_requests: int, use_tqdm: bool) -> None:
        with tqdm(total=num_requests, desc="Generating", dynamic_ncols=True, disable=not use_tqdm) as bar:
            rates = {"prefill": 0.0, "decode": 0.0}
            start = time.perf_counter()
            while self.requests:
                recorded = self._step()
                if not use_tqdm or recorded.batch is None:
                    continue  # the rates below are the bar's alone: no host time on them per step
                now = time.perf_counter()
                rates["prefill" if recorded.batch.is_prefill else "decode"] = recorded.batch.num_tokens / (now - start)
                start = now
                bar.set_postfix({f"{k} tok/s": f"{v:,.0f}" for k, v in rates.items()}, refresh=False)
                bar.update(recorded.num_finished)
