"""The norms of the decoders: RMSNorm (LLaMA), RMSNorm with a (1 + w) weight (Gemma), LayerNorm (GPT-2, Phi).

Each is optionally fused with the residual add that precedes it (``forward_with_residual``).
"""

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.utils.compile import maybe_compile

# The kinds of norm a model family is built with (``build_norm``).
NORM_KINDS = ("rms", "rms_unit_offset", "layer")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 like the reference models.

    With ``unit_offset`` (Gemma) the checkpoint stores w - 1: y = x_normed * (1 + w), multiplied in float32
    and rounded once, where LLaMA rounds x_normed to the input dtype before multiplying.
    """
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    if unit_offset:
        return (x32 * (1.0 + weight.float())).to(x.dtype)
    return weight * x32.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual), out of place."""
    residual = x + residual
    return rms_norm(residual, weight, eps, unit_offset), residual


class RMSNorm(nn.Module):
    """rms_norm over the last dimension: a Triton kernel with ``use_triton`` (rows of [N, hidden] only; chosen
    with the attention backend), else the functions above, compiled with ``compile_ops``."""

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        compile_ops: bool = False,
        unit_offset: bool = False,
        use_triton: bool = False,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset  # Gemma's (1 + w) weight
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        if use_triton:
            from nanovllm.kernels.triton_norm import add_rms_norm_triton, rms_norm_triton  # imports Triton

            self._norm, self._add_norm = rms_norm_triton, add_rms_norm_triton
        else:
            self._norm, self._add_norm = maybe_compile(rms_norm, compile_ops), maybe_compile(add_rms_norm, compile_ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x, self.weight, self.eps, self.unit_offset)

    def forward_with_residual(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the residual, then normalize; returns (normalized, new residual). Nothing is changed in place."""
        return self._add_norm(x, residual, self.weight, self.eps, self.unit_offset)


def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer_norm(x + residual), x + residual), out of place."""
    residual = x + residual
    return F.layer_norm(residual, weight.shape, weight, bias, eps), residual


class LayerNorm(nn.Module):
    """y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias, over the last dimension."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, compile_ops: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(hidden_size), requires_grad=False)
        self._add_norm = maybe_compile(add_layer_norm, compile_ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)

    def forward_with_residual(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the residual, then normalize; returns (normalized, new residual). Nothing is changed in place."""
        return self._add_norm(x, residual, self.weight, self.bias, self.eps)


def build_norm(
    kind: str, hidden_size: int, eps: float, compile_ops: bool = False, use_triton: bool = False
) -> RMSNorm | LayerNorm:
    """The norm of kind ``kind`` (one of NORM_KINDS) over vectors of ``hidden_size``; ``use_triton``: an RMSNorm
    runs as a Triton kernel (kernels/triton_norm.py; LayerNorm stays as it is)."""
    if kind == "layer":
        return LayerNorm(hidden_size, eps, compile_ops)
    if kind not in NORM_KINDS:
        raise ValueError(f"norm kind {kind!r} is not one of {NORM_KINDS}")
    return RMSNorm(hidden_size, eps, compile_ops, unit_offset=kind == "rms_unit_offset", use_triton=use_triton)
