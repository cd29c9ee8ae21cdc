"""Qwen3 (dense): LLaMA with an RMSNorm over each query and key head before rotary."""

from nanovllm.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
