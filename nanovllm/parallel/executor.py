"""How a replica's rank 0 runs each step with the other ranks: the ``distributed_executor_backend`` seam.

    backend              ranks started by                 each step's RunStep travels    a dead rank is seen by
    "mp"                 rank 0, spawned on its host       a Pipe per worker (workers.py)   the process sentinel
    "ray"                Ray, as actors in a placement     a Ray actor call (ray_workers)   the actor's error
                         group (the cluster spans hosts)
    "external_launcher"  torchrun, on every host: each     a gloo broadcast (launcher.py)   heartbeats
                         runs the user's script

The backend is chosen once, when the engine is built; Ray is imported only when chosen. Every backend
gives rank 0 the same handle, a :class:`StepExecutor`.
"""

from typing import Protocol

import torch

from nanovllm.config import EngineConfig
from nanovllm.models.arch import ModelArch
from nanovllm.parallel.workers import TensorParallelWorkers
from nanovllm.runner.host_samples import HostSamples
from nanovllm.runner.model_runner import ModelRunner, rank_device
from nanovllm.scheduler.batch import ScheduledBatch


class StepExecutor(Protocol):
    """Rank 0's handle on the other ranks that take part in its steps."""

    @property
    def device(self) -> torch.device:
        """Rank 0's device."""
        ...

    @property
    def can_schedule_ahead(self) -> bool:
        """Whether a step may launch before the last one's samples reach the host (no rank needs them first)."""
        ...

    @property
    def has_failed(self) -> bool:
        """Whether a peer has died while the engine was open (its collectives can no longer finish)."""
        ...

    def launch(self, runner: ModelRunner, batch: ScheduledBatch, in_flight: ScheduledBatch | None) -> HostSamples:
        """Start one step on every rank (rank 0's share on ``runner``); rank 0's samples come back."""
        ...

    def close(self) -> None:
        """Stop the other ranks (or leave them), and the process group. Closing twice is harmless."""
        ...


def start_workers(config: EngineConfig, arch: ModelArch, max_model_len: int) -> StepExecutor:
    """Start ranks 1..N-1 of a tensor-parallel engine as the backend says; rank 0 is this process.

    external_launcher ranks are not started here: torchrun started them, and engine/launched.py joins them.
    """
    backend = config.distributed_executor_backend
    if backend == "ray":
        from nanovllm.parallel.ray_workers import RayWorkers  # Ray is an optional extra

        return RayWorkers(config, arch, max_model_len)
    if backend != "mp":
        raise ValueError(f"start_workers starts 'mp' or 'ray' ranks, not distributed_executor_backend={backend!r}")
    return TensorParallelWorkers(config, arch, max_model_len, rank_device(config, 0))
