"""ray: tensor-parallel ranks 1..N-1 as Ray actors, so that a Ray cluster's hosts can hold them.

Rank 0 is this process (Ray's driver), as under "mp"; the other ranks are actors, one per bundle of
a placement group (one GPU each, or one CPU), and Ray places the group on the cluster's nodes:

    bundle:   0              1          ...  N-1
    holds:    rank 0's GPU   rank 1          rank N-1       (on CPU bundle 0 is not asked for)
              (this node)

Each step rank 0 calls every actor's ``run`` with the RunStep (parallel/messages.py) and runs its
own share meanwhile; the forward passes meet in the collectives, over a process group whose store
rank 0 opens on its network address. Each actor also has a call that returns only when the actor
is closed, in a concurrency group of its own: a watcher thread waits on those calls, so an actor
that dies is named at once, as a process sentinel names a dead "mp" worker.

Ray is imported only when this module is, which is when distributed_executor_backend="ray" is chosen.
"""

import os
import threading
import traceback
from typing import Any

import ray
import torch
import torch.distributed as dist
from ray.exceptions import RayActorError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from nanovllm.config import EngineConfig
from nanovllm.models.arch import ModelArch
from nanovllm.parallel import process_group as parallel
from nanovllm.parallel.failures import PeerFailure
from nanovllm.parallel.messages import RunStep, SequenceMirror, StepEncoder
from nanovllm.parallel.workers import cpu_threads_per_rank
from nanovllm.runner.host_samples import HostSamples
from nanovllm.runner.model_runner import ModelRunner, resolve_device
from nanovllm.scheduler.batch import ScheduledBatch

PLACEMENT_TIMEOUT_S = 60.0  # how long the cluster gets to find room for the placement group before it is an error
ACTOR_START_TIMEOUT_S = 300.0  # an actor's process imports torch and nanovllm before it answers
ACTOR_CLOSE_TIMEOUT_S = 30.0  # at shutdown, how long an actor gets to leave the group before it is killed


@ray.remote(concurrency_groups={"watch": 1})  # type: ignore[call-overload]  # Ray's stub lacks the argument
class RankActor:
    """One tensor-parallel rank in a Ray worker process: its runner, fed by rank 0's RunSteps."""

    def __init__(self) -> None:
        self.closed = threading.Event()  # set by close(); ends wait_until_closed

    def is_ready(self) -> bool:
        """Answers once the actor's process is up, with nanovllm imported: no process group is waited for yet."""
        return True

    def start(
        self, rank: int, config: EngineConfig, arch: ModelArch, max_model_len: int, store_host: str, store_port: int
    ) -> None:
        """Join rank 0's process group and build this rank's runner, in lockstep with the other ranks."""
        try:
            size = config.tensor_parallel_size
            on_gpu = resolve_device(config.device).type == "cuda"
            device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")  # Ray shows it one GPU
            if not on_gpu:
                torch.set_num_threads(cpu_threads_per_rank(size))
            parallel.set_tensor_parallel(rank, size)
            parallel.init_process_group(parallel.connect_store(store_port, size, store_host), device)
            self.runner = ModelRunner(config, arch, max_model_len, rank=rank, device=device)
            self.mirror = SequenceMirror()
        except BaseException:
            traceback.print_exc()
            ray.actor.exit_actor()  # a dead actor is seen by rank 0's watcher; a live one that failed is not

    def run(self, step: RunStep) -> None:
        self.mirror.run(self.runner, step)

    @ray.method(concurrency_group="watch")
    def wait_until_closed(self) -> None:
        """Returns once close() has run; raises RayActorError in the caller if this actor dies first."""
        self.closed.wait()

    def close(self) -> None:
        self.runner.close()
        parallel.destroy_process_group()
        self.closed.set()


@ray.remote
def _gpu_ids() -> list[Any]:
    """The GPUs Ray gives a task in the bundle it runs in."""
    return ray.get_gpu_ids()


