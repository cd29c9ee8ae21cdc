"""Rotary position embedding (RoPE), with the linear, LLaMA-3 and LongRoPE frequency scalings.

Each pair of dimensions (i, i + rotary_dim/2) of a query or key is rotated by the angle
``position * inv_freq[i]``. The cos/sin table for every position is computed once. With a partial
rotary factor (Phi) only the first ``rotary_dim`` dimensions of each head rotate; the rest pass through:

    head:  | x1 (rotary_dim / 2) | x2 (rotary_dim / 2) | passed through (head_dim - rotary_dim) |
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from nanovllm.utils.compile import maybe_compile

ROPE_TYPES = ("default", "linear", "llama3", "longrope")


@dataclass(frozen=True)
class RopeConfig:
    theta: float  # base of the rotary frequencies
    rope_type: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0  # context extension factor (linear, llama3)
    low_freq_factor: float = 1.0  # llama3: wavelengths above original_len / this are scaled fully
    high_freq_factor: float = 4.0  # llama3: wavelengths below original_len / this are not scaled
    original_max_position_embeddings: int = 8192  # llama3, longrope: context the model was pretrained on
    partial_rotary_factor: float = 1.0  # share of each head's dimensions that rotate (Phi: 0.4 to 0.75)
    short_factor: tuple[float, ...] = ()  # longrope: divides inv_freq below original_max_position_embeddings
    long_factor: tuple[float, ...] = ()  # longrope: divides inv_freq at and past original_max_position_embeddings
    attention_factor: float = 1.0  # multiplies cos and sin (longrope's sqrt(1 + ln(factor) / ln(original_len)))

    def rotary_dim(self, head_dim: int) -> int:
        """Dimensions of each head that rotate, as transformers rounds them: int(head_dim * factor)."""
        return int(head_dim * self.partial_rotary_factor)


def rope_inv_freq(rotary_dim: int, rope: RopeConfig, ext_factors: tuple[float, ...] = ()) -> torch.Tensor:
    """[rotary_dim / 2] float32; ``ext_factors`` divide the frequencies one by one (LongRoPE)."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    base_powers = rope.theta**exponents  # [rotary_dim / 2]
    if ext_factors:
        base_powers = torch.tensor(ext_factors, dtype=torch.float32) * base_powers
    inv_freq = 1.0 / base_powers
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


def rope_angles(rotary_dim: int, max_position: int, rope: RopeConfig) -> torch.Tensor:
    """The rotation angle of each position and frequency: [max_position, rotary_dim / 2] float32.

    LongRoPE (Phi-3) rotates positions below original_max_position_embeddings with the short factors and the
    rest with the long ones. transformers picks one set for a whole forward pass, by its last position; per
    position, a sequence that grows past the original length keeps the keys it cached before, as transformers'
    own generation with a KV cache does.
    """
    positions = torch.arange(max_position, dtype=torch.float32)  # [max_position]
    if rope.rope_type != "longrope":
        return torch.outer(positions, rope_inv_freq(rotary_dim, rope))
    short = torch.outer(positions, rope_inv_freq(rotary_dim, rope, rope.short_factor))
    long = torch.outer(positions, rope_inv_freq(rotary_dim, rope, rope.long_factor))
    is_long = (positions >= rope.original_max_position_embeddings)[:, None]  # [max_position, 1]
    return torch.where(is_long, long, short)


class RotaryEmbedding(nn.Module):
    cos: torch.Tensor  # [max_position, rotary_dim / 2] float32
    sin: torch.Tensor  # [max_position, rotary_dim / 2] float32

    def __init__(self, head_dim: int, max_position: int, rope: RopeConfig, compile_ops: bool = False) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rope.rotary_dim(head_dim)
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= head_dim:
            raise ValueError(
                f"partial_rotary_factor={rope.partial_rotary_factor} rotates {self.rotary_dim} of head_dim={head_dim} "
                "dimensions; it must rotate an even number of them, at least 2"
            )
        self._rotate_qk = maybe_compile(apply_rotary, compile_ops)
        angles = rope_angles(self.rotary_dim, max_position, rope)  # [max_position, rotary_dim / 2]
        self.register_buffer("cos", angles.cos() * rope.attention_factor, persistent=False)
        self.register_buffer("sin", angles.sin() * rope.attention_factor, persistent=False)

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
    cos = cos_table[positions].unsqueeze(1)  # [N, 1, rotary_dim / 2]
    sin = sin_table[positions].unsqueeze(1)
    return _rotate(query, cos, sin), _rotate(key, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the halves (x1, x2) of the first rotary_dim dimensions: (x1 cos - x2 sin, x2 cos + x1 sin)."""
    rotary_dim = 2 * cos.shape[-1]
    x1, x2 = x[..., : rotary_dim // 2], x[..., rotary_dim // 2 : rotary_dim]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rotary_dim:]), dim=-1)
