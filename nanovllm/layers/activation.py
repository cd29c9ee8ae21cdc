"""The MLPs' activations, by the names config.json gives them (``hidden_act``, ``hidden_activation``,
``activation_function``)."""

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.utils.compile import maybe_compile


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
    return F.gelu(x, approximate="tanh")


def gelu_exact(x: torch.Tensor) -> torch.Tensor:
    """GELU with the exact normal CDF: 0.5 x (1 + erf(x / sqrt(2)))."""
    return F.gelu(x)


# config.json's activation name -> the function. "gelu_new" (GPT-2, Phi) and "gelu_pytorch_tanh" (Gemma) are
# two spellings of the tanh approximation; "gelu" is the exact one.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": gelu_exact,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
}


def gated(act: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The gated form of ``act``: [N, 2 * d] holding (gate | up) -> act(gate) * up, [N, d] (SwiGLU, GeGLU)."""

    def act_and_mul(x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return act(gate) * up

    return act_and_mul


class Activation(nn.Module):
    """``act(x)``, or with ``is_gated`` ``act(gate) * up`` of x = [N, 2 * d] holding (gate | up).

    The gated form runs as one Triton kernel with ``use_triton`` (chosen with the attention backend), else
    as the plain function above, compiled with ``compile_ops``.
    """

    def __init__(
        self, name: str = "silu", is_gated: bool = False, compile_ops: bool = False, use_triton: bool = False
    ) -> None:
        super().__init__()
        if name not in ACTIVATIONS:
            raise ValueError(f"activation {name!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
        act = ACTIVATIONS[name]
        if is_gated and use_triton:
            from nanovllm.kernels.triton_activation import gated_activation_triton  # imports Triton: only when chosen

            self._fn: Callable[[torch.Tensor], torch.Tensor] = partial(gated_activation_triton, name=name)
        else:
            self._fn = maybe_compile(gated(act) if is_gated else act, compile_ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)
