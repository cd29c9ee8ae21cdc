"""The decoders' feed-forward blocks: gated (LLaMA, Gemma, Phi-3) and plain (GPT-2, Phi)."""

import torch
from torch import nn

from nanovllm.layers.activation import Activation
from nanovllm.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear, RowParallelLinear
from nanovllm.layers.quantization.base import LinearQuantization


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with SiLU, GeGLU with GELU."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        compile_ops: bool = False,
        hidden_act: str = "silu",
        quant: LinearQuantization | None = None,  # which projections hold quantized weights; None = none
        prefix: str = "",  # this MLP's module name in the checkpoint, e.g. "model.layers.0.mlp"
        triton_activation: bool = False,  # act(gate) * up in one Triton kernel (kernels/triton_activation.py)
    ) -> None:
        super().__init__()
        gate_up = quant.scheme_for(prefix, ("gate_proj", "up_proj")) if quant else None
        down = quant.scheme_for(prefix, ("down_proj",)) if quant else None
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, scheme=gate_up)
        self.act = Activation(hidden_act, is_gated=True, compile_ops=compile_ops, use_triton=triton_activation)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, scheme=down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, hidden_size] -> [N, hidden_size]
        return self.down_proj(self.act(self.gate_up_proj(x)))


class MLP(nn.Module):
    """fc2(act(fc1(x))), both projections with biases: GPT-2's and Phi's feed-forward."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        compile_ops: bool,
        hidden_act: str,
        quant: LinearQuantization | None = None,  # which projections hold quantized weights; None = none
        prefix: str = "",  # this MLP's module name in the checkpoint, e.g. "model.layers.0.mlp"
    ) -> None:
        super().__init__()
        fc1 = quant.scheme_for(prefix, ("fc1",)) if quant else None
        fc2 = quant.scheme_for(prefix, ("fc2",)) if quant else None
        self.fc1 = ColumnParallelLinear(hidden_size, intermediate_size, bias=True, scheme=fc1)
        self.act = Activation(hidden_act, compile_ops=compile_ops)
        self.fc2 = RowParallelLinear(intermediate_size, hidden_size, bias=True, scheme=fc2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, hidden_size] -> [N, hidden_size]
        return self.fc2(self.act(self.fc1(x)))  # fc1: [N, intermediate_size / tp] on this rank
