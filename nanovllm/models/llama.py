"""LLaMA (2, 3, 3.1, 3.2) and Mistral: the decoder every other model file here builds on.

input_ids -> embed -> [ RMSNorm -> self-attention -> +residual -> RMSNorm -> gated MLP -> +residual ] x L
          -> RMSNorm -> (last token of each sequence) -> LM head -> logits
"""

import torch
from torch import nn

from nanovllm.kernels.backends import Kernels
from nanovllm.layers.attention_block import SelfAttentionBlock
from nanovllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.mlp import GatedMLP
from nanovllm.models.arch import ModelArch


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, kernels: Kernels, qkv_bias: bool, o_bias: bool, qk_norm: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, kernels.compile_ops)
        self.self_attn = SelfAttentionBlock(
            arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.rope, arch.max_position_embeddings,
            arch.rms_norm_eps, kernels, qkv_bias, o_bias, qk_norm,
        )  # fmt: skip
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, kernels.compile_ops)
        self.mlp = GatedMLP(arch.hidden_size, arch.intermediate_size, kernels.compile_ops)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            hidden_states, residual = self.input_layernorm(hidden_states), hidden_states
        else:
            hidden_states, residual = self.input_layernorm.forward_with_residual(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm.forward_with_residual(hidden_states, residual)
        return self.mlp(hidden_states), residual


class DecoderModel(nn.Module):
    def __init__(self, arch: ModelArch, kernels: Kernels, qkv_bias: bool, o_bias: bool, qk_norm: bool):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(arch, kernels, qkv_bias, o_bias, qk_norm) for _ in range(arch.num_layers)
        )
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, kernels.compile_ops)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # [N] -> [N, hidden]
        hidden_states = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        assert residual is not None, "a decoder has at least one layer"
        hidden_states, _ = self.norm.forward_with_residual(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    """LLaMA-style causal LM. Subclasses switch on the q/k/v bias (Qwen2) or per-head q/k norm (Qwen3)."""

    # Checkpoint tensors that land inside one of our fused parameters: name -> (fused name, part).
    packed_modules_mapping: dict[str, tuple[str, int | str]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    qkv_bias: bool | None = None  # None: follow config.json's attention_bias
    qk_norm = False

    def __init__(self, arch: ModelArch, kernels: Kernels) -> None:
        super().__init__()
        qkv_bias = arch.attention_bias if self.qkv_bias is None else self.qkv_bias
        self.model = DecoderModel(arch, kernels, qkv_bias, arch.attention_bias, self.qk_norm)
        self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # [N, hidden]
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [B, hidden] -> [B, vocab]
        return self.lm_head(hidden_states)
