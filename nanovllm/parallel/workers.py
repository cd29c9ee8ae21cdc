"""Tensor-parallel worker processes: ranks 1..N-1, each running a ModelRunner on its shard of the model.

Rank 0 lives in the user's process and drives; the workers only follow:

    rank 0:  Scheduler -> ScheduledBatch -> StepEncoder -> RunStep --Pipe--> each worker
             ModelRunner.run(batch): forward pass, LM head all-gathers the logits, sample
    rank r:  Pipe -> SequenceMirror -> the same ScheduledBatch -> ModelRunner.run(batch): forward pass only

The forward passes meet in the collectives of the parallel layers (all-reduce after each
row-parallel linear and the embedding, all-gather of the logits). Workers are started with the
``spawn`` method (a fresh interpreter: CUDA cannot be forked) and watched: a worker that exits
makes the next or current step on rank 0 raise an error naming its rank and exit code.
"""

import contextlib
import faulthandler
import multiprocessing as mp
import os
import sys
import threading
import traceback
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

import torch
import torch.distributed as dist

from nanovllm.config import EngineConfig
from nanovllm.models.arch import ModelArch
from nanovllm.parallel import process_group as parallel
from nanovllm.parallel.failures import PeerFailure, WorkerDiedError
from nanovllm.parallel.messages import RunStep, SequenceMirror, Shutdown, StepEncoder, WorkerCall
from nanovllm.runner.host_samples import HostSamples
from nanovllm.runner.model_runner import ModelRunner
from nanovllm.scheduler.batch import ScheduledBatch, StepSamples

WORKER_START_TIMEOUT_S = 300  # a worker imports torch and nanovllm before it says hello; slow on a busy CPU box
WORKER_JOIN_TIMEOUT_S = 10.0  # at shutdown, how long a worker gets to leave the group before it is killed
STUCK_EXIT_S = 30.0  # after a worker died (NCCL), how long rank 0 may stay in its step before the process exits
# The usual reason a worker dies while starting: spawn imports the user's script again in the worker.
SPAWN_HINT = (
    "Workers are started with multiprocessing's spawn, which imports your script again in each worker: if your "
    'script creates the LLM at module level, put that code under `if __name__ == "__main__":`.'
)


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs to build its runner: the same inputs as rank 0, plus where to meet."""

    rank: int  # 1 .. tensor_parallel_size - 1
    config: EngineConfig  # the engine's settings, as rank 0 got them
    arch: ModelArch  # the model's shape, read by rank 0
    max_model_len: int  # config.max_model_len clamped to the model's limit
    device: torch.device  # this rank's device: cuda:rank, or cpu
    store_port: int  # port of rank 0's TCPStore, where the process group meets


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """A worker's whole life: join the group, build the runner, run every RunStep until Shutdown."""
    runner = None
    try:
        conn.send("hello")  # rank 0 waits for this before it blocks in the process group's rendezvous
        size = spec.config.tensor_parallel_size
        if spec.device.type == "cpu":
            torch.set_num_threads(cpu_threads_per_rank(size))
        parallel.set_tensor_parallel(spec.rank, size)
        parallel.init_process_group(parallel.connect_store(spec.store_port, size), spec.device)
        runner = ModelRunner(spec.config, spec.arch, spec.max_model_len, rank=spec.rank)
        mirror = SequenceMirror()
        while isinstance(call := _receive(conn), RunStep):
            mirror.run(runner, call)
    except BaseException:
        traceback.print_exc()
        raise SystemExit(1) from None
    finally:
        if runner is not None:
            runner.close()  # frees its decode graphs before the group is left
        parallel.destroy_process_group()


