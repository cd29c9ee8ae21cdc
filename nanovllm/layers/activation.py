"""The gated MLP's activation."""

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """[N, 2 * d] holding (gate | up) -> silu(gate) * up, [N, d]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
