"""Live traffic on one engine: asyncio code adds, streams and aborts requests; an engine loop runs them.

    asyncio handlers ──commands: add, abort──► engine loop: add_request, abort_request, step
          ▲                                           │
          └── RequestStream queues ◄── events ────────┘  (accepted, each step's outputs and stats, failures)

The engine loop steps while any request is unfinished and blocks for commands when idle, so a request
that arrives mid-run joins the next step's batch (continuous batching of live traffic). It runs in one
of two places:

- a thread of this process (``AsyncLLM(engine)``): commands go through a queue.Queue and events come
  back through ``loop.call_soon_threadsafe``. Simple, and tests can reach into the engine.
- its own process (``AsyncLLM.from_engine_args(..., engine_process=True)``, ``nanovllm serve
  --engine-process``): commands and events are pickled through pipes, and a reader thread hands events
  to the event loop. The engine then holds a GIL of its own: under many streams the event loop is busy
  writing chunks, and in one process every step of the engine would wait for the GIL behind that work.

LLMEngine is not thread-safe; only the engine loop touches it after construction.
"""

import asyncio
import atexit
import contextlib
import logging
import multiprocessing as mp
import pickle
import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from transformers import PreTrainedTokenizerBase

from nanovllm.config import EngineConfig
from nanovllm.engine.llm_engine import EngineStats, LLMEngine, Prompt, load_tokenizer
from nanovllm.outputs import StreamOutput
from nanovllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
ENGINE_PROCESS_JOIN_TIMEOUT_S = 30.0  # after this, a shutdown kills the engine process


class EngineError(RuntimeError):
    """The engine failed (or shut down) while a request was in it; the request was aborted."""


# ---- commands: event loop -> engine loop ----


@dataclass(frozen=True)
class _Add:
    key: str  # the RequestStream's key, which its accepted event names
    request_ids: list[str]  # one per request
    prompts: list[Prompt]  # one per request
    params: list[SamplingParams]  # one per request
    submitted_s: float  # time.perf_counter() when the event loop sent the command (one clock for all processes)


@dataclass(frozen=True)
class _Abort:
    request_ids: list[str]  # requests to drop; unknown or finished ones are ignored


@dataclass(frozen=True)
class _Stop:
    """Tells the engine loop to fail what is left and exit."""


_Command = _Add | _Abort | _Stop


# ---- events: engine loop -> event loop ----


@dataclass(frozen=True)
class _Accepted:
    key: str  # the _Add's key
    error: Exception | None  # what add_request raised (ValueError, TypeError for bad input); then none was queued


@dataclass(frozen=True)
class _Progress:
    """One turn of the engine loop: a step's outputs (none when it only took commands) and the state after it."""

    outputs: list[StreamOutput]
    first_token_s: list[float]  # for each request that got its first token: seconds since its _Add was sent
    stats: EngineStats
    num_aborted_requests: int  # cumulative


@dataclass(frozen=True)
class _Failed:
    request_ids: list[str] | None  # None: every request still streaming
    message: str  # the EngineError each of them gets


_Event = _Accepted | _Progress | _Failed


@dataclass(frozen=True)
class _Ready:
    """The engine process built its engine (the first message it sends)."""

    max_model_len: int
    stats: EngineStats


