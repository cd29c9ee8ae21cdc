"""Gemma 3 (text): LLaMA's decoder with a norm after each block as well as before it, (1 + w) RMSNorm
weights, q/k norms, GeGLU, embeddings scaled by sqrt(hidden_size), and sliding-window layers interleaved
with global ones, each kind with its own rotary base.

    stream -> norm -> self-attention -> norm -+-> + stream -> norm -> MLP -> norm -+-> + stream

Which layers slide (config.json's layer_types, or every sliding_window_pattern-th layer global), their
window and their rotary (rope_parameters per layer type, or rope_local_base_freq) are read in models/arch.py.
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


class SandwichDecoderLayer(nn.Module):
    """stream + norm(attention(norm(stream))), then + norm(MLP(norm(stream)))."""

    def __init__(self, arch: ModelArch, layer_idx: int, kernels: Kernels, options: DecoderOptions) -> None:
        super().__init__()
        self.input_layernorm = build_decoder_norm(arch, kernels, options)
        self.self_attn = build_attention(arch, layer_idx, kernels, options)
        self.post_attention_layernorm = build_decoder_norm(arch, kernels, options)
        self.pre_feedforward_layernorm = build_decoder_norm(arch, kernels, options)
        self.mlp = build_mlp(arch, layer_idx, kernels, options)
        self.post_feedforward_layernorm = build_decoder_norm(arch, kernels, options)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states, residual = add_and_norm(self.input_layernorm, hidden_states, residual)
        hidden_states = self.post_attention_layernorm(self.self_attn(positions, hidden_states))
        hidden_states, residual = self.pre_feedforward_layernorm.forward_with_residual(hidden_states, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden_states)), residual


class Gemma3ForCausalLM(LlamaForCausalLM):
    config_aliases = {"hidden_activation": "hidden_act"}
    # transformers' Gemma3TextConfig defaults, for config.json files that leave them out.
    config_defaults = {
        "hidden_act": "gelu_pytorch_tanh",
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "sliding_window_pattern": 6,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "tie_word_embeddings": True,
    }
    supported_options = {"attn_logit_softcapping": (None,), "use_bidirectional_attention": (False, None)}
    norm = "rms_unit_offset"
    qk_norm = True
    scales_embeddings = True
    layer_cls = SandwichDecoderLayer
