"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3 whose sparse layers' MLP is a mixture of experts.

Which layers are sparse, how many experts and how the router renormalises come from config.json
(models/moe_arch.py); the checkpoint names each expert ``mlp.experts.<i>.{gate,up,down}_proj``.
"""

from nanovllm.models.moe import ExpertCheckpointNames
from nanovllm.models.qwen3 import Qwen3ForCausalLM


class Qwen3MoeForCausalLM(ExpertCheckpointNames, Qwen3ForCausalLM):
    pass
