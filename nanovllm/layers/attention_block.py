"""The self-attention block shared by the decoder models: projections, rotary, paged attention."""

import torch
from torch import nn

from nanovllm.kernels.backends import Kernels
from nanovllm.layers.attention import Attention
from nanovllm.layers.layernorm import RMSNorm, rms_norm
from nanovllm.layers.linear import QKVParallelLinear, RowParallelLinear
from nanovllm.layers.quantization.base import LinearQuantization
from nanovllm.layers.rotary import RopeConfig, RotaryEmbedding, apply_rotary
from nanovllm.utils.compile import maybe_compile


class SelfAttentionBlock(nn.Module):
    """qkv projection -> (optional per-head q/k RMSNorm, as in Qwen3) -> rotary -> attention -> o projection."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,  # query heads of the whole model (each rank holds its share)
        num_kv_heads: int,  # key/value heads of the whole model
        head_dim: int,
        rope: RopeConfig,
        max_position: int,  # longest context: the rotary tables' length
        rms_norm_eps: float,  # of the q/k norms
        kernels: Kernels,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: bool,  # an RMSNorm over each query and key head before rotary (Qwen3)
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
        self.q_norm = RMSNorm(head_dim, rms_norm_eps, compile_ops) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, rms_norm_eps, compile_ops) if qk_norm else None
        self.rotary = RotaryEmbedding(head_dim, max_position, rope, compile_ops)
        # Norm and rotary of q and k: one Triton kernel where Triton runs the attention (it splits each head
        # in power-of-two halves), else one compiled function for Qwen3's q/k norm + rotary, else rotary alone.
        self._triton_norm_rotary = None
        if kernels.triton_rotary and head_dim & (head_dim - 1) == 0:
            from nanovllm.kernels.triton_rotary import norm_rotary_triton  # imports Triton: only when chosen

            self._triton_norm_rotary = norm_rotary_triton
        self._norm_and_rotate = maybe_compile(norm_and_rotate, compile_ops)
        self.attn = Attention(self.num_heads, self.num_kv_heads, head_dim, head_dim**-0.5, kernels.attention)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)  # [N, (num_heads + 2 * num_kv_heads) * head_dim]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # [N, num_heads, head_dim]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [N, num_kv_heads, head_dim]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self._triton_norm_rotary is not None:
            q_weight = None if self.q_norm is None else self.q_norm.weight
            k_weight = None if self.k_norm is None else self.k_norm.weight
            eps = 0.0 if self.q_norm is None else self.q_norm.eps
            q, k = self._triton_norm_rotary(positions, q, k, q_weight, k_weight, eps, self.rotary.cos, self.rotary.sin)
        elif self.q_norm is not None and self.k_norm is not None:
            q, k = self._norm_and_rotate(
                positions, q, k, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, self.rotary.cos,
                self.rotary.sin,
            )  # fmt: skip
        else:
            q, k = self.rotary(positions, q, k)
        out = self.attn(q, k, v)  # [N, num_heads, head_dim]
        return self.o_proj(out.flatten(1, 2))  # [N, hidden_size]


def norm_and_rotate(
    positions: torch.Tensor,  # [N]
    query: torch.Tensor,  # [N, num_heads, head_dim]
    key: torch.Tensor,  # [N, num_kv_heads, head_dim]
    q_weight: torch.Tensor,  # [head_dim]
    k_weight: torch.Tensor,  # [head_dim]
    eps: float,
    cos_table: torch.Tensor,  # [max_position, head_dim / 2]
    sin_table: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of queries and keys, then rotary: what q_norm, k_norm and rotary do one after another.

    Compiled as one function, Inductor makes one kernel of the norm and rotation of each tensor:
    four small kernels per layer become two, and a decode step runs them in every layer.
    """
    return apply_rotary(positions, rms_norm(query, q_weight, eps), rms_norm(key, k_weight, eps), cos_table, sin_table)
