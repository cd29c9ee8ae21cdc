# mypy: disable-error-code="no-untyped-def"
# (@triton.jit kernels take untyped pointers and scalars; the Python wrappers are typed.)
"""A mixture-of-experts router's softmax, top-k and renormalisation in one Triton launch.

Same result as nanovllm.layers.moe.route_tokens (the torch reference: softmax in float32, torch.topk, divide by
the sum), which is four or five launches; at decode each is a few microseconds for a few KB, and a model runs
it in every sparse layer (48 in Qwen3-30B-A3B). One program per token:

    logits [num_experts] -> probs = softmax in float32 -> k times: the largest prob, its expert, then masked out
                         -> topk_weights [top_k] (divided by their sum when renormalising), topk_ids [top_k]

Experts come out most probable first, as torch.topk gives them; of equal probabilities the lower expert first.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _route_kernel(
    logits_ptr,  # [N, num_experts]
    topk_weights_ptr,  # [N, TOP_K] float32, written
    topk_ids_ptr,  # [N, TOP_K] int64, written
    num_experts,
    stride_logits_row,
    TOP_K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_E: tl.constexpr,  # num_experts rounded up to a power of two
    BLOCK_K: tl.constexpr,  # TOP_K rounded up to a power of two
):
    """Token ``program_id(0)``'s top_k experts and their weights."""
    token = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, BLOCK_E)  # [BLOCK_E]
    is_expert = experts < num_experts
    logits = tl.load(logits_ptr + token * stride_logits_row + experts, mask=is_expert, other=float("-inf"))
    logits = logits.to(tl.float32)  # [BLOCK_E]
    exps = tl.exp(logits - tl.max(logits, 0))  # [BLOCK_E], 0 past num_experts
    probs = exps / tl.sum(exps, 0)  # [BLOCK_E]
    choices = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    topk_weights = tl.zeros([BLOCK_K], dtype=tl.float32)
    topk_ids = tl.zeros([BLOCK_K], dtype=tl.int64)
    remaining = tl.where(is_expert, probs, -1.0)  # [BLOCK_E]; probs are >= 0, so -1 is never chosen
    for choice in tl.static_range(TOP_K):
        best_prob, best_expert = tl.max(remaining, 0, return_indices=True)  # ties: the lowest index
        topk_weights = tl.where(choices == choice, best_prob, topk_weights)
        topk_ids = tl.where(choices == choice, best_expert.to(tl.int64), topk_ids)
        remaining = tl.where(experts == best_expert, -1.0, remaining)
    if RENORMALIZE:
        topk_weights = topk_weights / tl.sum(topk_weights, 0)  # the zeros past TOP_K add nothing
    is_choice = choices < TOP_K
    tl.store(topk_weights_ptr + token * TOP_K + choices, topk_weights, mask=is_choice)
    tl.store(topk_ids_ptr + token * TOP_K + choices, topk_ids, mask=is_choice)


def route_tokens_triton(
    router_logits: torch.Tensor,  # [N, num_experts]
    top_k: int,
    renormalize: bool,  # divide the top_k weights by their sum
) -> tuple[torch.Tensor, torch.Tensor]:  # topk_weights [N, top_k] float32, topk_ids [N, top_k] int64
    """Each token's top_k experts by softmax probability, as route_tokens chooses them (see the module docstring)."""
    num_tokens, num_experts = router_logits.shape
    topk_weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    topk_ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=router_logits.device)
    if num_tokens == 0:
        return topk_weights, topk_ids
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    _route_kernel[(num_tokens,)](
        logits, topk_weights, topk_ids, num_experts, logits.stride(0),
        TOP_K=top_k, RENORMALIZE=renormalize, BLOCK_E=triton.next_power_of_2(num_experts),
        BLOCK_K=triton.next_power_of_2(top_k),
    )  # fmt: skip
    return topk_weights, topk_ids
