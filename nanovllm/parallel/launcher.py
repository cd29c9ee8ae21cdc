"""external_launcher: every rank is a process that torchrun started, each running the user's script.

A job is data_parallel_size replicas of tensor_parallel_size ranks each, ranks numbered by torchrun:

    rank:      0    1  |  2    3          world_size = data_parallel_size x tensor_parallel_size
    replica:   0    0  |  1    1          replica = rank // tensor_parallel_size
    tp rank:   0    1  |  0    1          its replica's rank 0 schedules and samples; the others follow

Joining (:class:`LaunchedRank`), on every rank, before any model memory is taken:

1. read RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (torchrun sets them) and check the
   world size against the engine arguments;
2. connect to the rendezvous store (node 0's torchrun agent holds it), publish this rank's engine
   arguments and compare every rank's: a difference is the same error on every rank;
3. start the heartbeats (parallel/heartbeats.py), so that a dead rank is named on every other;
4. join the replica's process group (gloo on CPU; NCCL on GPUs, plus a gloo group for messages).

Each step the replica's rank 0 broadcasts its RunStep over the gloo group (parallel/messages.py);
the other ranks follow until CallDone or CallFailed. Replicas meet only in the store: each posts
its share of a generate() call's outputs there, and every rank reads them all.
"""

import os
import pickle
import socket
import time
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from nanovllm.config import EngineConfig
from nanovllm.outputs import RequestOutput
from nanovllm.parallel import process_group as parallel
from nanovllm.parallel.failures import PeerFailure
from nanovllm.parallel.heartbeats import HEARTBEAT_INTERVAL_S, HEARTBEAT_TIMEOUT_S, STORE_TIMEOUT, Heartbeats
from nanovllm.parallel.messages import CallDone, CallFailed, RunStep, SequenceMirror, StepEncoder
from nanovllm.runner.host_samples import HostSamples
from nanovllm.runner.model_runner import ModelRunner
from nanovllm.scheduler.batch import ScheduledBatch

LAUNCH_ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets
# How long a rank waits for the others to reach the start-up check: they import torch and read the model first.
START_TIMEOUT = timedelta(seconds=300)
STORE_POLL_S = 0.05  # how often a rank waiting for other replicas' outputs looks at the store (and for failures)


@dataclass(frozen=True)
class LaunchEnv:
    """Where torchrun placed this process, read from the environment it set."""

    rank: int  # RANK: this process's index in the job, 0 .. world_size - 1
    world_size: int  # WORLD_SIZE: processes in the job, on all hosts
    local_rank: int  # LOCAL_RANK: this process's index on its host (its GPU there)
    master_addr: str  # MASTER_ADDR: host of the rendezvous store
    master_port: int  # MASTER_PORT: port of the rendezvous store

    @classmethod
    def from_environ(cls) -> "LaunchEnv":
        missing = [name for name in LAUNCH_ENV_VARS if not os.environ.get(name)]
        if missing:
            raise ValueError(
                f"distributed_executor_backend='external_launcher' needs the environment torchrun sets, but "
                f"{', '.join(missing)} is not set; launch the script with torchrun (torchrun --nproc-per-node N "
                "script.py), or use distributed_executor_backend='mp'"
            )
        env = {name: os.environ[name] for name in LAUNCH_ENV_VARS}
        return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), env["MASTER_ADDR"],
                   int(env["MASTER_PORT"]))  # fmt: skip


@dataclass(frozen=True)
class ReplicaLayout:
    """Where one rank sits among the job's replicas."""

    rank: int  # its index in the job
    num_replicas: int  # data_parallel_size
    replica_size: int  # tensor_parallel_size: ranks per replica

    @property
    def replica(self) -> int:
        return self.rank // self.replica_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.replica_size

    @property
    def is_driver(self) -> bool:
        """Rank 0 of its replica: it schedules and samples."""
        return self.tp_rank == 0


