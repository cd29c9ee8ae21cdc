"""Tensor-parallel rank and world size: written once per process, read by the parallel layers."""

from dataclasses import dataclass


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
