"""Host values to a device without blocking the host, and device memory back to the device."""

import gc
from typing import Any

import torch


def to_device(values: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values (a list or a numpy array) as a ``dtype`` tensor on ``device``; on CUDA the copy goes through
    pinned memory, so it does not block the host."""
    host = torch.as_tensor(values, dtype=dtype)  # torch.tensor(pin_memory=True) refuses numpy arrays
    return (host.pin_memory() if device.type == "cuda" else host).to(device, non_blocking=True)


def release_cached_gpu_memory() -> None:
    """Give the GPU memory torch keeps cached for reuse (the tensors of closed engines) back to the device."""
    gc.collect()  # a closed engine may still be held by a reference cycle
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
