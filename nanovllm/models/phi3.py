"""Phi-3 (and Phi-4-mini): LLaMA's decoder, with q/k/v and gate/up each stored as one tensor in the checkpoint.

Its configs may set a sliding window (Phi-3-mini: 2047), a partial rotary factor (Phi-4-mini: 0.75) and
LongRoPE scaling (the 128k-context models): config.json's fields, read for every family in models/arch.py.
Quantized checkpoints keep the fused tensors in their own layout (GPTQ's qweight [in / 8, q + k + v] ...):
each is cut along the dim its format keeps the outputs in (models/fused_tensors.py).
"""

from collections.abc import Iterator

import torch

from nanovllm.kernels.backends import Kernels
from nanovllm.layers.quantization.base import LinearQuantization
from nanovllm.models.arch import ModelArch
from nanovllm.models.fused_tensors import FusedModules
from nanovllm.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    # quantization_config names the fused modules (an ignore list holding "model.layers.0.self_attn.qkv_proj").
    quant_module_renames = (
        (".self_attn.q_proj.", ".self_attn.qkv_proj."),
        (".self_attn.k_proj.", ".self_attn.qkv_proj."),
        (".self_attn.v_proj.", ".self_attn.qkv_proj."),
        (".mlp.gate_proj.", ".mlp.gate_up_proj."),
        (".mlp.up_proj.", ".mlp.gate_up_proj."),
    )

    def __init__(self, arch: ModelArch, kernels: Kernels, quant: LinearQuantization | None = None) -> None:
        super().__init__(arch, kernels, quant)
        q_size, kv_size = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        # The outputs of each fused checkpoint tensor, in order: split so each part is sharded as LLaMA's is.
        self.fused = FusedModules(
            {
                ".qkv_proj.": [(".q_proj.", q_size), (".k_proj.", kv_size), (".v_proj.", kv_size)],
                ".gate_up_proj.": [(".gate_proj.", arch.intermediate_size), (".up_proj.", arch.intermediate_size)],
            },
            quant,
        )

    def checkpoint_tensors(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.fused.cut(name, tensor)