def check_world_size(env: LaunchEnv, config: EngineConfig) -> ReplicaLayout:
    """This rank's place among the replicas, once torchrun's world is known to hold exactly all of them."""
    dp, tp = config.data_parallel_size, config.tensor_parallel_size
    if env.world_size != dp * tp:
        raise ValueError(
            f"torchrun started WORLD_SIZE={env.world_size} ranks, but data_parallel_size={dp} x "
            f"tensor_parallel_size={tp} = {dp * tp}; launch {dp * tp} ranks in all (--nnodes x --nproc-per-node) "
            "or change the two sizes"
        )
    return ReplicaLayout(env.rank, dp, tp)


class LaunchedRank:
    """This process's membership in a torchrun job, from the start-up checks to leaving it (close())."""

    def __init__(self, config: EngineConfig, env: LaunchEnv, device: torch.device) -> None:
        self.layout = check_world_size(env, config)
        self.device = device  # this rank's device: cuda:LOCAL_RANK, or cpu
        parallel.require_no_tensor_parallel_engine()
        store, _, _ = next(dist.rendezvous("env://", env.rank, env.world_size, timeout=START_TIMEOUT))
        # Keys of this engine apart from earlier ones in the same job: every rank counts every engine it joins.
        prefix = f"nanovllm/engine{(store.add('nanovllm/num_joins', 1) - 1) // env.world_size}/"
        self.store = dist.PrefixStore(prefix, store)
        self.rank_names = check_same_config(self.store, config, env, self.layout)
        self.failure = PeerFailure(grace_s=HEARTBEAT_TIMEOUT_S + 2 * HEARTBEAT_INTERVAL_S)  # a death's last beat

        def connect() -> dist.Store:
            client = dist.TCPStore(env.master_addr, env.master_port, is_master=False, timeout=STORE_TIMEOUT)
            return dist.PrefixStore(prefix, client)

        self.heartbeats = Heartbeats(connect, env.rank, self.rank_names, self.failure, self._abort_nccl)
        try:
            self._join_replica_group()
        except BaseException:
            self.close()
            raise

    def _join_replica_group(self) -> None:
        """The replica's ranks form this process's default group; messages go over gloo whatever the device."""
        parallel.set_tensor_parallel(self.layout.tp_rank, self.layout.replica_size)
        self.message_group: dist.ProcessGroup | None = None  # None: the default group (gloo already)
        if self.layout.replica_size == 1:
            return
        group_store = dist.PrefixStore(f"replica{self.layout.replica}/", self.store)
        parallel.init_process_group(group_store, self.device)
        if self.device.type == "cuda":
            self.message_group = dist.new_group(backend="gloo")

    def _abort_nccl(self) -> None:
        """NCCL does not notice a dead peer: abort, so that a collective waiting on it returns an error now."""
        if dist.is_initialized() and dist.get_backend() == "nccl":
            dist.distributed_c10d._abort_process_group()

    def send(self, message: Any) -> None:
        """The replica's rank 0: one message to every other rank of the replica."""
        dist.broadcast_object_list([message], src=0, group=self.message_group)

    def receive(self) -> Any:
        """Another rank of the replica: the next message from its rank 0."""
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.message_group)
        return box[0]

    def follow(self, runner: ModelRunner, mirror: SequenceMirror) -> list[RequestOutput]:
        """Another rank of the replica, in generate(): run each step rank 0 sends, then return what it returned."""
        with self.failure.explained():
            while isinstance(call := self.receive(), RunStep):
                mirror.run(runner, call)
        if isinstance(call, CallFailed):
            raise call.error
        assert isinstance(call, CallDone), f"a generate() call ends with CallDone or CallFailed, got {call!r}"
        return call.outputs

    def post(self, call: int, result: CallDone | CallFailed) -> None:
        """A replica's rank 0: how its share of generate() call number ``call`` ended (outputs indexed by their
        place in the whole call), for every rank of the job to read."""
        put_object(self.store, f"call{call}/replica{self.layout.replica}", result)

    def gather(self, call: int) -> list[RequestOutput]:
        """Every replica's outputs of generate() call number ``call``, in input order (an error if one failed)."""
        keys = [f"call{call}/replica{replica}" for replica in range(self.layout.num_replicas)]
        while not self.store.check(keys):  # waited for here, not in the store, so that a death is seen
            self.failure.check()
            time.sleep(STORE_POLL_S)
        results = [pickle.loads(self.store.get(key)) for key in keys]
        if self.store.add(f"call{call}/num_read", 1) == len(self.rank_names):  # the last reader frees them
            for key in keys:
                self.store.delete_key(key)
        for result in results:
            if isinstance(result, CallFailed):
                raise result.error  # as its replica raised it, naming the replica
        return sorted((out for result in results for out in result.outputs), key=lambda out: out.index)

    def close(self) -> None:
        """Stop the heartbeats (telling the others this rank leaves), then leave the group. Twice is harmless."""
        self.heartbeats.close()
        parallel.destroy_process_group()


