"""The gated MLP shared by the decoder models: down(silu(gate(x)) * up(x))."""

import torch
from torch import nn

from nanovllm.layers.activation import SiluAndMul
from nanovllm.layers.linear import MergedColumnParallelLinear, RowParallelLinear


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, compile_ops: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2)
        self.act = SiluAndMul(compile_ops)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, hidden_size] -> [N, hidden_size]
        return self.down_proj(self.act(self.gate_up_proj(x)))