class RayWorkers:
    """Rank 0's handle on ranks 1..N-1 as Ray actors (a StepExecutor): starts, steps, watches and stops them."""

    can_schedule_ahead = False  # each step's input tokens go to the actors in its message: rank 0 must have them

    def __init__(self, config: EngineConfig, arch: ModelArch, max_model_len: int) -> None:
        if not ray.is_initialized():
            ray.init()  # joins the cluster this host belongs to (ray start), or starts one on this host
        size = config.tensor_parallel_size
        on_gpu = resolve_device(config.device).type == "cuda"
        self.group = _place(size, on_gpu)
        self.device = _driver_gpu(self.group) if on_gpu else torch.device("cpu")  # rank 0's
        host = ray.util.get_node_ip_address()  # where the other nodes reach this one
        store = parallel.open_store(size, host)
        parallel.set_tensor_parallel(0, size)
        self.actors = [
            RankActor.options(  # type: ignore[attr-defined]
                num_gpus=1 if on_gpu else 0,
                num_cpus=0 if on_gpu else 1,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=rank),
            ).remote()
            for rank in range(1, size)
        ]
        _wait_until_ready(self.actors, self.group)
        for rank, actor in enumerate(self.actors, start=1):
            actor.start.remote(rank, config, arch, max_model_len, host, store.port)
        self.failure = PeerFailure()
        self.encoder = StepEncoder()
        self.is_closing = threading.Event()  # set by close(): actors that end now are not failures
        self.watcher = threading.Thread(target=self._watch, daemon=True, name="ray-watcher")
        self.watcher.start()
        num_threads = torch.get_num_threads()
        self._restore_threads = lambda: torch.set_num_threads(num_threads)
        if not on_gpu:
            torch.set_num_threads(cpu_threads_per_rank(size))
        try:
            parallel.init_process_group(store, self.device)
        except BaseException:
            self.close()
            raise

    def _watch(self) -> None:
        """Wait until an actor ends; one that ends before close() has died."""
        waits = {actor.wait_until_closed.remote(): rank for rank, actor in enumerate(self.actors, start=1)}
        ready, _ = ray.wait(list(waits), num_returns=1)
        if self.is_closing.is_set():
            return
        try:
            ray.get(ready[0])
            how = "closed"
        except RayActorError as e:
            how = f"died ({type(e).__name__})"
        self.failure.report(f"tensor-parallel worker rank {waits[ready[0]]} (a Ray actor) {how}")
        if dist.is_initialized() and dist.get_backend() == "nccl":
            dist.distributed_c10d._abort_process_group()  # NCCL does not notice a dead peer by itself

    @property
    def has_failed(self) -> bool:
        return self.failure.has_failed

    def launch(self, runner: ModelRunner, batch: ScheduledBatch, in_flight: ScheduledBatch | None) -> HostSamples:
        """The step, run to its end on every rank (``in_flight`` is None: no step is launched ahead)."""
        self.failure.check()
        step = self.encoder.encode(batch)
        with self.failure.explained():
            calls = [actor.run.remote(step) for actor in self.actors]  # they run it while rank 0 runs its share
            samples = runner.run(batch)
            ray.get(calls)
        return HostSamples.landed(samples)

    def close(self) -> None:
        """Close every actor (each leaves the group), then rank 0 leaves; a dead actor is killed. Twice is harmless."""
        if self.is_closing.is_set():
            return
        self.is_closing.set()
        if not self.failure.has_failed:
            closes = [actor.close.remote() for actor in self.actors]
            ray.wait(closes, num_returns=len(closes), timeout=ACTOR_CLOSE_TIMEOUT_S)
        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(self.group)
        parallel.destroy_process_group()
        self._restore_threads()


def _wait_until_ready(actors: list[Any], group: PlacementGroup) -> None:
    """Fail fast where an actor cannot start (nanovllm missing on its node): rank 0 would wait for it in the group."""
    try:
        ray.get([actor.is_ready.remote() for actor in actors], timeout=ACTOR_START_TIMEOUT_S)
    except Exception as e:
        for actor in actors:
            ray.kill(actor)
        remove_placement_group(group)
        raise RuntimeError(
            f"a tensor-parallel Ray actor did not start ({type(e).__name__}: {e}); every Ray node needs nanovllm "
            "installed, with the same version"
        ) from e


def _place(size: int, on_gpu: bool) -> PlacementGroup:
    """Bundles for every rank: rank 0's GPU on this node, one GPU (or CPU) for each other rank anywhere."""
    this_node = f"node:{ray.util.get_node_ip_address()}"
    bundles = [{"GPU": 1.0, this_node: 0.001} if on_gpu else {"CPU": 0.001}] + [
        {"GPU": 1.0} if on_gpu else {"CPU": 1.0} for _ in range(size - 1)
    ]
    group = placement_group(bundles, strategy="PACK")
    ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT_S)
    if not ready:
        remove_placement_group(group)
        raise RuntimeError(
            f"the Ray cluster has no room for tensor_parallel_size={size} ranks (bundles {bundles}) after "
            f"{PLACEMENT_TIMEOUT_S:.0f} s; its resources are {ray.available_resources()}. Add nodes, or lower "
            "tensor_parallel_size"
        )
    return group


def _driver_gpu(group: PlacementGroup) -> torch.device:
    """The GPU Ray keeps for rank 0 (bundle 0, on this node), as this process sees it."""
    strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
    physical = str(ray.get(_gpu_ids.options(num_gpus=1, scheduling_strategy=strategy).remote())[0])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", visible.split(",").index(physical) if visible else int(physical))
