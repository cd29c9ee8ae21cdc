"""Live traffic on one engine: a background thread owns the LLMEngine; asyncio code adds, streams and aborts.

    asyncio handlers ──add / abort──► inbox (queue.Queue) ──► engine thread: add_request, abort_request, step
          ▲                                                            │
          └── RequestStream queues ◄── loop.call_soon_threadsafe ──────┘  (one call per step with all its outputs)

The engine thread steps while any request is unfinished and blocks on the inbox when idle, so a
request that arrives mid-run joins the next step's batch (continuous batching of live traffic).
LLMEngine is not thread-safe; only the engine thread touches it after construction.
"""

import asyncio
import contextlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from nanovllm.config import EngineConfig
from nanovllm.engine.llm_engine import EngineStats, LLMEngine, Prompt
from nanovllm.outputs import StreamOutput
from nanovllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine failed (or shut down) while a request was in it; the request was aborted."""


@dataclass(frozen=True)
class _Add:
    stream: "RequestStream"  # where the requests' outputs go
    prompts: list[Prompt]  # one per request, aligned with stream.request_ids
    params: list[SamplingParams]  # one per request
    submitted_s: float  # time.perf_counter() when the event loop queued the command


@dataclass(frozen=True)
class _Abort:
    request_ids: list[str]  # requests to drop; unknown or finished ones are ignored


class _Stop:
    """Tells the engine thread to fail what is left and exit."""


_Command = _Add | _Abort | _Stop


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
        self._error: BaseException | None = None  # met by take_ready(); the next turn of the iteration raises it
        self.accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def put(self, item: StreamOutput | BaseException) -> None:
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
    """An LLMEngine serving asyncio callers from one event loop, stepped by its own thread."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine  # owned by the engine thread from now on; read only its constant fields
        self.max_model_len = engine.max_model_len
        self.num_aborted_requests = 0  # requests aborted before finishing (client gone, error), cumulative
        self._inbox: queue.Queue[_Command] = queue.Queue()
        self._streams: dict[str, RequestStream] = {}  # event-loop side: request id -> its stream
        self._live_ids: set[str] = set()  # engine-thread side: requests added and not yet finished
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stats = engine.stats()  # snapshot published by the engine thread after each step
        # Called from the engine thread with the seconds from add_requests() to a request's first token, as
        # the engine thread sees it; the server's histogram of it, set against its own time to first token,
        # tells the engine's share of that latency from the event loop's.
        self.first_token_observers: list[Callable[[float], None]] = []
        self._submitted_s: dict[str, float] = {}  # engine-thread side: requests with no token yet -> submit time
        self._thread = threading.Thread(target=self._run, name="nanovllm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, model: str, **engine_args: Any) -> "AsyncLLM":
        return cls(LLMEngine(EngineConfig.from_kwargs(model, **engine_args)))

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    def stats(self) -> EngineStats:
        """The engine's counters as of its last step (safe to call from any thread)."""
        return self._stats

    async def add_requests(self, prompts: Sequence[Prompt], params: Sequence[SamplingParams]) -> RequestStream:
        """Queue requests to run together; returns once the engine accepted all of them.

        Raises the engine's ValueError/TypeError (nothing queued) when one is invalid, and EngineError
        when the engine thread is not running.
        """
        if len(prompts) != len(params):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} SamplingParams; give one each")
        self._bind_loop()
        if not self.is_running:
            raise EngineError("the engine thread is not running; restart the server")
        prefix = uuid.uuid4().hex
        stream = RequestStream(self, [f"{prefix}-{idx}" for idx in range(len(prompts))])
        for request_id in stream.request_ids:
            self._streams[request_id] = stream
        self._inbox.put(_Add(stream, list(prompts), list(params), time.perf_counter()))
        try:
            await stream.accepted
        except (ValueError, TypeError):
            self._forget(stream.request_ids)
            raise
        except BaseException:  # cancelled while waiting: the requests may be in the engine already
            stream.abort()
            raise
        return stream

    def abort(self, request_ids: list[str]) -> None:
        """Drop requests from the engine (their blocks are freed by the engine thread's next turn)."""
        self._forget(request_ids)
        self._inbox.put(_Abort(request_ids))

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Fail the requests still running, stop the engine thread and wait for it."""
        self._inbox.put(_Stop())
        self._thread.join(timeout_s)

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("AsyncLLM serves one event loop; it was first used from another one")

    def _forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._streams.pop(request_id, None)

    # ---- event-loop side: called through loop.call_soon_threadsafe by the engine thread ----

    def _deliver(self, outputs: list[StreamOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted by its consumer while this step ran
            if out.finished:
                del self._streams[out.request_id]
            stream.put(out)

    def _fail(self, request_ids: list[str], error: EngineError) -> None:
        for request_id in request_ids:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream.put(error)

    @staticmethod
    def _settle(stream: RequestStream, error: BaseException | None) -> None:
        if stream.accepted.done():
            return  # its caller was cancelled and has aborted the requests already
        if error is None:
            stream.accepted.set_result(None)
        else:
            stream.accepted.set_exception(error)

    # ---- engine-thread side ----

    def _call_in_loop(self, callback: Callable[..., None], *args: Any) -> None:
        if self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is left to tell
            self._loop.call_soon_threadsafe(callback, *args)

    def _run(self) -> None:
        try:
            while True:
                block = not self.engine.has_unfinished_requests()
                for command in self._take_commands(block):
                    if isinstance(command, _Stop):
                        self._abort_live(EngineError("the server is shutting down; the request was aborted"))
                        return
                    self._apply(command)
                if self.engine.has_unfinished_requests():
                    self._step()
                self._stats = self.engine.stats()
        except Exception as e:  # a bug in this loop: fail every caller loudly rather than hang them
            logger.exception("the engine thread crashed")
            self._call_in_loop(self._fail, list(self._live_ids), EngineError(f"the engine thread crashed: {e!r}"))

    def _take_commands(self, block: bool) -> list[_Command]:
        """Everything in the inbox; waits for the first command when `block` (the engine is idle)."""
        commands: list[_Command] = []
        if block:
            commands.append(self._inbox.get())
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            for request_id in command.request_ids:
                if self.engine.abort_request(request_id):
                    self.num_aborted_requests += 1
                self._live_ids.discard(request_id)
                self._submitted_s.pop(request_id, None)
            return
        added: list[str] = []
        try:
            for request_id, prompt, params in zip(
                command.stream.request_ids, command.prompts, command.params, strict=True
            ):
                self.engine.add_request(prompt, params, request_id)
                added.append(request_id)
        except Exception as e:  # invalid input: take back the ones already queued, tell the caller why
            for request_id in added:
                self.engine.abort_request(request_id)
            self._call_in_loop(self._settle, command.stream, e)
            return
        self._live_ids.update(added)
        self._submitted_s.update(dict.fromkeys(added, command.submitted_s))
        self._call_in_loop(self._settle, command.stream, None)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            logger.exception("an engine step failed; aborting its requests")
            self._abort_live(EngineError(f"the engine step failed ({type(e).__name__}: {e}); the request was aborted"))
            return
        now_s = time.perf_counter()
        for out in outputs:
            submitted_s = self._submitted_s.pop(out.request_id, None) if out.new_token_ids or out.finished else None
            if submitted_s is not None:
                for observe in self.first_token_observers:
                    observe(now_s - submitted_s)
            if out.finished:
                self._live_ids.discard(out.request_id)
        self._call_in_loop(self._deliver, outputs)

    def _abort_live(self, error: EngineError) -> None:
        request_ids = list(self._live_ids)
        for request_id in request_ids:
            if self.engine.abort_request(request_id):
                self.num_aborted_requests += 1
        self._live_ids.clear()
        self._submitted_s.clear()
        self._call_in_loop(self._fail, request_ids, error)
