"""Mixtral: Mistral whose every MLP is a mixture of experts (8 experts, top-2, weights renormalised).

Its checkpoint calls the layer ``block_sparse_moe`` and each expert's gate, down and up ``w1``, ``w2``, ``w3``.
"""

from nanovllm.models.llama import LlamaForCausalLM
from nanovllm.models.moe import ExpertCheckpointNames


class MixtralForCausalLM(ExpertCheckpointNames, LlamaForCausalLM):
    expert_projections = {"w1": "gate", "w3": "up", "w2": "down"}
    module_renames = {"block_sparse_moe": "mlp"}
