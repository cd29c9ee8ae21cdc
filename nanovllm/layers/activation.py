"""The gated MLP's activation."""

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.utils.compile import maybe_compile


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[N, 2 * d] holding (gate | up) -> silu(gate) * up, [N, d]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class SiluAndMul(nn.Module):
    def __init__(self, compile_ops: bool = False) -> None:
        super().__init__()
        self._fn = maybe_compile(silu_and_mul, compile_ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)
