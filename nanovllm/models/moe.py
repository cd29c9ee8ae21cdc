"""What the mixture-of-experts families share: the sparse layers' MLP, and where the checkpoint's per-expert
tensors land.

A checkpoint stores every expert separately; our layer stacks them (layers/moe.py), so each tensor loads as one
part of a stacked parameter:

    layers.3.mlp.experts.17.gate_proj.weight                ->  layers.3.mlp.experts.gate_up_proj, part (17, "gate")
    layers.3.block_sparse_moe.experts.5.w2.weight (Mixtral) ->  layers.3.mlp.experts.down_proj, part (5, "down")
"""

import re
from typing import Any

from nanovllm.kernels.backends import Kernels
from nanovllm.layers.moe import SparseMoeBlock
from nanovllm.models.moe_arch import MoeArch

# "<prefix>.experts.<expert index>.<projection>.weight", as the Hugging Face checkpoints of both families name them.
EXPERT_TENSOR = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<expert_idx>\d+)\.(?P<projection>\w+)\.weight$")
STACKED_PARAMS = {"gate": "gate_up_proj", "up": "gate_up_proj", "down": "down_proj"}  # projection -> parameter


def sparse_moe_block(hidden_size: int, moe: MoeArch, kernels: Kernels) -> SparseMoeBlock:
    """The MLP of a sparse decoder layer (``moe.is_sparse(layer_idx)``), with the kernel chosen for this engine."""
    return SparseMoeBlock(
        hidden_size, moe.moe_intermediate_size, moe.num_experts, moe.num_experts_per_tok, moe.norm_topk_prob,
        kernels.triton_moe,
    )  # fmt: skip


class ExpertCheckpointNames:
    """Mixed into a model class: its checkpoint's per-expert tensors mapped onto the stacked expert parameters."""

    # The checkpoint's name of each expert projection -> "gate", "up" or "down".
    expert_projections: dict[str, str] = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
    # Module names the checkpoint uses for ours, e.g. Mixtral's "block_sparse_moe" for "mlp".
    module_renames: dict[str, str] = {}

    def checkpoint_target(self, ckpt_name: str) -> tuple[str, Any] | None:
        """(parameter name, part) for a per-expert tensor, (renamed name, None) for another renamed one, or None
        when the name needs nothing of this (the loader's packed_modules_mapping then applies)."""
        name = ckpt_name
        for theirs, ours in self.module_renames.items():
            name = name.replace(f".{theirs}.", f".{ours}.")
        expert = EXPERT_TENSOR.match(name)
        if expert is not None and expert["projection"] in self.expert_projections:
            projection = self.expert_projections[expert["projection"]]
            return f"{expert['prefix']}.{STACKED_PARAMS[projection]}", (int(expert["expert_idx"]), projection)
        return None if name == ckpt_name else (name, None)
