"""torch.compile for the small elementwise ops, switched on once at engine construction."""

from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable[..., object])


def maybe_compile(fn: F, enabled: bool) -> F:
    """``fn`` compiled by Inductor (one fused kernel instead of several) when enabled, else ``fn`` itself.

    Shapes are marked dynamic so that prefill batches of every length share one compiled kernel.
    """
    return torch.compile(fn, dynamic=True) if enabled else fn  # type: ignore[return-value]
