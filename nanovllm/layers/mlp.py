"""The gated MLP shared by the decoder models: down(silu(gate(x)) * up(x))."""

import torch
from torch import nn

from nanovllm.layers.activation import SiluAndMul
from nanovllm.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from nanovllm.layers.quantization.base import LinearQuantization


class GatedMLP(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        compile_ops: bool = False,
        quant: LinearQuantization | None = None,  # which projections hold quantized weights; None = none
        prefix: str = "",  # this MLP's module name in the checkpoint, e.g. "model.layers.0.mlp"
    ) -> None:
        super().__init__()
        gate_up = quant.scheme_for(prefix, ("gate_proj", "up_proj")) if quant else None
        down = quant.scheme_for(prefix, ("down_proj",)) if quant else None
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, scheme=gate_up)
        self.act = SiluAndMul(compile_ops)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, scheme=down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, hidden_size] -> [N, hidden_size]
        return self.down_proj(self.act(self.gate_up_proj(x)))
