"""The engine loop behind AsyncLLM, and the messages it exchanges with the event loop.

    event loop ──commands: AddRequests, AbortRequests, StopLoop──► EngineLoop: add_request, abort_request, step
        ▲                                                                │
        └──── events: Progress (one per turn: acceptances, a step's outputs, stats), Failed ◄┘

Each turn of EngineLoop takes every command waiting, without waiting for more (it blocks only when idle),
applies them, steps, and sends one Progress: so a request that arrives while a step runs joins the very next
step launched, and the outputs of a step go back together, in one message. Where the engine schedules ahead
(LLMEngine.step), each turn launches the next step and then reports the one before it, whose bookkeeping
thus overlaps the next step on the device. EngineThread runs it in a thread of this process (commands through
a queue.Queue); engine_process.EngineProcess runs it in a process of its own. Either hands each event to a
callback, called from a thread that is not the event loop's.
"""

import logging
import pickle
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from nanovllm.engine.llm_engine import EngineStats, LLMEngine, Prompt
from nanovllm.lora_request import LoRARequest
from nanovllm.outputs import StreamOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.serving.request_timing import FirstTokenClock, FirstTokenTimes

logger = logging.getLogger(__name__)


# ---- commands: event loop -> engine loop ----


@dataclass(frozen=True)
class AddRequests:
    key: str  # the RequestStream's key, which its accepted event names
    request_ids: list[str]  # one per request
    prompts: list[Prompt]  # one per request
    params: list[SamplingParams]  # one per request
    submitted_s: float  # time.perf_counter() when the event loop sent the command (one clock for all processes)
    lora_requests: list[LoRARequest | None] | None = None  # one per request (None: base model); None = all base


@dataclass(frozen=True)
class AbortRequests:
    request_ids: list[str]  # requests to drop; unknown or finished ones are ignored


@dataclass(frozen=True)
class StopLoop:
    """Tells the engine loop to fail what is left and exit."""


Command = AddRequests | AbortRequests | StopLoop


# ---- events: engine loop -> event loop ----


@dataclass(frozen=True)
class Accepted:
    key: str  # the AddRequests command's key
    error: Exception | None  # what add_request raised (ValueError, TypeError for bad input); then none was queued


@dataclass(frozen=True)
class Progress:
    """One turn of the engine loop: the commands it accepted, a step's outputs (none when it only took commands)
    and the state after it."""

    accepted: list[Accepted]  # one per AddRequests command taken this turn
    outputs: list[StreamOutput]  # one per row of the step recorded this turn
    first_tokens: list[FirstTokenTimes]  # the requests whose first output is among ``outputs``
    stats: EngineStats
    num_aborted_requests: int  # cumulative


@dataclass(frozen=True)
class Failed:
    request_ids: list[str] | None  # None: every request still streaming
    message: str  # the EngineError each of them gets


Event = Progress | Failed


class EngineLoop:
    """The engine's side, in its thread or process: apply commands, step, report each turn as events."""

    def __init__(self, engine: LLMEngine, emit: Callable[[Event], None]) -> None:
        self.engine = engine
        self.emit = emit
        self.num_aborted_requests = 0
        self._live_ids: set[str] = set()  # requests added and not yet finished
        self._clock = FirstTokenClock()  # the requests with no token yet, and when they passed each stage

    def run(self, take_commands: Callable[[bool], list[Command]]) -> None:
        """Until a StopLoop: take the commands waiting (wait for one when idle), apply them, step, report."""
        try:
            while True:
                commands = take_commands(not self.engine.has_unfinished_requests())
                taken_s = time.perf_counter()
                accepted: list[Accepted] = []
                for command in commands:
                    if isinstance(command, StopLoop):  # answer what was accepted, then fail it with the rest
                        self.emit(Progress(accepted, [], [], self.engine.stats(), self.num_aborted_requests))
                        self._abort_live("the server is shutting down; the request was aborted")
                        return
                    if isinstance(command, AbortRequests):
                        self._abort(command.request_ids)
                    else:
                        accepted.append(self._add(command, taken_s))
                outputs, first_tokens = self._step() if self.engine.has_unfinished_requests() else ([], [])
                stats = self.engine.stats()
                self.emit(Progress(accepted, outputs, first_tokens, stats, self.num_aborted_requests))
        except Exception as e:  # a bug in this loop: fail every caller loudly rather than hang them
            logger.exception("the engine loop crashed")
            self.emit(Failed(None, f"the engine loop crashed: {e!r}"))

    def _abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            if self.engine.abort_request(request_id):
                self.num_aborted_requests += 1
            self._live_ids.discard(request_id)
        self._clock.forget(request_ids)

    def _add(self, command: AddRequests, taken_s: float) -> Accepted:
        added: list[str] = []
        lora_requests = command.lora_requests or [None] * len(command.request_ids)
        requests = zip(command.request_ids, command.prompts, command.params, lora_requests, strict=True)
        try:
            for request_id, prompt, params, lora_request in requests:
                self.engine.add_request(prompt, params, request_id, lora_request=lora_request)
                added.append(request_id)
        except Exception as e:  # invalid input (or a tokenizer's failure): take back those queued, tell the caller
            for request_id in added:
                self.engine.abort_request(request_id)
            return Accepted(command.key, picklable(e))
        self._live_ids.update(added)
        self._clock.added(added, command.submitted_s, taken_s)
        return Accepted(command.key, None)

    def _step(self) -> tuple[list[StreamOutput], list[FirstTokenTimes]]:
        turn_s = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as e:
            logger.exception("an engine step failed; aborting its requests")
            self._abort_live(f"the engine step failed ({type(e).__name__}: {e}); the request was aborted")
            return [], []
        self._clock.launched(self.engine, turn_s)
        for out in outputs:
            if out.finished:
                self._live_ids.discard(out.request_id)
        return outputs, self._clock.first_tokens(outputs, time.perf_counter())

    def _abort_live(self, message: str) -> None:
        request_ids = list(self._live_ids)
        for request_id in request_ids:
            if self.engine.abort_request(request_id):
                self.num_aborted_requests += 1
        self._live_ids.clear()
        self._clock.clear()
        self.emit(Failed(request_ids, message))


class EngineThread:
    """The engine loop in a daemon thread of this process."""

    def __init__(self, engine: LLMEngine, on_event: Callable[[Event], None]) -> None:
        self._inbox: queue.Queue[Command] = queue.Queue()
        loop = EngineLoop(engine, on_event)
        self._thread = threading.Thread(target=loop.run, args=(self._take,), name="nanovllm-engine", daemon=True)
        self._thread.start()

    def send(self, command: Command) -> None:
        self._inbox.put(command)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float) -> None:
        self._inbox.put(StopLoop())
        self._thread.join(timeout_s)

    def _take(self, block: bool) -> list[Command]:
        """Everything in the inbox; waits for the first command when ``block`` (the engine is idle)."""
        commands: list[Command] = [self._inbox.get()] if block else []
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                return commands


def num_kvcache_tokens(engine: LLMEngine) -> int:
    """The KV cache's size in tokens: what all requests running at once can hold."""
    block_manager = engine.scheduler.block_manager
    return block_manager.num_blocks * block_manager.block_size


def picklable(error: Exception) -> Exception:
    """``error``, or a RuntimeError with its text where it cannot cross a process boundary."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error
