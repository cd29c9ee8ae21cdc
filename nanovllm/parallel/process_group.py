"""Tensor-parallel rank and world size, and the process group that connects the ranks.

The rank and size are written once per engine, before the model is built, and read by the
parallel layers at construction. The process group is torch.distributed's default group:
NCCL between GPUs, gloo between CPU processes. The ranks meet at a TCPStore that rank 0
opens on a free port (the OS picks it), so two engines on one host never collide; under
torchrun they meet at torchrun's store instead (parallel/launcher.py).
"""

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

STORE_HOST = "127.0.0.1"  # where rank 0's store listens when every rank runs on its host (mp)
# How long a rank waits in one collective (or for the others to join) before failing. It must exceed
# the slowest step one rank can take while another waits: first torch.compile, graph capture, a long
# prefill on CPU. A dead worker is caught much sooner, by the worker watchdog (parallel/workers.py).
PROCESS_GROUP_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class TensorParallelInfo:
    rank: int  # this process's shard index, 0 .. size-1
    size: int  # number of processes the model is split over


_info = TensorParallelInfo(rank=0, size=1)
_is_set = False


def set_tensor_parallel(rank: int, size: int) -> None:
    """Set this process's rank and size once, before the model is built."""
    global _info, _is_set
    if _is_set and _info != TensorParallelInfo(rank, size):
        raise RuntimeError(f"tensor-parallel info is already {_info}; call reset_tensor_parallel() first")
    _info, _is_set = TensorParallelInfo(rank, size), True


def reset_tensor_parallel() -> None:
    """Forget the rank and size, when the engine that set them shuts down."""
    global _info, _is_set
    _info, _is_set = TensorParallelInfo(rank=0, size=1), False


def get_tensor_parallel() -> TensorParallelInfo:
    return _info


def open_store(size: int, host: str = STORE_HOST) -> dist.TCPStore:
    """Rank 0's rendezvous point, on a port the OS picks; pass ``store.port`` to the other ranks. ``host`` is
    rank 0's address as the others reach it (another host's ranks: its network address)."""
    return dist.TCPStore(host, 0, size, is_master=True, timeout=PROCESS_GROUP_TIMEOUT, wait_for_workers=False)


def connect_store(port: int, size: int, host: str = STORE_HOST) -> dist.TCPStore:
    """A worker's client of rank 0's store."""
    return dist.TCPStore(host, port, size, is_master=False, timeout=PROCESS_GROUP_TIMEOUT)


def require_no_tensor_parallel_engine() -> None:
    """One tensor-parallel engine per process at a time: the layers read one rank and size."""
    if dist.is_initialized() or _is_set:
        raise RuntimeError(
            f"a tensor-parallel engine (rank {_info.rank} of {_info.size}) is already open in this process; "
            "close() it before creating another engine"
        )


def init_process_group(store: dist.Store, device: torch.device) -> None:
    """Join the default process group as this process's rank (set_tensor_parallel comes first)."""
    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a torch.distributed process group")
    info = get_tensor_parallel()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # Connect every NCCL channel now rather than at a collective's first use, so that a later host
        # call need not wait to connect to a peer that may have died (see parallel/workers.py).
        os.environ.setdefault("NCCL_RUNTIME_CONNECT", "0")
    dist.init_process_group(
        backend,
        store=store,
        rank=info.rank,
        world_size=info.size,
        timeout=PROCESS_GROUP_TIMEOUT,
        device_id=device if device.type == "cuda" else None,  # NCCL: bind the communicator to this GPU now
    )


def destroy_process_group() -> None:
    """Leave the process group and forget the rank, so the next engine in this process starts clean."""
    try:
        if dist.is_initialized() and dist.get_backend() == "nccl":
            # NCCL's destroy waits on every peer's communicator, and once the workers have exited it can
            # wait forever (seen on 4 H200s after decode graphs were captured). Aborting needs no peer.
            dist.distributed_c10d._abort_process_group()
        elif dist.is_initialized():
            dist.destroy_process_group()
    except RuntimeError:
        pass  # the watchdog aborted it after a worker died (NCCL); nothing is left to tear down
    finally:
        reset_tensor_parallel()
