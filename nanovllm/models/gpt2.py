"""GPT-2: LLaMA's pre-norm decoder as it first was: LayerNorm, a plain GELU MLP, biases everywhere, and
learned absolute positions added to the token embeddings instead of rotary.

Its checkpoint names modules its own way (transformer.h.N.attn.c_attn, ...), keeps q, k and v in one
tensor, and stores every linear weight transposed, [in, out] (the Conv1D layout of the original code).
Quantized GPT-2 checkpoints are GPTQ (AutoGPTQ packs a Conv1D layer as it packs an nn.Linear one); other
formats are refused while config.json is read (``quant_methods``).
"""

from collections.abc import Iterator

import torch

from nanovllm.models.llama import LlamaForCausalLM, rename

# Buffers older checkpoints saved beside the weights: the causal mask, which holds nothing to load.
MASK_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# The tensors of a linear layer, by name suffix -> the dimension that runs over output features, along which
# c_attn holds q, k and v one after another; None: one entry per input feature (GPTQ's g_idx), the same for all
# three. Conv1D's weight [in, out] is transposed to our [out, in] as it loads; GPTQ's qweight [in / P, out],
# qzeros [in / group, out / P] and scales [in / group, out] are already the layout their reader takes
# (layers/quantization/int_layouts.py), so they are split along their outputs, never transposed.
LAYER_TENSOR_OUTPUT_DIMS = {"weight": 1, "bias": 0, "qweight": 1, "qzeros": 1, "scales": 1, "g_idx": None}
QKV_PARTS = (".q_proj.", ".k_proj.", ".v_proj.")  # c_attn's outputs, in order, each hidden_size wide


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
    quant_methods = ("gptq",)  # the linear tensors' layouts LAYER_TENSOR_OUTPUT_DIMS knows
    has_rotary = False
    norm = "layer"
    qkv_bias = o_bias = True
    gated_mlp = False
    learned_positions = True

    def checkpoint_tensors(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        if name.endswith(MASK_BUFFER_SUFFIXES):
            return
        if not name.startswith(("transformer.", "lm_head.")):  # the hub's gpt2 checkpoints drop the prefix
            name = "transformer." + name
        ours = rename(name, self.checkpoint_renames)
        if ".self_attn." in ours or ".mlp." in ours:
            yield from linear_layer_tensors(name, ours, tensor)
        else:
            yield ours, tensor


def linear_layer_tensors(name: str, ours: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """One tensor of a linear layer (checkpoint ``name``, ``ours`` renamed) in our layout. c_attn's is cut along
    its outputs into equal thirds, packed words too: q, k and v are each hidden_size wide (a key/value head per
    query head)."""
    suffix = name.rsplit(".", 1)[-1]
    if suffix not in LAYER_TENSOR_OUTPUT_DIMS:
        raise ValueError(
            f"checkpoint tensor {name!r} is not one GPT-2's linear layers hold; they hold "
            f"{sorted(LAYER_TENSOR_OUTPUT_DIMS)} (the float weight and bias, or GPTQ's tensors)"
        )
    output_dim = LAYER_TENSOR_OUTPUT_DIMS[suffix]
    if suffix == "weight":
        tensor, output_dim = tensor.t(), 0  # Conv1D's [in, out] -> [out, in]
    if ".qkv_proj." not in ours:
        yield ours, tensor
    elif output_dim is None:
        yield from ((ours.replace(".qkv_proj.", part), tensor) for part in QKV_PARTS)
    elif tensor.shape[output_dim] % len(QKV_PARTS):
        raise ValueError(
            f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}: its dimension {output_dim} (q, k and v "
            "one after another) does not split in three"
        )
    else:
        pieces = tensor.chunk(len(QKV_PARTS), output_dim)  # [..., hidden (or hidden / P), ...] each
        yield from ((ours.replace(".qkv_proj.", part), piece) for part, piece in zip(QKV_PARTS, pieces, strict=True))
