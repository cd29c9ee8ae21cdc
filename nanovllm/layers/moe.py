"""The sparse mixture-of-experts MLP (Qwen3-MoE, Mixtral): a router sends each token to its top-k experts, and
their gated MLPs' outputs are summed, weighted by the router's probabilities.

    x [N, hidden] -> router logits [N, num_experts] -> softmax in float32 -> top-k -> renormalised (if asked)
                  -> topk_weights, topk_ids [N, top_k] -> the experts (kernels/fused_moe.py) -> [N, hidden]

Where Triton runs, the routing (kernels/triton_moe_routing.py) and the experts (kernels/triton_fused_moe.py) are
Triton kernels, and route_tokens and kernels/fused_moe.py are their references.

Tensor parallelism splits every expert's intermediate dimension I, as it splits the dense MLP's: each rank
holds rows [rank * I/tp, (rank + 1) * I/tp) of every expert's gate and up matrices and those columns of its
down matrix, computes a partial sum of every token's output, and an all-reduce adds the ranks' sums. The
router is replicated, so every rank routes every token alike.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nanovllm.kernels.fused_moe import fused_moe
from nanovllm.layers.linear import _make_param
from nanovllm.parallel.process_group import get_tensor_parallel

PROJECTIONS = ("gate", "up", "down")  # the parts of one expert that the checkpoint stores separately


@dataclass(frozen=True)
class ExpertRouting:
    topk_weights: torch.Tensor  # [N, top_k] float32: each token's weight for each of its experts
    topk_ids: torch.Tensor  # [N, top_k] int64: each token's experts, most probable first


def route_tokens(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> ExpertRouting:
    """As transformers routes: softmax over all experts in float32, the top_k, renormalised to sum to 1 when
    ``renormalize`` (Mixtral always, Qwen3-MoE when its config's norm_topk_prob says so)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # [N, num_experts]
    topk_weights, topk_ids = probs.topk(top_k, dim=-1)  # [N, top_k] each
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return ExpertRouting(topk_weights, topk_ids)


class Router(nn.Module):
    """The replicated linear map from hidden states to one logit per expert (checkpoint: ``mlp.gate``)."""

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, hidden_size] -> [N, num_experts]
        return F.linear(x, self.weight)


class StackedExperts(nn.Module):
    """Every expert's weights, this rank's slice, stacked as the fused kernel reads them:

    gate_up_proj [num_experts, 2 * I/tp, hidden]: this rank's gate rows, then its up rows
    down_proj    [num_experts, hidden, I/tp]

    The checkpoint stores each expert's gate, up and down separately; each loads as the part (expert, "gate").
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.tp = get_tensor_parallel()
        if intermediate_size % self.tp.size:
            raise ValueError(
                f"moe_intermediate_size {intermediate_size} is not divisible by tensor_parallel_size {self.tp.size}"
            )
        self.num_experts = num_experts
        self.size_per_rank = intermediate_size // self.tp.size  # this rank's share of each expert's width
        gate_up_parts = tuple((e, p) for e in range(num_experts) for p in PROJECTIONS[:2])
        down_parts = tuple((e, "down") for e in range(num_experts))
        size = self.size_per_rank
        self.gate_up_proj = _make_param(num_experts, 2 * size, hidden_size, loader=self.load, shard_ids=gate_up_parts)
        self.down_proj = _make_param(num_experts, hidden_size, size, loader=self.load, shard_ids=down_parts)

    def load(self, param: nn.Parameter, loaded: torch.Tensor, part: tuple[int, str]) -> None:
        """Copy this rank's slice of one expert's gate or up [I, hidden] or down [hidden, I] matrix."""
        expert_idx, projection = part
        if not 0 <= expert_idx < self.num_experts or projection not in PROJECTIONS:
            raise ValueError(
                f"checkpoint expert tensor ({expert_idx}, {projection!r}) is outside the {self.num_experts} experts "
                f"x {PROJECTIONS} that config.json describes; check num_experts (Mixtral: num_local_experts)"
            )
        size, start = self.size_per_rank, self.tp.rank * self.size_per_rank
        if projection == "down":
            param.data[expert_idx].copy_(loaded.narrow(1, start, size))
        else:
            offset = 0 if projection == "gate" else size
            param.data[expert_idx].narrow(0, offset, size).copy_(loaded.narrow(0, start, size))


class SparseMoeBlock(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,  # one expert's width (config: moe_intermediate_size)
        num_experts: int,
        top_k: int,  # experts per token
        renormalize: bool,  # the top-k weights are renormalised to sum to 1
        triton_kernel: bool = False,  # routing and experts in Triton kernels, else their torch references
    ) -> None:
        super().__init__()
        self.tp = get_tensor_parallel()
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = Router(hidden_size, num_experts)
        self.experts = StackedExperts(num_experts, hidden_size, intermediate_size)
        self._route = route_tokens
        self._fused_moe = fused_moe
        if triton_kernel:  # imports Triton: only when chosen
            from nanovllm.kernels.triton_fused_moe import fused_moe_triton
            from nanovllm.kernels.triton_moe_routing import route_tokens_triton

            self._route = lambda router_logits, top_k, renormalize: ExpertRouting(
                *route_tokens_triton(router_logits, top_k, renormalize)
            )
            self._fused_moe = fused_moe_triton

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [N, hidden_size] -> [N, hidden_size]
        routing = self._route(self.gate(hidden_states), self.top_k, self.renormalize)
        out = self._fused_moe(
            hidden_states, self.experts.gate_up_proj, self.experts.down_proj, routing.topk_weights, routing.topk_ids
        )  # [N, hidden_size], this rank's partial sum
        if self.tp.size > 1:
            dist.all_reduce(out)
        return out
