"""What every backend does when a peer rank dies: a watcher names it, the engine raises that name.

A peer that dies breaks the collectives of the step in flight (gloo sees the closed socket at once;
NCCL must be aborted) and every later one. Each backend has its own watcher that learns of the death
first, from a process sentinel (mp), a stopped heartbeat (external_launcher) or an actor error (ray),
and reports it here. The engine then raises :class:`WorkerDiedError` with that name:

    in a step:      the failed collective's error  -> waits up to grace_s for the report
    between steps:  check() before the next step   -> raises at once
"""

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

PEER_EXIT_GRACE_S = 5.0  # after a failed collective, how long to wait for a watcher to name the peer that caused it


class WorkerDiedError(RuntimeError):
    """A rank or replica of the engine died or left; the engine cannot run another step."""


@dataclass
class PeerFailure:
    """A dead peer, as a watcher thread reports it to the rank that drives the engine."""

    message: str | None = None  # which peer died and how, set once by the watcher
    reported: threading.Event = field(default_factory=threading.Event)  # message is set
    raised: threading.Event = field(default_factory=threading.Event)  # this rank raised WorkerDiedError
    in_step: bool = False  # this rank is inside a step's forward pass (its collectives), not between steps
    grace_s: float = PEER_EXIT_GRACE_S  # after a failed collective, how long to wait for the watcher's report

    def report(self, message: str) -> None:
        """The watcher's call: name the peer that died. Only the first report counts."""
        if self.message is None:
            self.message = message
            self.reported.set()

    @property
    def has_failed(self) -> bool:
        return self.message is not None

    def check(self) -> None:
        """Raise now if a peer has died: the next step could not finish."""
        if self.message is not None:
            raise self.error("")

    def error(self, context: str) -> WorkerDiedError:
        """The error to raise: the watcher's report, or ``context`` when none comes within the grace time."""
        self.raised.set()
        what = self.message if self.reported.wait(self.grace_s) else context
        return WorkerDiedError(
            f"{what}. Its traceback, if any, is printed on its host. This engine cannot continue: close() it and "
            "create a new LLM."
        )

    @contextmanager
    def explained(self) -> Iterator[None]:
        """Turn a failed collective into an error naming the peer that died, when one did."""
        self.in_step = True
        try:
            yield
        except Exception as e:
            if self.reported.wait(self.grace_s):  # a peer died: that is why the collective failed
                raise self.error(f"a collective failed ({type(e).__name__})") from e
            raise
        finally:
            self.in_step = False
