"""Rotary position embedding (RoPE), with the linear and LLaMA-3 frequency scalings.

Each pair of dimensions (i, i + head_dim/2) of a query or key is rotated by the angle
``position * inv_freq[i]``. The cos/sin table for every position is computed once.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from nanovllm.utils.compile import maybe_compile

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    theta: float  # base of the rotary frequencies
    rope_type: str = "default"  # "default", "linear" or "llama3"
    factor: float = 1.0  # context extension factor (linear, llama3)
    low_freq_factor: float = 1.0  # llama3: wavelengths above original_len / this are scaled fully
    high_freq_factor: float = 4.0  # llama3: wavelengths below original_len / this are not scaled
    original_max_position_embeddings: int = 8192  # llama3: context the model was pretrained on


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> torch.Tensor:  # [head_dim / 2] float32
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_scaled(inv_freq, rope)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """LLaMA 3.1's scaling: long wavelengths slowed by ``factor``, short ones kept, a smooth ramp between."""
    original_len = rope.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    long_wavelen = original_len / rope.low_freq_factor  # beyond this: fully scaled
    short_wavelen = original_len / rope.high_freq_factor  # below this: unscaled
    ramp = (original_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - ramp) * inv_freq / rope.factor + ramp * inv_freq
    scaled = torch.where(wavelen > long_wavelen, inv_freq / rope.factor, inv_freq)
    is_between = (wavelen >= short_wavelen) & (wavelen <= long_wavelen)
    return torch.where(is_between, blended, scaled)


class RotaryEmbedding(nn.Module):
    cos: torch.Tensor  # [max_position, head_dim / 2] float32
    sin: torch.Tensor  # [max_position, head_dim / 2] float32

    def __init__(self, head_dim: int, max_position: int, rope: RopeConfig, compile_ops: bool = False) -> None:
        super().__init__()
        self.head_dim = head_dim
        self._rotate_qk = maybe_compile(apply_rotary, compile_ops)
        inv_freq = rope_inv_freq(head_dim, rope)
        positions = torch.arange(max_position, dtype=torch.float32)
        angles = torch.outer(positions, inv_freq)  # [max_position, head_dim / 2]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(
        self,
        positions: torch.Tensor,  # [N]
        query: torch.Tensor,  # [N, num_heads, head_dim]
        key: torch.Tensor,  # [N, num_kv_heads, head_dim]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rotate_qk(positions, query, key, self.cos, self.sin)


def apply_rotary(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    cos = cos_table[positions].unsqueeze(1)  # [N, 1, head_dim / 2]
    sin = sin_table[positions].unsqueeze(1)
    return _rotate(query, cos, sin), _rotate(key, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the halves (x1, x2) of the last dimension: (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
