"""The experts of a mixture-of-experts layer in plain PyTorch: a loop over the experts.

What runs on CPU, and the oracle that the fused Triton kernel (kernels/triton_fused_moe.py) is tested
against. Each token was routed to ``top_k`` experts; its output is the routing-weighted sum of theirs:

    out[t] = sum_j topk_weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])),   e = topk_ids[t, j]

Expert weights are stacked (this rank's slice of each expert's intermediate dimension):
    gate_up_proj  [num_experts, 2 * intermediate, hidden]   gate rows, then up rows
    down_proj     [num_experts, hidden, intermediate]
"""

import torch
import torch.nn.functional as F


def fused_moe(
    hidden_states: torch.Tensor,  # [N, hidden]
    gate_up_proj: torch.Tensor,  # [num_experts, 2 * intermediate, hidden]
    down_proj: torch.Tensor,  # [num_experts, hidden, intermediate]
    topk_weights: torch.Tensor,  # [N, top_k] float32
    topk_ids: torch.Tensor,  # [N, top_k] int, expert of each choice
) -> torch.Tensor:  # [N, hidden]
    """Each expert's gated MLP over the tokens routed to it, weighted and added into their rows."""
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    for expert_idx in range(gate_up_proj.shape[0]):
        token_idx, choice_idx = (topk_ids == expert_idx).nonzero(as_tuple=True)  # [M] each
        if token_idx.numel() == 0:
            continue
        gate, up = F.linear(hidden_states[token_idx], gate_up_proj[expert_idx]).chunk(2, dim=-1)  # [M, I] each
        expert_out = F.linear(F.silu(gate) * up, down_proj[expert_idx])  # [M, hidden]
        # A token picks an expert at most once, so its row gets one addition per expert.
        out.index_put_((token_idx,), expert_out.float() * topk_weights[token_idx, choice_idx, None], accumulate=True)
    return out.to(hidden_states.dtype)
