"""The mixture-of-experts fields of a ``config.json``, read and checked once, before any weight loads.

Each family spells them its own way; both become one :class:`MoeArch`:

    field                      Qwen3MoeForCausalLM                       MixtralForCausalLM
    experts per sparse layer   num_experts (transformers 5: num_local_experts)   num_local_experts
    experts per token          num_experts_per_tok                       num_experts_per_tok
    one expert's width         moe_intermediate_size                     intermediate_size
    renormalise the top-k      norm_topk_prob (default false)            always
    sparse layers              not in mlp_only_layers, and (i + 1) % decoder_sparse_step == 0   all

Mixtral's ``router_jitter_noise`` multiplies the hidden states by noise in training only: inference ignores it,
as transformers does in eval mode.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SUPPORTED_EXPERT_ACTIVATIONS = ("silu",)  # the experts' gated MLP is silu(gate) * up, as in both families
# transformers' defaults for the Qwen3-MoE fields a config.json may leave out (Qwen3MoeConfig).
QWEN3_MOE_DEFAULTS = {"norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": []}


@dataclass(frozen=True)
class MoeArch:
    num_experts: int  # experts in each sparse layer
    num_experts_per_tok: int  # experts each token is routed to (the router's top-k)
    moe_intermediate_size: int  # width of one expert's gated MLP
    norm_topk_prob: bool  # the top-k routing weights are renormalised to sum to 1
    sparse_layer_ids: tuple[int, ...]  # decoder layers whose MLP is the mixture; the others keep the dense MLP

    def is_sparse(self, layer_idx: int) -> bool:
        return layer_idx in self.sparse_layer_ids


def _positive_int(config: dict[str, Any], field: str, architecture: str) -> int:
    if field not in config:
        raise ValueError(f"config.json of {architecture} lacks {field!r}; a mixture-of-experts model needs it")
    value = config[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config.json field {field}={value!r} must be a positive integer")
    return value


def _qwen3_moe(config: dict[str, Any], num_layers: int) -> MoeArch:
    architecture = "Qwen3MoeForCausalLM"
    experts_field = "num_experts" if "num_experts" in config else "num_local_experts"
    fields = {**QWEN3_MOE_DEFAULTS, **config}
    step = _positive_int(fields, "decoder_sparse_step", architecture)
    mlp_only_layers = fields["mlp_only_layers"]
    if not isinstance(mlp_only_layers, list) or not all(
        isinstance(idx, int) and 0 <= idx < num_layers for idx in mlp_only_layers
    ):
        raise ValueError(
            f"config.json field mlp_only_layers={mlp_only_layers!r} must list layer indices in "
            f"[0, num_hidden_layers={num_layers}); fix the list or leave it empty"
        )
    if not isinstance(fields["norm_topk_prob"], bool):
        raise ValueError(f"config.json field norm_topk_prob={fields['norm_topk_prob']!r} must be true or false")
    sparse = tuple(i for i in range(num_layers) if i not in mlp_only_layers and (i + 1) % step == 0)
    return MoeArch(
        num_experts=_positive_int(config, experts_field, architecture),
        num_experts_per_tok=_positive_int(config, "num_experts_per_tok", architecture),
        moe_intermediate_size=_positive_int(config, "moe_intermediate_size", architecture),
        norm_topk_prob=fields["norm_topk_prob"],
        sparse_layer_ids=sparse,
    )


def _mixtral(config: dict[str, Any], num_layers: int) -> MoeArch:
    architecture = "MixtralForCausalLM"
    return MoeArch(
        num_experts=_positive_int(config, "num_local_experts", architecture),
        num_experts_per_tok=_positive_int(config, "num_experts_per_tok", architecture),
        moe_intermediate_size=_positive_int(config, "intermediate_size", architecture),
        norm_topk_prob=True,  # Mixtral's router always renormalises its top-k
        sparse_layer_ids=tuple(range(num_layers)),
    )


# Architectures whose MLPs are mixtures of experts -> how their config.json spells the MoE fields.
MOE_READERS: dict[str, Callable[[dict[str, Any], int], MoeArch]] = {
    "Qwen3MoeForCausalLM": _qwen3_moe,
    "MixtralForCausalLM": _mixtral,
}


def parse_moe(config: dict[str, Any], architecture: str, num_layers: int) -> MoeArch | None:
    """The MoE fields of ``config`` for ``architecture``; None for a dense architecture. Errors name the field."""
    reader = MOE_READERS.get(architecture)
    if reader is None:
        return None
    activation = config.get("hidden_act", "silu")
    if activation not in SUPPORTED_EXPERT_ACTIVATIONS:
        raise ValueError(
            f"config.json field hidden_act={activation!r} is not supported for {architecture}'s experts; "
            f"supported: {SUPPORTED_EXPERT_ACTIVATIONS}"
        )
    moe = reader(config, num_layers)
    if moe.num_experts_per_tok > moe.num_experts:
        raise ValueError(
            f"config.json field num_experts_per_tok={moe.num_experts_per_tok} exceeds the {moe.num_experts} "
            f"experts of {architecture}; it must be between 1 and {moe.num_experts}"
        )
    return moe
