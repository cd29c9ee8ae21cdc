"""Live traffic on one engine: asyncio code adds, streams and aborts requests while an engine loop runs them.

    asyncio handlers ──add_requests / abort──► engine loop (serving/engine_loop.py): add_request, step, ...
          ▲                                            │
          └──── RequestStream queues ◄── events ───────┘  (accepted, each step's outputs and stats, failures)

The engine loop runs in a thread of this process (``AsyncLLM(engine)``; tests can reach into the
engine) or in a process of its own (``AsyncLLM.from_engine_args(..., engine_process=True)``, ``nanovllm
serve --engine-process``; see serving/engine_process.py). Either way its events reach the event loop
through ``loop.call_soon_threadsafe``. LLMEngine is not thread-safe; only the engine loop touches it.
"""

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from nanovllm.config import EngineConfig
from nanovllm.engine.llm_engine import EngineStats, LLMEngine, Prompt, load_tokenizer
from nanovllm.lora_request import LoRARequest
from nanovllm.outputs import StreamOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.serving.engine_loop import (
    AbortRequests,
    Accepted,
    AddRequests,
    EngineThread,
    Event,
    Failed,
    Progress,
    num_kvcache_tokens,
)
from nanovllm.serving.engine_process import ENGINE_PROCESS_JOIN_TIMEOUT_S, EngineProcess
from nanovllm.serving.request_timing import FirstTokenTimes


class EngineError(RuntimeError):
    """The engine failed (or shut down) while a request was in it; the request was aborted."""


class RequestStream:
    """The outputs of requests added together (e.g. the n choices of one API call), as (index, output) pairs.

    Iterate it with ``async for index, out in stream``; it ends when every request has finished. Call
    ``abort()`` when the consumer goes away early: the unfinished requests leave the engine and free
    their KV blocks at once.
    """

    def __init__(self, owner: "AsyncLLM", request_ids: list[str]) -> None:
        self.request_ids = request_ids  # engine request ids, in index order
        self._owner = owner
        self._index_of = {request_id: idx for idx, request_id in enumerate(request_ids)}
        self._queue: asyncio.Queue[StreamOutput | BaseException] = asyncio.Queue()
        self._unfinished = set(request_ids)  # requests whose final output has not been consumed
        self.first_output_s: dict[str, float] = {}  # request id -> when its first output was put here (perf_counter)
        self._error: BaseException | None = None  # met by take_ready(); the next turn of the iteration raises it
        self.accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def put(self, item: StreamOutput | BaseException) -> None:
        if isinstance(item, StreamOutput) and item.request_id not in self.first_output_s:
            self.first_output_s[item.request_id] = time.perf_counter()
        self._queue.put_nowait(item)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> tuple[int, StreamOutput]:
        if self._error is None and not self._unfinished:
            raise StopAsyncIteration
        return self._consume(self._error or await self._queue.get())

    def take_ready(self) -> list[tuple[int, StreamOutput]]:
        """The outputs already queued, without waiting, in order. A consumer that fell behind the engine
        (several steps' outputs waiting) handles them in one turn; an error stays for ``async for`` to raise."""
        ready = []
        while self._error is None and self._unfinished and not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, BaseException):
                self._error = item
            else:
                ready.append(self._consume(item))
        return ready

    def _consume(self, item: StreamOutput | BaseException) -> tuple[int, StreamOutput]:
        if isinstance(item, BaseException):
            self._unfinished.clear()
            self._error = None
            raise item
        if item.finished:
            self._unfinished.discard(item.request_id)
        return self._index_of[item.request_id], item

    @property
    def is_finished(self) -> bool:
        return not self._unfinished

    def abort(self) -> None:
        """Drop the unfinished requests from the engine; a no-op once all have finished."""
        if self._unfinished:
            self._owner.abort(sorted(self._unfinished))
            self._unfinished.clear()


