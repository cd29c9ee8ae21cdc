"""The self-attention block shared by the decoder models: projections, rotary, paged attention."""

from dataclasses import dataclass

import torch
from torch import nn

from nanovllm.kernels.backends import Kernels
from nanovllm.layers.attention import Attention
from nanovllm.layers.layernorm import RMSNorm, rms_norm
from nanovllm.layers.linear import QKVParallelLinear, RowParallelLinear
from nanovllm.layers.quantization.base import LinearQuantization
from nanovllm.layers.rotary import RopeConfig, RotaryEmbedding, apply_rotary
from nanovllm.utils.compile import maybe_compile

QK_NORM_KINDS = ("rms", "rms_unit_offset")  # the per-head norms the fused norm + rotary paths compute


@dataclass(frozen=True)
class AttentionSpec:
    """How one layer attends, where the layers of a model may differ (Gemma 3 interleaves two kinds)."""

    scale: float  # multiplies q.k before the softmax: head_dim ** -0.5 unless the config says otherwise
    rope: RopeConfig | None  # rotary of q and k; None: none (GPT-2 adds learned positions to the embeddings)
    sliding_window: int | None  # keys each query sees, itself included; None: every key before it


class SelfAttentionBlock(nn.Module):
    """qkv projection -> (optional per-head q/k RMSNorm: Qwen3, Gemma 3) -> rotary -> attention -> o projection."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,  # query heads of the whole model (each rank holds its share)
        num_kv_heads: int,  # key/value heads of the whole model
        head_dim: int,
        spec: AttentionSpec,
        max_position: int,  # longest context: the rotary tables' length
        norm_eps: float,  # of the q/k norms
        kernels: Kernels,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: str | None,  # "rms" or "rms_unit_offset": a norm over each query and key head before rotary
        quant: LinearQuantization | None = None,  # which projections hold quantized weights; None = none
        prefix: str = "",  # this block's module name in the checkpoint, e.g. "model.layers.0.self_attn"
    ) -> None:
        super().__init__()
        qkv_scheme = quant.scheme_for(prefix, ("q_proj", "k_proj", "v_proj")) if quant else None
        o_scheme = quant.scheme_for(prefix, ("o_proj",)) if quant else None
        self.qkv_proj = QKVParallelLinear(hidden_size, head_dim, num_heads, num_kv_heads, qkv_bias, qkv_scheme)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads  # per rank
        self.head_dim = head_dim
        self.o_proj = RowParallelLinear(num_heads * head_dim, hidden_size, o_bias, o_scheme)
        compile_ops = kernels.compile_ops
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if qk_norm is not None:
            if qk_norm not in QK_NORM_KINDS:
                raise ValueError(f"q/k norm {qk_norm!r} is not supported; supported: {QK_NORM_KINDS}")
            self.q_norm = RMSNorm(head_dim, norm_eps, compile_ops, unit_offset=qk_norm == "rms_unit_offset")
            self.k_norm = RMSNorm(head_dim, norm_eps, compile_ops, unit_offset=qk_norm == "rms_unit_offset")
        self.rotary = None if spec.rope is None else RotaryEmbedding(head_dim, max_position, spec.rope, compile_ops)
        # Norm and rotary of q and k: one Triton kernel where Triton runs the attention (it splits each head
        # in power-of-two halves and rotates all of it), else one compiled function for the q/k norm + rotary,
        # else rotary alone.
        self._triton_norm_rotary = None
        is_full_rotary = self.rotary is not None and self.rotary.rotary_dim == head_dim
        if kernels.triton_rotary and is_full_rotary and head_dim & (head_dim - 1) == 0:
            from nanovllm.kernels.triton_rotary import norm_rotary_triton  # imports Triton: only when chosen

            self._triton_norm_rotary = norm_rotary_triton
        self._norm_and_rotate = maybe_compile(norm_and_rotate, compile_ops)
        self.attn = Attention(
            self.num_heads, self.num_kv_heads, head_dim, spec.scale, kernels.attention, spec.sliding_window
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)  # [N, (num_heads + 2 * num_kv_heads) * head_dim]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # [N, num_heads, head_dim]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [N, num_kv_heads, head_dim]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self._norm_and_rotate_qk(positions, q, k)
        out = self.attn(q, k, v)  # [N, num_heads, head_dim]
        return self.o_proj(out.flatten(1, 2))  # [N, hidden_size]

    def _norm_and_rotate_qk(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [N, num_heads, head_dim] and k [N, num_kv_heads, head_dim] after their norms (if any) and rotary."""
        q_norm, k_norm = self.q_norm, self.k_norm
        if self._triton_norm_rotary is not None and self.rotary is not None:
            q_weight = None if q_norm is None else q_norm.weight
            k_weight = None if k_norm is None else k_norm.weight
            eps, unit_offset = (0.0, False) if q_norm is None else (q_norm.eps, q_norm.unit_offset)
            return self._triton_norm_rotary(
                positions, q, k, q_weight, k_weight, eps, self.rotary.cos, self.rotary.sin, unit_offset
            )
        if q_norm is not None and k_norm is not None:
            if self.rotary is None:
                return q_norm(q), k_norm(k)
            return self._norm_and_rotate(
                positions, q, k, q_norm.weight, k_norm.weight, q_norm.eps, self.rotary.cos, self.rotary.sin,
                q_norm.unit_offset,
            )  # fmt: skip
        return (q, k) if self.rotary is None else self.rotary(positions, q, k)


def norm_and_rotate(
    positions: torch.Tensor,  # [N]
    query: torch.Tensor,  # [N, num_heads, head_dim]
    key: torch.Tensor,  # [N, num_kv_heads, head_dim]
    q_weight: torch.Tensor,  # [head_dim]
    k_weight: torch.Tensor,  # [head_dim]
    eps: float,
    cos_table: torch.Tensor,  # [max_position, rotary_dim / 2]
    sin_table: torch.Tensor,
    unit_offset: bool = False,  # Gemma's (1 + w) norm weights
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of queries and keys, then rotary: what q_norm, k_norm and rotary do one after another.

    Compiled as one function, Inductor makes one kernel of the norm and rotation of each tensor:
    four small kernels per layer become two, and a decode step runs them in every layer.
    """
    query, key = rms_norm(query, q_weight, eps, unit_offset), rms_norm(key, k_weight, eps, unit_offset)
    return apply_rotary(positions, query, key, cos_table, sin_table)
