"""GPT-2: LLaMA's pre-norm decoder as it first was: LayerNorm, a plain GELU MLP, biases everywhere, and
learned absolute positions added to the token embeddings instead of rotary.

Its checkpoint names modules its own way (transformer.h.N.attn.c_attn, ...), keeps q, k and v in one
tensor, and stores every linear weight transposed, [in, out] (the Conv1D layout of the original code).
Quantized GPT-2 checkpoints are GPTQ (AutoGPTQ packs a Conv1D layer as it packs an nn.Linear one); other
formats are refused while config.json is read (``quant_methods``).
"""

from collections.abc import Iterator

import torch

from nanovllm.kernels.backends import Kernels
from nanovllm.layers.quantization.base import LinearQuantization
from nanovllm.models.arch import ModelArch
from nanovllm.models.fused_tensors import FusedModules, fused_parts
from nanovllm.models.llama import LlamaForCausalLM, rename

# Buffers older checkpoints saved beside the weights: the causal mask, which holds nothing to load.
MASK_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")
FLOAT_TENSORS = ("weight", "bias")  # a float linear layer's; the weight is Conv1D's [in, out], transposed as it loads


class GPT2LMHeadModel(LlamaForCausalLM):
    checkpoint_renames = (
        ("transformer.", "model."),
        (".h.", ".layers."),
        (".ln_1.", ".input_layernorm."),
        (".ln_2.", ".post_attention_layernorm."),
        (".attn.c_attn.", ".self_attn.qkv_proj."),
        (".attn.c_proj.", ".self_attn.o_proj."),
        (".mlp.c_fc.", ".mlp.fc1."),
        (".mlp.c_proj.", ".mlp.fc2."),
        ("model.wte.", "model.embed_tokens."),
        ("model.wpe.", "model.embed_positions."),
        ("model.ln_f.", "model.norm."),
    )
    fused_checkpoint_modules = {  # c_attn, as checkpoint_renames names it
        ".self_attn.qkv_proj.": (".self_attn.q_proj.", ".self_attn.k_proj.", ".self_attn.v_proj.")
    }
    config_aliases = {
        "n_embd": "hidden_size",
        "n_layer": "num_hidden_layers",
        "n_head": "num_attention_heads",
        "n_positions": "max_position_embeddings",
        "n_inner": "intermediate_size",
        "layer_norm_epsilon": "layer_norm_eps",
        "activation_function": "hidden_act",
    }
    config_defaults = {"hidden_act": "gelu_new", "layer_norm_eps": 1e-5, "tie_word_embeddings": True}
    supported_options = {"add_cross_attention": (False,)}
    quant_methods = ("gptq",)  # the only format published for its Conv1D layers (AutoGPTQ packs them as nn.Linear)
    has_rotary = False
    norm = "layer"
    qkv_bias = o_bias = True
    gated_mlp = False
    learned_positions = True

    def __init__(self, arch: ModelArch, kernels: Kernels, quant: LinearQuantization | None = None) -> None:
        super().__init__(arch, kernels, quant)
        # c_attn's outputs, in order. GPTQ's qweight [in / P, out], qzeros [in / group, out / P] and scales
        # [in / group, out] are already the layout their reader takes, never transposed; c_attn's are cut along
        # their outputs (layers/quantization/int_layouts.py).
        sizes = {".self_attn.qkv_proj.": (arch.hidden_size,) * 3}
        self.fused = FusedModules(fused_parts(self.fused_checkpoint_modules, sizes), quant)

    def checkpoint_tensors(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        if name.endswith(MASK_BUFFER_SUFFIXES):
            return
        if not name.startswith(("transformer.", "lm_head.")):  # the hub's gpt2 checkpoints drop the prefix
            name = "transformer." + name
        ours = rename(name, self.checkpoint_renames)
        if ".self_attn." not in ours and ".mlp." not in ours:
            yield ours, tensor
            return
        suffix = name.rsplit(".", 1)[-1]
        if suffix == "weight" and tensor.dim() == 2:
            tensor = tensor.t()  # Conv1D's [in, out] -> [out, in]
        if suffix not in FLOAT_TENSORS and suffix not in self.fused.splits:
            raise ValueError(
                f"checkpoint tensor {name!r} is not one GPT-2's linear layers hold; they hold "
                f"{sorted({*FLOAT_TENSORS, *self.fused.splits})} (the float weight and bias, or GPTQ's tensors)"
            )
        yield from self.fused.cut(ours, tensor)