class AsyncLLM:
    """An engine serving asyncio callers from one event loop; its engine loop runs in a thread or a process."""

    def __init__(self, engine: LLMEngine) -> None:
        """Serve ``engine`` from a background thread of this process."""
        self.engine: LLMEngine | None = engine  # owned by the engine thread from now on; None with a process
        self.max_model_len = engine.max_model_len
        self.num_kvcache_tokens = num_kvcache_tokens(engine)  # the KV cache's size in tokens
        self.tokenizer: PreTrainedTokenizerBase | None = engine.tokenizer  # the app's copies tokenize its prompts
        self._runner: EngineThread | EngineProcess = EngineThread(engine, self._receive)
        self._init_front(engine.stats())

    @classmethod
    def from_engine_args(cls, model: str, engine_process: bool = False, **engine_args: Any) -> "AsyncLLM":
        """Build the engine here and serve it from a thread, or, with ``engine_process``, in a process of its own."""
        if not engine_process:
            return cls(LLMEngine(EngineConfig.from_kwargs(model, **engine_args)))
        async_llm = cls.__new__(cls)  # its engine is built in the engine process, not by __init__ here
        async_llm.engine = None
        runner = EngineProcess(model, engine_args, async_llm._receive)
        async_llm.max_model_len = runner.max_model_len
        async_llm.num_kvcache_tokens = runner.num_kvcache_tokens
        async_llm.tokenizer = None if engine_args.get("skip_tokenizer_init") else load_tokenizer(model)
        async_llm._runner = runner
        async_llm._init_front(runner.first_stats)
        return async_llm

    def _init_front(self, stats: EngineStats) -> None:
        self.num_aborted_requests = 0  # requests aborted before finishing (client gone, error), cumulative
        self._streams: dict[str, RequestStream] = {}  # request id -> its stream, until it finishes
        self._accepting: dict[str, RequestStream] = {}  # AddRequests key -> its stream, until the engine answers
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stats = stats  # as of the engine loop's last turn
        # Called for each request that got its first token, with its times in the engine loop and when the event
        # loop had them (time.perf_counter()): the server's stage histograms (serving/metrics.py).
        self.first_token_observers: list[Callable[[FirstTokenTimes, float], None]] = []

    @property
    def is_running(self) -> bool:
        return self._runner.is_alive()

    def stats(self) -> EngineStats:
        """The engine's counters as of its last step (read them from the event loop's thread)."""
        return self._stats

    async def add_requests(
        self,
        prompts: Sequence[Prompt],
        params: Sequence[SamplingParams],
        lora_requests: Sequence[LoRARequest | None] | None = None,  # one per request; None = the base model
    ) -> RequestStream:
        """Queue requests to run together; returns once the engine accepted all of them.

        Raises the engine's ValueError/TypeError (nothing queued) when one is invalid, and EngineError
        when the engine is not running.
        """
        if len(prompts) != len(params):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} SamplingParams; give one each")
        self._bind_loop()
        if not self.is_running:
            raise EngineError("the engine is not running; restart the server")
        key = uuid.uuid4().hex
        stream = RequestStream(self, [f"{key}-{idx}" for idx in range(len(prompts))])
        for request_id in stream.request_ids:
            self._streams[request_id] = stream
        self._accepting[key] = stream
        try:
            loras = None if lora_requests is None else list(lora_requests)
            command = AddRequests(key, stream.request_ids, list(prompts), list(params), time.perf_counter(), loras)
            self._runner.send(command)
            await stream.accepted
        except (ValueError, TypeError):
            self._forget(stream.request_ids)
            raise
        except OSError as e:  # the engine process is gone (a broken pipe)
            self._forget(stream.request_ids)
            raise EngineError("the engine is not running; restart the server") from e
        except BaseException:  # cancelled while waiting: the requests may be in the engine already
            stream.abort()
            raise
        finally:
            self._accepting.pop(key, None)
        return stream

    def abort(self, request_ids: list[str]) -> None:
        """Drop requests from the engine (their blocks are freed by the engine loop's next turn)."""
        self._forget(request_ids)
        with contextlib.suppress(OSError):  # an engine process that is gone holds no blocks
            self._runner.send(AbortRequests(request_ids))

    def shutdown(self, timeout_s: float = ENGINE_PROCESS_JOIN_TIMEOUT_S) -> None:
        """Fail the requests still running, stop the engine loop and wait for it."""
        self._runner.stop(timeout_s)

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("AsyncLLM serves one event loop; it was first used from another one")

    def _forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._streams.pop(request_id, None)

    def _receive(self, event: Event) -> None:
        """Called by the engine thread or the engine process's reader thread: pass ``event`` to the event loop."""
        if self._loop is None:
            return  # nothing was ever added, so nobody waits for it
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is left to tell
            self._loop.call_soon_threadsafe(self._handle, event)

    # ---- event-loop side ----

    def _handle(self, event: Event) -> None:
        if isinstance(event, Progress):
            returned_s = time.perf_counter()
            self._accept(event.accepted)
            self._stats = event.stats
            self.num_aborted_requests = event.num_aborted_requests
            for times in event.first_tokens:
                for observe in self.first_token_observers:
                    observe(times, returned_s)
            self._deliver(event.outputs)
        else:
            self._fail(event)

    def _accept(self, accepted: list[Accepted]) -> None:
        for answer in accepted:
            stream = self._accepting.get(answer.key)
            if stream is not None and not stream.accepted.done():  # else its caller was cancelled and aborted it
                if answer.error is None:
                    stream.accepted.set_result(None)
                else:
                    stream.accepted.set_exception(answer.error)

    def _fail(self, failed: Failed) -> None:
        error = EngineError(failed.message)
        if failed.request_ids is None:  # the engine is gone: requests it has not answered never will be
            for accepting in self._accepting.values():
                if not accepting.accepted.done():
                    accepting.accepted.set_exception(error)
        request_ids = list(self._streams) if failed.request_ids is None else failed.request_ids
        for request_id in request_ids:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream.put(error)

    def _deliver(self, outputs: list[StreamOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted by its consumer while this step ran
            if out.finished:
                del self._streams[out.request_id]
            stream.put(out)
