"""Phi (phi-1.5, phi-2): attention and MLP side by side on one LayerNorm, a plain GELU MLP, partial rotary,
and biases everywhere (q/k/v, the output projection, the MLP, the LM head).

    stream -> LayerNorm -> self-attention -+
                       \\-> MLP -----------+-> + stream
"""

import torch
from torch import nn

from nanovllm.kernels.backends import Kernels
from nanovllm.models.arch import ModelArch
from nanovllm.models.llama import (
    DecoderOptions,
    LlamaForCausalLM,
    add_and_norm,
    build_attention,
    build_decoder_norm,
    build_mlp,
)


class ParallelDecoderLayer(nn.Module):
    """stream + attention(norm(stream)) + MLP(norm(stream)): both blocks read the same normed input."""

    def __init__(self, arch: ModelArch, layer_idx: int, kernels: Kernels, options: DecoderOptions) -> None:
        super().__init__()
        self.input_layernorm = build_decoder_norm(arch, kernels, options)
        self.self_attn = build_attention(arch, layer_idx, kernels, options)
        self.mlp = build_mlp(arch, layer_idx, kernels, options)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        normed, residual = add_and_norm(self.input_layernorm, hidden_states, residual)
        return self.self_attn(positions, normed) + self.mlp(normed), residual


class PhiForCausalLM(LlamaForCausalLM):
    checkpoint_renames = ((".self_attn.dense.", ".self_attn.o_proj."), ("model.final_layernorm.", "model.norm."))
    config_defaults = {"hidden_act": "gelu_new", "partial_rotary_factor": 0.5, "layer_norm_eps": 1e-5}
    supported_options = {"qk_layernorm": (False,)}
    norm = "layer"
    qkv_bias = o_bias = True
    gated_mlp = False
    lm_head_bias = True
    layer_cls = ParallelDecoderLayer
