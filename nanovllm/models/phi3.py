"""Phi-3 (and Phi-4-mini): LLaMA's decoder, with q/k/v and gate/up each stored as one tensor in the checkpoint.

Its configs may set a sliding window (Phi-3-mini: 2047), a partial rotary factor (Phi-4-mini: 0.75) and
LongRoPE scaling (the 128k-context models): config.json's fields, read for every family in models/arch.py.
"""

from collections.abc import Iterator

import torch

from nanovllm.kernels.backends import Kernels
from nanovllm.layers.quantization.base import LinearQuantization
from nanovllm.models.arch import ModelArch
from nanovllm.models.llama import LlamaForCausalLM, split_rows


class Phi3ForCausalLM(LlamaForCausalLM):
    def __init__(self, arch: ModelArch, kernels: Kernels, quant: LinearQuantization | None = None) -> None:
        super().__init__(arch, kernels, quant)
        q_size, kv_size = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        # Rows of the fused checkpoint tensors, in order: split so each part is sharded as LLaMA's is.
        self.qkv_parts = [(".q_proj.", q_size), (".k_proj.", kv_size), (".v_proj.", kv_size)]
        self.gate_up_parts = [(".gate_proj.", arch.intermediate_size), (".up_proj.", arch.intermediate_size)]

    def checkpoint_tensors(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        if ".qkv_proj." in name:
            yield from split_rows(name, tensor, ".qkv_proj.", self.qkv_parts)
        elif ".gate_up_proj." in name:
            yield from split_rows(name, tensor, ".gate_up_proj.", self.gate_up_parts)
        else:
            yield name, tensor
