"""A PEFT LoRA adapter directory, read and checked against the base model's shapes.

    adapter_config.json          r, lora_alpha, use_rslora, target_modules, bias, ...
    adapter_model.safetensors    base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_A.weight  [r, in]
                                 ...                                              .lora_B.weight  [out, r]

    scaling = lora_alpha / r            (lora_alpha / sqrt(r) with use_rslora)

Every problem is a ValueError (a missing directory a FileNotFoundError) naming the adapter and what to change.
"""

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open

from nanovllm.lora_request import LoRARequest
from nanovllm.models.arch import ModelArch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT's name of a LoRA weight of a causal LM: the base model's module path, then lora_A or lora_B.
WEIGHT_NAME = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")
# adapter_config.json options that change what an adapter computes beyond scaling * x A^T B^T on the supported
# modules: refused when set.
UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA biases (lora_bias)",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trained token embeddings (trainable_token_indices)",
}


@dataclass(frozen=True)
class LoRAModuleWeights:
    """One adapted module's LoRA weights, whole (unsharded), in host memory."""

    lora_a: torch.Tensor  # [rank, in_features]
    lora_b: torch.Tensor  # [out_features, rank]


@dataclass(frozen=True)
class LoRAAdapter:
    """An adapter read from its directory and checked."""

    request: LoRARequest  # the adapter's name, id and directory
    rank: int  # r, <= max_lora_rank
    scaling: float  # what x A^T B^T is multiplied by
    modules: dict[tuple[int, str], LoRAModuleWeights]  # (decoder layer index, projection) -> its weights


