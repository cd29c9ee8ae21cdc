"""LLaMA (2, 3, 3.1, 3.2) and Mistral: the decoder every other model file here builds on.

input_ids -> embed -> [ norm -> self-attention -> +residual -> norm -> MLP -> +residual ] x L
          -> norm -> (last token of each sequence) -> LM head -> logits

Another family is a subclass that changes class attributes: the pieces (LayerNorm for RMSNorm, a plain
GELU MLP for the gated SiLU one, learned positions for rotary: GPT-2), the wiring of a layer (attention and
MLP side by side: Phi; a norm after each block too: Gemma 3), and how its config.json and checkpoint spell
things (docs/adding_a_model.md walks through one). Each layer passes the stream as (hidden_states, residual),
their sum being the usual residual stream, so the next norm can add them in the same kernel.
"""

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn

from nanovllm.kernels.backends import Kernels
from nanovllm.layers.attention_block import SelfAttentionBlock
from nanovllm.layers.embedding import ParallelLMHead, PositionEmbedding, VocabParallelEmbedding
from nanovllm.layers.layernorm import LayerNorm, RMSNorm, build_norm
from nanovllm.layers.mlp import MLP, GatedMLP
from nanovllm.layers.quantization.base import LinearQuantization
from nanovllm.models.arch import ModelArch, check_supported_options, parse_model_arch
from nanovllm.models.moe import sparse_moe_block
from nanovllm.models.quant_config import check_quant_method


@dataclass(frozen=True)
class DecoderOptions:
    """A family's choices that its config.json does not hold, the same in every layer."""

    norm: str  # kind of every norm of the model, one of layers/layernorm.NORM_KINDS
    qkv_bias: bool  # biases on the q, k and v projections
    o_bias: bool  # a bias on the attention's output projection
    qk_norm: bool  # a norm (of the model's kind) over each query and key head before rotary
    gated_mlp: bool  # down(act(gate) * up); else fc2(act(fc1)) with biases
    learned_positions: bool  # a learned position embedding added to the token embedding (GPT-2)
    embed_scale: float | None  # the token embeddings are multiplied by this (Gemma: sqrt(hidden_size))
    quant: LinearQuantization | None  # which linear layers hold quantized weights (layers/quantization/); None = none


def build_attention(arch: ModelArch, layer_idx: int, kernels: Kernels, options: DecoderOptions) -> SelfAttentionBlock:
    return SelfAttentionBlock(
        arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.layer_attention[layer_idx],
        arch.max_position_embeddings, arch.norm_eps, kernels, options.qkv_bias, options.o_bias,
        options.norm if options.qk_norm else None, options.quant, f"model.layers.{layer_idx}.self_attn",
    )  # fmt: skip


def build_decoder_norm(arch: ModelArch, kernels: Kernels, options: DecoderOptions) -> RMSNorm | LayerNorm:
    """A norm over the hidden states, of the family's kind."""
    return build_norm(options.norm, arch.hidden_size, arch.norm_eps, kernels.compile_ops, kernels.triton_norms)


def build_mlp(arch: ModelArch, layer_idx: int, kernels: Kernels, options: DecoderOptions) -> nn.Module:
    """The layer's MLP: a mixture of experts on a sparse layer (models/moe.py), else gated or plain."""
    if arch.moe is not None and arch.moe.is_sparse(layer_idx):
        return sparse_moe_block(arch.hidden_size, arch.moe, kernels)
    if options.gated_mlp:
        return GatedMLP(
            arch.hidden_size, arch.intermediate_size, kernels.compile_ops, arch.hidden_act, options.quant,
            f"model.layers.{layer_idx}.mlp", kernels.triton_activation,
        )  # fmt: skip
    return MLP(
        arch.hidden_size, arch.intermediate_size, kernels.compile_ops, arch.hidden_act, options.quant,
        f"model.layers.{layer_idx}.mlp",
    )  # fmt: skip


