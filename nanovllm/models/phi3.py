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
from nanovllm.models.fused_tensors import FusedModules, fused_parts
from nanovllm.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    fused_checkpoint_modules = {
        ".self_attn.qkv_proj.": (".self_attn.q_proj.", ".self_attn.k_proj.", ".self_attn.v_proj."),
        ".mlp.gate_up_proj.": (".mlp.gate_proj.", ".mlp.up_proj."),
    }

    def __init__(self, arch: ModelArch, kernels: Kernels, quant: LinearQuantization | None = None) -> None:
        super().__init__(arch, kernels, quant)
        q_size, kv_size = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        # The outputs of each fused checkpoint tensor, in order: split so each part is sharded as LLaMA's is.
        sizes = {
            ".self_attn.qkv_proj.": (q_size, kv_size, kv_size),
            ".mlp.gate_up_proj.": (arch.intermediate_size,) * 2,
        }
        self.fused = FusedModules(fused_parts(self.fused_checkpoint_modules, sizes), quant)

    def checkpoint_tensors(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.fused.cut(name, tensor)