# Checkpoints that store projections fused: their PEFT adapters target the fused module (one A, and B over the
# parts' rows one after another), which is read as one adapter module per part, each with that A and its rows of B.
FUSED_TARGETS = {
    "Phi3ForCausalLM": {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")},
}


def lora_part_shapes(arch: ModelArch) -> dict[str, tuple[int, int]]:
    """The projections our layers hold adapters for, with their (out_features, in_features): attention and MLP
    projections, attention only in a mixture-of-experts model (adapters on experts are not supported)."""
    hidden, inter = arch.hidden_size, arch.intermediate_size
    q_size, kv_size = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    attention = {"q_proj": (q_size, hidden), "k_proj": (kv_size, hidden), "v_proj": (kv_size, hidden)}
    attention["o_proj"] = (hidden, q_size)
    if arch.moe is not None:
        return attention
    return {**attention, "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}


def lora_module_shapes(arch: ModelArch) -> dict[str, tuple[int, int]]:
    """The modules an adapter may target, as the checkpoint names them, with their (out_features, in_features)."""
    shapes = lora_part_shapes(arch)
    for fused, parts in FUSED_TARGETS.get(arch.architecture, {}).items():
        part_shapes = [shapes.pop(part) for part in parts]
        shapes[fused] = (sum(out for out, _ in part_shapes), part_shapes[0][1])
    return shapes


def load_adapter(request: LoRARequest, arch: ModelArch, max_lora_rank: int) -> LoRAAdapter:
    """Read ``request``'s directory and check it against the base model and ``max_lora_rank``."""
    config = _read_config(request)
    rank, scaling = _rank_and_scaling(request, config, max_lora_rank)
    _check_targets(request, config.get("target_modules"), lora_module_shapes(arch))
    modules = _read_weights(request, arch, rank)
    return LoRAAdapter(request, rank, scaling, modules)


def _error(request: LoRARequest, problem: str) -> ValueError:
    return ValueError(f"LoRA adapter {request.lora_name!r} ({request.lora_path}): {problem}")


def _read_config(request: LoRARequest) -> dict[str, Any]:
    path = os.path.join(request.lora_path, ADAPTER_CONFIG)
    if not os.path.isdir(request.lora_path):
        raise FileNotFoundError(
            f"LoRA adapter {request.lora_name!r}: directory {request.lora_path!r} does not exist; give a PEFT "
            f"adapter directory ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})"
        )
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise _error(request, f"cannot read {ADAPTER_CONFIG} ({e}); save the adapter with PEFT") from e
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise _error(request, f"{ADAPTER_CONFIG} is not a LoRA config (peft_type must be 'LORA')")
    if config.get("bias", "none") != "none":
        raise _error(request, f"bias={config['bias']!r} is not supported; train with bias='none'")
    for option, what in UNSUPPORTED_OPTIONS.items():
        if config.get(option):
            raise _error(request, f"{what} is not supported (got {config[option]!r}); train without it")
    return config


def _rank_and_scaling(request: LoRARequest, config: dict[str, Any], max_lora_rank: int) -> tuple[int, float]:
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1:
        raise _error(request, f"{ADAPTER_CONFIG} has r={rank!r}; it must be a positive integer")
    if rank > max_lora_rank:
        raise _error(request, f"its rank r={rank} exceeds max_lora_rank={max_lora_rank}; raise max_lora_rank")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise _error(request, f"{ADAPTER_CONFIG} has lora_alpha={alpha!r}; it must be a number")
    return rank, alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _check_targets(request: LoRARequest, targets: object, shapes: dict[str, tuple[int, int]]) -> None:
    """A list of module names must name supported ones; a string ("all-linear", a regular expression) is checked
    through the weights it produced."""
    if isinstance(targets, list):
        unsupported = sorted(set(targets) - set(shapes))
        if unsupported:
            raise _error(request, f"target_modules {unsupported} are not supported; supported: {', '.join(shapes)}")
    elif not isinstance(targets, str):
        raise _error(request, f"target_modules must be a list of module names or a pattern, got {targets!r}")


def _read_weights(request: LoRARequest, arch: ModelArch, rank: int) -> dict[tuple[int, str], LoRAModuleWeights]:
    path = os.path.join(request.lora_path, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise _error(request, f"{ADAPTER_WEIGHTS} not found (only safetensors are read); save with PEFT's default")
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                layer_idx, module, half = _parse_weight_name(request, name, arch)
                halves.setdefault((layer_idx, module), {})[half] = f.get_tensor(name)
    except (OSError, RuntimeError) as e:  # safetensors' errors for a damaged file
        raise _error(request, f"cannot read {ADAPTER_WEIGHTS} ({e})") from e
    if not halves:
        raise _error(request, f"{ADAPTER_WEIGHTS} holds no LoRA weights")
    shapes, part_shapes = lora_module_shapes(arch), lora_part_shapes(arch)
    fused_targets = FUSED_TARGETS.get(arch.architecture, {})
    modules = {}
    for (layer_idx, module), pair in sorted(halves.items()):
        where = f"layer {layer_idx} {module}"
        if set(pair) != {"A", "B"}:
            raise _error(request, f"{where} has lora_{''.join(pair)} but not both lora_A and lora_B")
        out_features, in_features = shapes[module]
        for half, want in (("A", (rank, in_features)), ("B", (out_features, rank))):
            if tuple(pair[half].shape) != want:
                raise _error(
                    request,
                    f"{where} lora_{half} has shape {tuple(pair[half].shape)} but the base model and r={rank} "
                    f"need {want}; was it trained for another base model?",
                )
        parts = fused_targets.get(module, (module,))
        part_rows = [part_shapes[part][0] for part in parts]
        for part, lora_b in zip(parts, pair["B"].split(part_rows), strict=True):
            modules[layer_idx, part] = LoRAModuleWeights(pair["A"], lora_b)
    return modules


def _parse_weight_name(request: LoRARequest, name: str, arch: ModelArch) -> tuple[int, str, str]:
    """(decoder layer index, module, "A" or "B") of a PEFT weight name; an error for anything else."""
    match = WEIGHT_NAME.fullmatch(name)
    shapes = lora_module_shapes(arch)
    if match is None or match.group(2) not in shapes:
        raise _error(
            request,
            f"weight {name!r} is not a LoRA weight of a supported module; supported: {', '.join(shapes)} "
            "(bias='none', no modules_to_save)",
        )
    layer_idx = int(match.group(1))
    if layer_idx >= arch.num_layers:
        raise _error(request, f"weight {name!r} is for layer {layer_idx}, but the base model has {arch.num_layers}")
    return layer_idx, match.group(2), match.group(3)