def add_and_norm(
    norm: RMSNorm | LayerNorm, hidden_states: torch.Tensor, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's input: (norm of the stream, the stream), the stream being hidden_states + residual."""
    if residual is None:  # the first layer: the stream is the embeddings
        return norm(hidden_states), hidden_states
    return norm.forward_with_residual(hidden_states, residual)


class DecoderLayer(nn.Module):
    """Pre-norm: stream + attention(norm(stream)), then + MLP(norm(stream))."""

    def __init__(self, arch: ModelArch, layer_idx: int, kernels: Kernels, options: DecoderOptions) -> None:
        super().__init__()
        self.input_layernorm = build_decoder_norm(arch, kernels, options)
        self.self_attn = build_attention(arch, layer_idx, kernels, options)
        self.post_attention_layernorm = build_decoder_norm(arch, kernels, options)
        self.mlp = build_mlp(arch, layer_idx, kernels, options)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states, residual = add_and_norm(self.input_layernorm, hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm.forward_with_residual(hidden_states, residual)
        return self.mlp(hidden_states), residual


class DecoderModel(nn.Module):
    def __init__(self, arch: ModelArch, kernels: Kernels, options: DecoderOptions, layer_cls: type[nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, options.embed_scale)
        self.embed_positions = None
        if options.learned_positions:
            self.embed_positions = PositionEmbedding(arch.max_position_embeddings, arch.hidden_size)
        self.layers = nn.ModuleList(layer_cls(arch, idx, kernels, options) for idx in range(arch.num_layers))
        self.norm = build_decoder_norm(arch, kernels, options)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # [N] -> [N, hidden]
        hidden_states = self.embed_tokens(input_ids)
        if self.embed_positions is not None:
            hidden_states = hidden_states + self.embed_positions(positions)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        assert residual is not None, "a decoder has at least one layer"
        hidden_states, _ = self.norm.forward_with_residual(hidden_states, residual)
        return hidden_states


def rename(name: str, renames: tuple[tuple[str, str], ...]) -> str:
    """``name`` with each (old, new) substring of ``renames`` replaced, in order."""
    for old, new in renames:
        name = name.replace(old, new)
    return name


class LlamaForCausalLM(nn.Module):
    """LLaMA-style causal LM; the class attributes below are what other families change."""

    # Checkpoint tensors that land inside one of our fused parameters: name -> (fused name, part).
    packed_modules_mapping: dict[str, tuple[str, int | str]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    checkpoint_renames: ClassVar[tuple[tuple[str, str], ...]] = ()  # (checkpoint's, ours) module name pieces
    # Modules the checkpoint keeps fused that we load as separate layers, in our names: fused -> its parts in order.
    fused_checkpoint_modules: ClassVar[dict[str, tuple[str, ...]]] = {}
    # config.json: the family's key spellings -> transformers' usual ones; values it leaves out; options it may
    # set, with the values this implementation runs (anything else is refused before weights load).
    config_aliases: ClassVar[dict[str, str]] = {}
    config_defaults: ClassVar[dict[str, Any]] = {}
    supported_options: ClassVar[dict[str, tuple[Any, ...]]] = {"mlp_bias": (False,)}
    # quantization_config's quant_methods (models/quant_config.py) its checkpoints load in; None: every one.
    quant_methods: ClassVar[tuple[str, ...] | None] = None
    has_rotary: ClassVar[bool] = True  # False: no rotary (GPT-2's learned positions)
    # The decoder's pieces (DecoderOptions); None biases follow config.json's attention_bias.
    norm = "rms"
    qkv_bias: bool | None = None
    o_bias: bool | None = None
    qk_norm = False
    gated_mlp = True
    learned_positions = False
    scales_embeddings = False  # multiply the token embeddings by sqrt(hidden_size)
    lm_head_bias = False
    layer_cls: ClassVar[type[nn.Module]] = DecoderLayer  # built as layer_cls(arch, layer_idx, kernels, options)

    def __init__(self, arch: ModelArch, kernels: Kernels, quant: LinearQuantization | None = None) -> None:
        super().__init__()
        if quant is not None:  # its targets and ignore lists name modules as the checkpoint does
            quant = replace(quant, module_renames=self.quant_module_renames())
        self.model = DecoderModel(arch, kernels, self.decoder_options(arch, quant), self.layer_cls)
        self.lm_head = ParallelLMHead(
            arch.vocab_size, arch.hidden_size, self.lm_head_bias, arch.final_logit_softcapping
        )
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def quant_module_renames(cls) -> tuple[tuple[str, str], ...]:
        """(ours, the checkpoint's) module name pieces (LinearQuantization.module_renames): each of our layers
        to the fused module holding it, then checkpoint_renames undone in reverse order."""
        unfused = [(part, fused) for fused, parts in cls.fused_checkpoint_modules.items() for part in parts]
        return (*unfused, *((ours, theirs) for theirs, ours in reversed(cls.checkpoint_renames)))

    @classmethod
    def read_arch(cls, config: dict[str, Any]) -> ModelArch:
        """The ModelArch of this family's config.json, or an error naming an option it does not run."""
        config = {cls.config_aliases.get(key, key): value for key, value in config.items()}
        for key, value in cls.config_defaults.items():
            config.setdefault(key, value)
        check_supported_options(config, cls.supported_options, cls.__name__)
        arch = parse_model_arch(config, cls.has_rotary)
        check_quant_method(arch.quantization, cls.quant_methods, cls.__name__)
        return arch

    def decoder_options(self, arch: ModelArch, quant: LinearQuantization | None) -> DecoderOptions:
        return DecoderOptions(
            quant=quant,
            norm=self.norm,
            qkv_bias=arch.attention_bias if self.qkv_bias is None else self.qkv_bias,
            o_bias=arch.attention_bias if self.o_bias is None else self.o_bias,
            qk_norm=self.qk_norm,
            gated_mlp=self.gated_mlp,
            learned_positions=self.learned_positions,
            embed_scale=arch.hidden_size**0.5 if self.scales_embeddings else None,
        )

    def checkpoint_tensors(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """Checkpoint tensor -> what it holds under our module names (models/loader.py maps fused parts)."""
        yield rename(name, self.checkpoint_renames), tensor

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # [N, hidden]
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [B, hidden] -> [B, vocab]
        return self.lm_head(hidden_states)
