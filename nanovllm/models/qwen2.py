"""Qwen2 and Qwen2.5: LLaMA with biases on the q/k/v projections (none on o_proj)."""

from nanovllm.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
