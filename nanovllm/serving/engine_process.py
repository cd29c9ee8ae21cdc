"""The engine loop in a process of its own (``nanovllm serve --engine-process``).

The engine then holds a GIL of its own. Under many streams the server's event loop is busy writing
chunks, and in one process every engine step would wait for the GIL behind that work. Commands and
events are pickled through two pipes; a reader thread here hands the events on.
"""

import atexit
import contextlib
import logging
import multiprocessing as mp
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from nanovllm.config import EngineConfig
from nanovllm.engine.llm_engine import EngineStats, LLMEngine
from nanovllm.serving.engine_loop import Command, EngineLoop, Event, Failed, StopLoop, num_kvcache_tokens, picklable
from nanovllm.serving.gc_freeze import startup_objects_frozen

logger = logging.getLogger(__name__)
ENGINE_PROCESS_JOIN_TIMEOUT_S = 30.0  # after this, a shutdown kills the engine process


@dataclass(frozen=True)
class _Ready:
    """The engine process built its engine (the first message it sends)."""

    max_model_len: int  # the engine's, clamped to the model's limit
    num_kvcache_tokens: int  # the KV cache's size in tokens
    stats: EngineStats  # before any request


@dataclass(frozen=True)
class _StartFailed:
    error: Exception  # what building the engine raised


class EngineProcess:
    """The engine loop in a spawned process, with a reader thread here that passes its events on.

    The constructor returns once the engine is built (raising what building it raised). The process
    ends on a StopLoop, or when this side's pipe closes; a shutdown left undone runs at interpreter exit.
    Once the reader thread runs, only it waits for (reaps) the process: two threads reaping one child
    race, and the loser reads it as still running.
    """

    def __init__(self, model: str, engine_args: dict[str, Any], on_event: Callable[[Event], None]) -> None:
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
        self._send_lock = threading.Lock()  # commands come from the event loop, the StopLoop maybe from another thread
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
        self.num_kvcache_tokens = first.num_kvcache_tokens
        self.first_stats = first.stats
        self._reader = threading.Thread(target=self._read, args=(on_event,), name="nanovllm-engine-events", daemon=True)
        self._reader.start()

    def send(self, command: Command) -> None:
        with self._send_lock:
            self._commands.send(command)

    def is_alive(self) -> bool:
        return not self._exited.is_set()

    def stop(self, timeout_s: float) -> None:
        """Ask the engine process to finish, wait up to ``timeout_s``, then kill it. Stopping twice is harmless."""
        atexit.unregister(self.stop)
        with contextlib.suppress(OSError):  # it has ended already
            self.send(StopLoop())
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

    def _read(self, on_event: Callable[[Event], None]) -> None:
        while True:
            try:
                event = self._events.recv()
            except (EOFError, OSError):  # its end of the pipe closed: the process is ending
                self._process.join()
                self._exited.set()
                on_event(Failed(None, f"the engine process exited (code {self._process.exitcode})"))
                return
            on_event(event)


def _engine_process_main(
    model: str, engine_args: dict[str, Any], commands: Connection, events: Connection, log_level: int
) -> None:
    """The engine process: build the engine, say so, then run the engine loop on the pipes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle; it sends a StopLoop
    logging.basicConfig(level=log_level)
    try:
        engine = LLMEngine(EngineConfig.from_kwargs(model, **engine_args))
    except Exception as e:
        events.send(_StartFailed(picklable(e)))
        return

    def emit(event: Event) -> None:
        with contextlib.suppress(OSError):  # the server process is gone (killed): nobody is left to tell
            events.send(event)

    try:
        with startup_objects_frozen():  # no full collection walks the engine while it serves
            events.send(_Ready(engine.max_model_len, num_kvcache_tokens(engine), engine.stats()))
            EngineLoop(engine, emit).run(lambda block: _take_from_pipe(commands, block))
    finally:
        engine.close()


def _take_from_pipe(commands: Connection, block: bool) -> list[Command]:
    """The commands waiting in the pipe (the first waited for when ``block``); a closed pipe reads as StopLoop."""
    taken: list[Command] = []
    try:
        if block:
            taken.append(commands.recv())
        while commands.poll():
            taken.append(commands.recv())
    except (EOFError, OSError):
        taken.append(StopLoop())
    return taken