def cpu_threads_per_rank(size: int) -> int:
    """On CPU the N ranks share the cores. More threads than cores in total is far slower, not a bit:
    OpenMP threads spin while waiting, and a rank waiting in a collective keeps others off the cores."""
    return max(1, (os.cpu_count() or 1) // size)


def _receive(conn: Connection) -> WorkerCall:
    try:
        call: WorkerCall = conn.recv()
    except EOFError:  # rank 0's process is gone: nobody will ever send Shutdown
        return Shutdown()
    return call


class TensorParallelWorkers:
    """Rank 0's handle on ranks 1..N-1: starts them, sends each step, watches them, shuts them down.

    Shutdown runs on close(), when the handle is garbage-collected, or at interpreter exit
    (a weakref finalizer, which also covers atexit), whichever comes first, exactly once.
    """

    can_schedule_ahead = False  # each step's input tokens go to the workers in its message: rank 0 must have them

    def __init__(self, config: EngineConfig, arch: ModelArch, max_model_len: int, device: torch.device) -> None:
        self.device = device  # rank 0's
        size = config.tensor_parallel_size
        store = parallel.open_store(size)
        parallel.set_tensor_parallel(0, size)
        context = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.processes: list[BaseProcess] = []
        for rank in range(1, size):
            worker_device = torch.device("cuda", rank) if device.type == "cuda" else device
            spec = WorkerSpec(rank, config, arch, max_model_len, worker_device, store.port)
            parent_conn, child_conn = context.Pipe()
            process = context.Process(target=worker_main, args=(spec, child_conn), name=f"nanovllm-tp{rank}")
            process.start()
            child_conn.close()
            self.conns.append(parent_conn)
            self.processes.append(process)
        self.failure = PeerFailure()
        stop_reader, stop_writer = context.Pipe(duplex=False)
        is_nccl = device.type == "cuda"
        watchdog = threading.Thread(
            target=_watch, args=(self.processes, stop_reader, self.failure, is_nccl), daemon=True, name="tp-watchdog"
        )
        watchdog.start()
        num_threads = torch.get_num_threads()  # rank 0 shares the cores too, until shutdown
        if device.type == "cpu":
            torch.set_num_threads(cpu_threads_per_rank(size))
        self._finalizer = weakref.finalize(
            self, _shut_down, self.conns, self.processes, stop_writer, watchdog, num_threads
        )
        self.encoder = StepEncoder()
        try:
            self._wait_for_hello()
            parallel.init_process_group(store, torch.device("cuda", 0) if is_nccl else device)
        except BaseException:
            self.close()
            raise

    def _wait_for_hello(self) -> None:
        """Fail fast if a worker dies while importing, instead of waiting out the group's rendezvous timeout."""
        for rank, conn in enumerate(self.conns, start=1):
            try:
                said_hello = conn.poll(WORKER_START_TIMEOUT_S) and conn.recv() == "hello"
            except EOFError:  # it exited before saying hello
                said_hello = False
            if not said_hello:
                error = self.failure.error(f"tensor-parallel worker rank {rank} did not start")
                raise WorkerDiedError(f"{error} {SPAWN_HINT}") from None

    def send_step(self, batch: ScheduledBatch) -> None:
        """Send every worker this step's changes; they run it while rank 0 runs its own share."""
        step = self.encoder.encode(batch)
        for conn in self.conns:
            try:
                conn.send(step)
            except (BrokenPipeError, ConnectionResetError) as e:
                raise self.failure.error("a tensor-parallel worker stopped listening") from e
        self.failure.check()

    def run_step(self, runner: ModelRunner, batch: ScheduledBatch) -> StepSamples:
        """One step on every rank: the workers get the batch's changes, rank 0 runs its share and samples."""
        self.send_step(batch)  # the workers run this same step on their shards meanwhile
        with self.failure.explained():
            return runner.run(batch)

    def launch(self, runner: ModelRunner, batch: ScheduledBatch, in_flight: ScheduledBatch | None) -> HostSamples:
        """The step, run to its end on every rank (``in_flight`` is None: no step is launched ahead)."""
        return HostSamples.landed(self.run_step(runner, batch))

    @property
    def has_failed(self) -> bool:
        """Whether a worker has exited while the engine was open (its collectives can no longer finish)."""
        return self.failure.has_failed

    def close(self) -> None:
        """Shut the workers down and leave the process group. Closing twice is harmless."""
        self._finalizer()


def _watch(processes: list[BaseProcess], stop: Connection, failure: PeerFailure, is_nccl: bool) -> None:
    """Watchdog thread: wake when a worker exits (its sentinel) or at shutdown (the stop pipe)."""
    sentinels = {p.sentinel: rank for rank, p in enumerate(processes, start=1)}
    ready = wait([*sentinels, stop])
    if stop in ready:
        return
    rank = sentinels[next(s for s in ready if s in sentinels)]
    process = processes[rank - 1]
    process.join(1.0)  # reap it, so its exit code is known (the sentinel can fire first)
    # Which worker died, as found when it was reaped. Asking the processes later instead would race this
    # reaping: the loser of two waitpid() calls reads a dead child as running.
    failure.report(f"tensor-parallel worker rank {rank} (pid {process.pid}) exited with code {process.exitcode}")
    if is_nccl and dist.is_initialized():
        # NCCL does not notice a dead peer: rank 0 would wait in its collective until the group's timeout.
        # Aborting the communicators makes that pending collective return with an error now.
        args = (failure, processes)
        threading.Thread(target=_exit_if_stuck, args=args, daemon=True, name="tp-stuck-exit").start()
        dist.distributed_c10d._abort_process_group()


def _exit_if_stuck(failure: PeerFailure, processes: list[BaseProcess]) -> None:
    """The last resort when the abort cannot free rank 0 from the step it is in (it waits inside NCCL).

    Such a process can run nothing more on its GPU, and torch's own NCCL watchdog would end it at the
    collective timeout; ending it now, with the reason, is better than a silent wait of minutes. A rank 0
    between steps is not stuck: its next step raises, however late that comes. The workers still alive
    wait in the same collective, so they are killed first: on 4 H200s one outlived rank 0.
    """
    if not failure.raised.wait(STUCK_EXIT_S) and failure.in_step:
        sys.stderr.write(
            f"nanovllm: {failure.message}. Rank 0 is stuck in an NCCL call "
            f"that waits for it and could not be freed in {STUCK_EXIT_S:.0f} s; exiting the process. "
            "Where each thread was:\n"
        )
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        for process in processes:
            process.kill()  # a no-op for the dead one
        os._exit(1)


def _shut_down(
    conns: list[Connection],
    processes: list[BaseProcess],
    stop: Connection,
    watchdog: threading.Thread,
    num_threads: int,
) -> None:
    with contextlib.suppress(OSError):  # a watchdog that already reported a death has closed its end
        stop.send(None)  # the watchdog must not report the exits that follow
    watchdog.join(WORKER_JOIN_TIMEOUT_S)  # it may be aborting the NCCL group after a worker died
    stop_children(conns, processes, Shutdown(), WORKER_JOIN_TIMEOUT_S)
    if watchdog.is_alive():  # still aborting NCCL after a worker died: leaving the group would wait behind it
        parallel.reset_tensor_parallel()
    else:
        parallel.destroy_process_group()  # also forgets rank 0's tensor-parallel info
    torch.set_num_threads(num_threads)


def stop_children(conns: list[Connection], processes: list[BaseProcess], goodbye: object, timeout_s: float) -> None:
    """Send each child process ``goodbye`` down its pipe, give it ``timeout_s`` to exit, kill it if it has not;
    then close the pipes."""
    for conn in conns:
        with contextlib.suppress(OSError):  # that child is already gone (BrokenPipeError is an OSError)
            conn.send(goodbye)
    for process in processes:
        process.join(timeout_s)
        if process.is_alive():
            process.kill()
            process.join()
    for conn in conns:
        conn.close()
