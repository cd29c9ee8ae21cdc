"""Heartbeats through torchrun's rendezvous store: how a rank learns that a rank on another host died.

No process of the job is the parent of the others (torchrun started each, maybe on another host), so
no sentinel fires when one dies. Instead every rank runs a thread that, every HEARTBEAT_INTERVAL_S,
adds one to its own counter in the store and reads everyone else's:

    store key          written by           meaning
    beat/<rank>        that rank's thread   a counter that grows while the rank is alive
    left/<rank>        that rank's close()  it left on purpose: its engine was closed

A counter that has not grown for HEARTBEAT_TIMEOUT_S, or a rank that left, is reported to the
:class:`PeerFailure` of this rank by name. The thread has its own connection to the store, so the
main thread's long store waits (a process group joining) never hold a beat back.
"""

import contextlib
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

from nanovllm.parallel.failures import PeerFailure

HEARTBEAT_INTERVAL_S = 0.5  # how often each rank beats and reads the others' beats
# Silence after which a rank counts as dead: many beats, so a rank busy on a loaded CPU box is not
# named by mistake, and short enough that survivors raise within seconds.
HEARTBEAT_TIMEOUT_S = 5.0
STORE_TIMEOUT = timedelta(seconds=30)  # one store operation of the heartbeat thread; its failure is reported


class Heartbeats:
    """This rank's beat and its watch over every other rank of the job, in one daemon thread."""

    def __init__(
        self,
        connect: Callable[[], dist.Store],
        rank: int,
        rank_names: list[str],
        failure: PeerFailure,
        on_failure: Callable[[], None],
    ) -> None:
        self.rank = rank  # this rank's index in the job
        self.rank_names = rank_names  # how to name each rank of the job in an error
        self.failure = failure  # where a dead or departed peer is reported
        self.on_failure = on_failure  # called once a peer is reported (NCCL: abort the process group)
        self.store = connect()  # this thread's own connection
        self.stop = threading.Event()  # set by close()
        self.thread = threading.Thread(target=self._run, daemon=True, name="nanovllm-heartbeats")
        self.thread.start()

    def _run(self) -> None:
        peers = [rank for rank in range(len(self.rank_names)) if rank != self.rank]
        last_count = dict.fromkeys(peers, 0)
        last_change = dict.fromkeys(peers, time.monotonic())
        try:
            while not self.stop.wait(HEARTBEAT_INTERVAL_S):
                self.store.add(f"beat/{self.rank}", 1)
                now = time.monotonic()
                for peer in peers:
                    count = self.store.add(f"beat/{peer}", 0)  # adding 0 reads the counter without waiting
                    if count != last_count[peer]:
                        last_count[peer], last_change[peer] = count, now
                message = self._find_failure(peers, {peer: now - last_change[peer] for peer in peers})
                if message is not None:
                    return self._report(message)
        except Exception as e:  # the store is gone: it lives in node 0's torchrun agent (or rank 0)
            if not self.stop.is_set():
                self._report(f"the rendezvous store stopped answering ({e}); node 0 or its torchrun has died")

    def _find_failure(self, peers: list[int], silent_s: dict[int, float]) -> str | None:
        """The first peer that left or has been silent too long, described; None while all beat."""
        for peer in peers:
            if self.store.check([f"left/{peer}"]):
                return f"{self.rank_names[peer]} left the job (its engine was closed, or its script ended)"
            if silent_s[peer] > HEARTBEAT_TIMEOUT_S:
                return f"{self.rank_names[peer]} stopped responding (no heartbeat for {silent_s[peer]:.1f} s)"
        return None

    def _report(self, message: str) -> None:
        if self.stop.is_set():
            return  # this rank is closing: peers leaving now is expected
        self.failure.report(message)
        self.on_failure()

    def close(self) -> None:
        """Stop watching, then tell the others that this rank leaves on purpose. Closing twice is harmless."""
        if self.stop.is_set():
            return
        self.stop.set()
        self.thread.join(STORE_TIMEOUT.total_seconds())
        with contextlib.suppress(Exception):  # the store is gone already: nobody is left to tell
            self.store.set(f"left/{self.rank}", "1")
