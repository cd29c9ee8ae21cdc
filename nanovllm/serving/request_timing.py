"""When each request passed each stage on its way to its first token, as the engine loop sees it.

    event loop sends AddRequests ─► engine loop takes it ─► a turn launches its first step ─► its first token
            submitted_s                   taken_s                     launched_s                first_token_s
                       └── handoff ───┘            └──── queue ────┘                └── prefill ───┘

All times are time.perf_counter(): one clock for every process of a host, so the event loop's and the engine
process's readings subtract. "prefill" runs from the start of the turn that launched the request's first step
to the end of the turn that recorded its first token: where the engine schedules ahead that covers the step
already on the device, the request's own step(s) and the recording.
"""

from dataclasses import dataclass

from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.outputs import StreamOutput


@dataclass(frozen=True)
class FirstTokenTimes:
    """One request's way through the engine loop to its first token (time.perf_counter() seconds)."""

    request_id: str  # the engine's request id
    submitted_s: float  # the event loop sent the AddRequests command that held it
    taken_s: float  # the engine loop took that command
    launched_s: float  # the engine loop began the turn that launched the request's first step
    first_token_s: float  # the engine loop had the request's first token (or its end without one)


@dataclass
class _Pending:
    submitted_s: float  # as FirstTokenTimes
    taken_s: float
    launched_s: float | None = None  # None until a turn launched its first step


class FirstTokenClock:
    """The engine loop's record of the requests that have no token yet."""

    def __init__(self) -> None:
        self._pending: dict[str, _Pending] = {}  # request id -> its times so far
        self._unlaunched: set[str] = set()  # of those, the requests no turn has launched yet

    def added(self, request_ids: list[str], submitted_s: float, taken_s: float) -> None:
        for request_id in request_ids:
            self._pending[request_id] = _Pending(submitted_s, taken_s)
        self._unlaunched.update(request_ids)

    def launched(self, engine: LLMEngine, turn_s: float) -> None:
        """After a turn that began at ``turn_s``: note the requests whose first step it launched."""
        for request_id in [request_id for request_id in self._unlaunched if engine.has_launched(request_id)]:
            self._pending[request_id].launched_s = turn_s
            self._unlaunched.discard(request_id)

    def first_tokens(self, outputs: list[StreamOutput], now_s: float) -> list[FirstTokenTimes]:
        """The times of the requests whose first output is among a turn's ``outputs``, which came at ``now_s``."""
        found = []
        for out in outputs:
            pending = self._pending.pop(out.request_id, None) if out.new_token_ids or out.finished else None
            if pending is not None:
                launched_s = now_s if pending.launched_s is None else pending.launched_s
                found.append(FirstTokenTimes(out.request_id, pending.submitted_s, pending.taken_s, launched_s, now_s))
                self._unlaunched.discard(out.request_id)
        return found

    def forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._pending.pop(request_id, None)
            self._unlaunched.discard(request_id)

    def clear(self) -> None:
        self._pending.clear()
        self._unlaunched.clear()