def put_object(store: dist.Store, key: str, value: Any) -> None:
    """Store a picklable value under ``key`` (read back with pickle.loads(store.get(key)))."""
    store.set(key, pickle.dumps(value))  # type: ignore[arg-type]  # a Store takes bytes too; its stub says str


def check_same_config(store: dist.Store, config: EngineConfig, env: LaunchEnv, layout: ReplicaLayout) -> list[str]:
    """Publish this rank's engine arguments and compare every rank's with rank 0's: the same error everywhere.

    Returns each rank's name for error messages: its rank, replica, host and pid.
    """
    replica = f", replica {layout.replica}" if layout.num_replicas > 1 else ""
    put_object(
        store, f"config/{env.rank}", (config, f"rank {env.rank} ({socket.gethostname()}, pid {os.getpid()}{replica})")
    )
    keys = [f"config/{rank}" for rank in range(env.world_size)]
    store.wait(keys, START_TIMEOUT)
    published: list[tuple[EngineConfig, str]] = [pickle.loads(store.get(key)) for key in keys]
    differences = [
        f"{field.name}={getattr(other, field.name)!r} on {name} but {getattr(published[0][0], field.name)!r} on rank 0"
        for other, name in published[1:]
        for field in fields(EngineConfig)
        if getattr(other, field.name) != getattr(published[0][0], field.name)
    ]
    if differences:
        raise ValueError(
            f"the torchrun ranks were given different engine arguments: {'; '.join(differences[:5])}. Every rank "
            "must build its LLM with the same arguments"
        )
    return [name for _, name in published]


class LaunchedWorkers:
    """A replica's rank 0's handle on the rest of the job (a StepExecutor): the replica's other ranks follow
    each step from its broadcast, and a death anywhere in the job stops the next step."""

    def __init__(self, rank: LaunchedRank) -> None:
        self.rank = rank  # this process's membership, closed by its owner (engine/launched.py)
        self.device = rank.device
        self.encoder = StepEncoder()

    @property
    def can_schedule_ahead(self) -> bool:
        return self.rank.layout.replica_size == 1  # no other rank of the replica needs the step's input tokens

    @property
    def has_failed(self) -> bool:
        return self.rank.failure.has_failed

    def launch(self, runner: ModelRunner, batch: ScheduledBatch, in_flight: ScheduledBatch | None) -> HostSamples:
        self.rank.failure.check()  # another replica may have died: stop now, not at the end of this replica's share
        if self.rank.layout.replica_size == 1:
            return runner.launch(batch, in_flight)
        with self.rank.failure.explained():
            self.rank.send(self.encoder.encode(batch))
            return HostSamples.landed(runner.run(batch))

    def close(self) -> None:
        """Nothing of its own to stop: the membership is left by its owner."""