@dataclass(frozen=True)
class _StartFailed:
    error: Exception  # what building the engine raised


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
    """An engine serving asyncio callers from one event loop; its engine loop runs in a thread or a process."""

    def __init__(self, engine: LLMEngine) -> None:
        """Serve ``engine`` from a background thread of this process."""
        self.engine: LLMEngine | None = engine  # owned by the engine thread from now on; None with a process
        self.max_model_len = engine.max_model_len
        self.tokenizer: PreTrainedTokenizerBase | None = engine.tokenizer  # the event loop's own copy is the app's
        self._runner: _EngineThread | _EngineProcess = _EngineThread(engine, self._receive)
        self._init_front(engine.stats())

    @classmethod
    def from_engine_args(cls, model: str, engine_process: bool = False, **engine_args: Any) -> "AsyncLLM":
        """Build the engine here and serve it from a thread, or, with ``engine_process``, in a process of its own."""
        if not engine_process:
            return cls(LLMEngine(EngineConfig.from_kwargs(model, **engine_args)))
        async_llm = cls.__new__(cls)  # its engine is built in the engine process, not by __init__ here
        async_llm.engine = None
        runner = _EngineProcess(model, engine_args, async_llm._receive)
        async_llm.max_model_len = runner.max_model_len
        async_llm.tokenizer = None if engine_args.get("skip_tokenizer_init") else load_tokenizer(model)
        async_llm._runner = runner
        async_llm._init_front(runner.first_stats)
        return async_llm

    def _init_front(self, stats: EngineStats) -> None:
        self.num_aborted_requests = 0  # requests aborted before finishing (client gone, error), cumulative
        self._streams: dict[str, RequestStream] = {}  # request id -> its stream, until it finishes
        self._accepting: dict[str, RequestStream] = {}  # _Add key -> its stream, until the engine answers
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stats = stats  # as of the engine loop's last turn
        # Called with the seconds from add_requests() to a request's first token, as the engine loop sees it;
        # the server's histogram of it, set against its own time to first token, tells the engine's share of
        # that latency from the event loop's.
        self.first_token_observers: list[Callable[[float], None]] = []

    @property
    def is_running(self) -> bool:
        return self._runner.is_alive()

    def stats(self) -> EngineStats:
        """The engine's counters as of its last step (read them from the event loop's thread)."""
        return self._stats

    async def add_requests(self, prompts: Sequence[Prompt], params: Sequence[SamplingParams]) -> RequestStream:
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
            self._runner.send(_Add(key, stream.request_ids, list(prompts), list(params), time.perf_counter()))
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
            self._runner.send(_Abort(request_ids))

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

    def _receive(self, event: _Event) -> None:
        """Called by the engine thread or the engine process's reader thread: pass ``event`` to the event loop."""
        if self._loop is None:
            return  # nothing was ever added, so nobody waits for it
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is left to tell
            self._loop.call_soon_threadsafe(self._handle, event)

    # ---- event-loop side ----

    def _handle(self, event: _Event) -> None:
        if isinstance(event, _Progress):
            self._stats = event.stats
            self.num_aborted_requests = event.num_aborted_requests
            for seconds in event.first_token_s:
                for observe in self.first_token_observers:
                    observe(seconds)
            self._deliver(event.outputs)
        elif isinstance(event, _Accepted):
            stream = self._accepting.get(event.key)
            if stream is not None and not stream.accepted.done():  # else its caller was cancelled and aborted it
                if event.error is None:
                    stream.accepted.set_result(None)
                else:
                    stream.accepted.set_exception(event.error)
        else:
            error = EngineError(event.message)
            if event.request_ids is None:  # the engine is gone: requests it has not answered never will be
                for stream in self._accepting.values():
                    if not stream.accepted.done():
                        stream.accepted.set_exception(error)
            request_ids = list(self._streams) if event.request_ids is None else event.request_ids
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


class _EngineLoop:
    """The engine's side, in its thread or process: apply commands, step, report each turn as events."""

    def __init__(self, engine: LLMEngine, emit: Callable[[_Event], None]) -> None:
        self.engine = engine
        self.emit = emit
        self.num_aborted_requests = 0
        self._live_ids: set[str] = set()  # requests added and not yet finished
        self._submitted_s: dict[str, float] = {}  # requests with no token yet -> when their _Add was sent

    def run(self, take_commands: Callable[[bool], list[_Command]]) -> None:
        """Until a _Stop: take the commands waiting (wait for one when idle), apply them, step, report."""
        try:
            while True:
                for command in take_commands(not self.engine.has_unfinished_requests()):
                    if isinstance(command, _Stop):
                        self._abort_live("the server is shutting down; the request was aborted")
                        return
                    self._apply(command)
                outputs, first_token_s = self._step() if self.engine.has_unfinished_requests() else ([], [])
                self.emit(_Progress(outputs, first_token_s, self.engine.stats(), self.num_aborted_requests))
        except Exception as e:  # a bug in this loop: fail every caller loudly rather than hang them
            logger.exception("the engine loop crashed")
            self.emit(_Failed(None, f"the engine loop crashed: {e!r}"))

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
            for request_id, prompt, params in zip(command.request_ids, command.prompts, command.params, strict=True):
                self.engine.add_request(prompt, params, request_id)
                added.append(request_id)
        except Exception as e:  # invalid input (or a tokenizer's failure): take back those queued, tell the caller
            for request_id in added:
                self.engine.abort_request(request_id)
            self.emit(_Accepted(command.key, _picklable(e)))
            return
        self._live_ids.update(added)
        self._submitted_s.update(dict.fromkeys(added, command.submitted_s))
        self.emit(_Accepted(command.key, None))

    def _step(self) -> tuple[list[StreamOutput], list[float]]:
        try:
            outputs = self.engine.step()
        except Exception as e:
            logger.exception("an engine step failed; aborting its requests")
            self._abort_live(f"the engine step failed ({type(e).__name__}: {e}); the request was aborted")
            return [], []
        now_s = time.perf_counter()
        first_token_s = []
        for out in outputs:
            submitted_s = self._submitted_s.pop(out.request_id, None) if out.new_token_ids or out.finished else None
            if submitted_s is not None:
                first_token_s.append(now_s - submitted_s)
            if out.finished:
                self._live_ids.discard(out.request_id)
        return outputs, first_token_s

    def _abort_live(self, message: str) -> None:
        request_ids = list(self._live_ids)
        for request_id in request_ids:
            if self.engine.abort_request(request_id):
                self.num_aborted_requests += 1
        self._live_ids.clear()
        self._submitted_s.clear()
        self.emit(_Failed(request_ids, message))


class _EngineThread:
    """The engine loop in a daemon thread of this process."""

    def __init__(self, engine: LLMEngine, on_event: Callable[[_Event], None]) -> None:
        self._inbox: queue.Queue[_Command] = queue.Queue()
        loop = _EngineLoop(engine, on_event)
        self._thread = threading.Thread(target=loop.run, args=(self._take,), name="nanovllm-engine", daemon=True)
        self._thread.start()

    def send(self, command: _Command) -> None:
        self._inbox.put(command)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float) -> None:
        self._inbox.put(_Stop())
        self._thread.join(timeout_s)

    def _take(self, block: bool) -> list[_Command]:
        """Everything in the inbox; waits for the first command when ``block`` (the engine is idle)."""
        commands: list[_Command] = [self._inbox.get()] if block else []
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                return commands


class _EngineProcess:
    """The engine loop in a spawned process, with a reader thread here that passes its events on.

    The constructor returns once the engine is built (raising what building it raised). The process
    ends on a _Stop, or when this side's pipe closes; a shutdown left undone runs at interpreter exit.
    Once the reader thread runs, only it waits for (reaps) the process: two threads reaping one child
    race, and the loser reads it as still running.
    """

    def __init__(self, model: str, engine_args: dict[str, Any], on_event: Callable[[_Event], None]) -> None:
        context = mp.get_context("spawn")  # CUDA cannot be used in a forked child
        commands_in, self._commands = context.Pipe(duplex=False)
        self._events, events_out = context.Pipe(duplex=False)
        log_level = logging.getLogger().getEffectiveLevel()
        args = (model, engine_args, commands_in, events_out, log_level)
        # Not a daemon: under tensor parallelism the engine process starts worker processes of its own.
        self._process = context.Process(target=_engine_process_main, args=args, name="nanovllm-engine")
        self._process.start()
        commands_in.close()
        events_out.close()
        self._send_lock = threading.Lock()  # commands come from the event loop, the _Stop maybe from another thread
        self._exited = threading.Event()  # the process has ended and been reaped
        self._reader: threading.Thread | None = None
        atexit.register(self.stop, ENGINE_PROCESS_JOIN_TIMEOUT_S)
        try:
            first = self._events.recv()
        except EOFError:
            self._process.join(ENGINE_PROCESS_JOIN_TIMEOUT_S)
            first = _StartFailed(RuntimeError(f"the engine process exited with code {self._process.exitcode}"))
        if isinstance(first, _StartFailed):
            self.stop(ENGINE_PROCESS_JOIN_TIMEOUT_S)
            raise first.error
        self.max_model_len = first.max_model_len
        self.first_stats = first.stats
        self._reader = threading.Thread(target=self._read, args=(on_event,), name="nanovllm-engine-events", daemon=True)
        self._reader.start()

    def send(self, command: _Command) -> None:
        with self._send_lock:
            self._commands.send(command)

    def is_alive(self) -> bool:
        return not self._exited.is_set()

    def stop(self, timeout_s: float) -> None:
        """Ask the engine process to finish, wait up to ``timeout_s``, then kill it. Stopping twice is harmless."""
        atexit.unregister(self.stop)
        with contextlib.suppress(OSError):  # it has ended already
            self.send(_Stop())
        if self._reader is None:  # its start failed: nobody else reaps it
            self._process.join(timeout_s)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
            self._exited.set()
        elif not self._exited.wait(timeout_s):
            logger.warning("the engine process did not stop within %.0f s; killing it", timeout_s)
            self._process.kill()
            self._exited.wait()
        self._commands.close()

    def _read(self, on_event: Callable[[_Event], None]) -> None:
        while True:
            try:
                event = self._events.recv()
            except (EOFError, OSError):  # its end of the pipe closed: the process is ending
                self._process.join()
                self._exited.set()
                on_event(_Failed(None, f"the engine process exited (code {self._process.exitcode})"))
                return
            on_event(event)


def _engine_process_main(
    model: str, engine_args: dict[str, Any], commands: Connection, events: Connection, log_level: int
) -> None:
    """The engine process: build the engine, say so, then run the engine loop on the pipes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle; it sends a _Stop
    logging.basicConfig(level=log_level)
    try:
        engine = LLMEngine(EngineConfig.from_kwargs(model, **engine_args))
    except Exception as e:
        events.send(_StartFailed(_picklable(e)))
        return

    def emit(event: _Event) -> None:
        with contextlib.suppress(OSError):  # the server process is gone (killed): nobody is left to tell
            events.send(event)

    try:
        events.send(_Ready(engine.max_model_len, engine.stats()))
        _EngineLoop(engine, emit).run(lambda block: _take_from_pipe(commands, block))
    finally:
        engine.close()


def _picklable(error: Exception) -> Exception:
    """``error``, or a RuntimeError with its text where it cannot cross a process boundary."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


def _take_from_pipe(commands: Connection, block: bool) -> list[_Command]:
    """The commands waiting in the pipe (the first waited for when ``block``); a closed pipe reads as _Stop."""
    taken: list[_Command] = []
    try:
        if block:
            taken.append(commands.recv())
        while commands.poll():
            taken.append(commands.recv())
    except (EOFError, OSError):
        taken.append(_Stop())
    return taken
