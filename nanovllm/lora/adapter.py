"""A PEFT LoRA adapter directory, read and checked against the base model's shapes.

    adapter_config.json          r, lora_alpha, use_rslora, target_modules, bias, ...
    adapter_model.safetensors    base_model.model.{layers}.{i}.{module}.lora_A.weight  [r, in]
                                 ...                                     .lora_B.weight  [out, r]

    e.g. base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight      (LLaMA)
         base_model.model.transformer.h.3.attn.c_attn.lora_B.weight          (GPT-2)

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
# PEFT's name of a LoRA weight of a decoder layer's module: the decoder layers' path in the transformers model,
# the layer's index, the module's path in the layer (block.leaf), then lora_A or lora_B.
WEIGHT_NAME = r"base_model\.model\.{layers}\.(\d+)\.(\w+\.\w+)\.lora_([AB])\.weight"
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


@dataclass(frozen=True)
class CheckpointModules:
    """How a family's transformers model, so each PEFT adapter of it, names the modules an adapter may target.

    A module that holds several of our projections (Phi-3's qkv_proj, GPT-2's c_attn) has one A, and a B over the
    projections' rows one after another: it is read as one adapter module per projection, each with that A and its
    rows of B.
    """

    layers: str  # where the decoder layers are in the model, e.g. "model.layers"
    attention: dict[str, tuple[str, ...]]  # module path in a layer -> the projections of ours it holds, in row order
    mlp: dict[str, tuple[str, ...]]  # the same for the MLP (not adapted in a mixture-of-experts model)


LLAMA_MODULES = CheckpointModules(
    layers="model.layers",
    attention={f"self_attn.{proj}": (proj,) for proj in ("q_proj", "k_proj", "v_proj", "o_proj")},
    mlp={f"mlp.{proj}": (proj,) for proj in ("gate_proj", "up_proj", "down_proj")},
)
# The families whose checkpoints name or fuse the projections otherwise; the others name them as LLaMA does.
CHECKPOINT_MODULES = {
    "Phi3ForCausalLM": CheckpointModules(
        layers="model.layers",
        attention={"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "self_attn.o_proj": ("o_proj",)},
        mlp={"mlp.gate_up_proj": ("gate_proj", "up_proj"), "mlp.down_proj": ("down_proj",)},
    ),
    "PhiForCausalLM": CheckpointModules(
        layers="model.layers",
        attention={
            **{f"self_attn.{proj}": (proj,) for proj in ("q_proj", "k_proj", "v_proj")},
            "self_attn.dense": ("o_proj",),
        },
        mlp={"mlp.fc1": ("fc1",), "mlp.fc2": ("fc2",)},
    ),
    # Conv1D modules store their weight [in, out], yet PEFT saves their A [r, in] and B [out, r] as for a Linear
    # (fan_in_fan_out transposes only the merged product). PEFT's target "c_proj" adapts both modules of that
    # name, "attn.c_proj" the attention's alone.
    "GPT2LMHeadModel": CheckpointModules(
        layers="transformer.h",
        attention={"attn.c_attn": ("q_proj", "k_proj", "v_proj"), "attn.c_proj": ("o_proj",)},
        mlp={"mlp.c_fc": ("fc1",), "mlp.c_proj": ("fc2",)},
    ),
}


def checkpoint_modules(arch: ModelArch) -> CheckpointModules:
    """How ``arch``'s checkpoint names the modules adapters target: as LLaMA's does, unless CHECKPOINT_MODULES says."""
    return CHECKPOINT_MODULES.get(arch.architecture, LLAMA_MODULES)


def target_modules(arch: ModelArch) -> dict[str, tuple[str, ...]]:
    """The modules of a decoder layer an adapter may target, by their path in the layer, with the projections each
    holds: attention and MLP, attention only in a mixture-of-experts model (adapters on experts are not supported)."""
    names = checkpoint_modules(arch)
    return dict(names.attention) if arch.moe is not None else {**names.attention, **names.mlp}


def projection_shapes(arch: ModelArch) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each projection our decoder layers may have, gated MLP or plain."""
    hidden, inter = arch.hidden_size, arch.intermediate_size
    q_size, kv_size = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    return {
        "q_proj": (q_size, hidden), "k_proj": (kv_size, hidden), "v_proj": (kv_size, hidden),
        "o_proj": (hidden, q_size),
        "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter),
        "fc1": (inter, hidden), "fc2": (hidden, inter),
    }  # fmt: skip


def lora_part_shapes(arch: ModelArch) -> dict[str, tuple[int, int]]:
    """The projections our layers hold adapters for, with their (out_features, in_features)."""
    shapes = projection_shapes(arch)
    return {proj: shapes[proj] for projs in target_modules(arch).values() for proj in projs}


def lora_module_shapes(arch: ModelArch) -> dict[str, tuple[int, int]]:
    """The modules an adapter may target, by their path in a decoder layer, with their (out_features, in_features)."""
    shapes = lora_part_shapes(arch)
    return {
        module: (sum(shapes[proj][0] for proj in projs), shapes[projs[0]][1])
        for module, projs in target_modules(arch).items()
    }


def load_adapter(request: LoRARequest, arch: ModelArch, max_lora_rank: int) -> LoRAAdapter:
    """Read ``request``'s directory and check it against the base model and ``max_lora_rank``."""
    config = _read_config(request)
    rank, scaling = _rank_and_scaling(request, config, max_lora_rank)
    _check_targets(request, config.get("target_modules"), list(target_modules(arch)))
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


def _check_targets(request: LoRARequest, targets: object, modules: list[str]) -> None:
    """Each name of a list must name supported modules as PEFT matches names, by the end of the module's path
    ("c_proj": GPT-2's attn.c_proj and mlp.c_proj, "attn.c_proj": the first alone); a string ("all-linear", a
    regular expression) is checked through the weights it produced."""
    if isinstance(targets, list):
        unsupported = sorted(t for t in set(targets) if not any(m == t or m.endswith(f".{t}") for m in modules))
        if unsupported:
            names = dict.fromkeys(module.rpartition(".")[2] for module in modules)  # c_proj once
            raise _error(request, f"target_modules {unsupported} are not supported; supported: {', '.join(names)}")
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
    shapes, part_shapes, module_parts = lora_module_shapes(arch), lora_part_shapes(arch), target_modules(arch)
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
        parts = module_parts[module]  # several for a fused module: B's rows split among them
        part_rows = [part_shapes[part][0] for part in parts]
        for part, lora_b in zip(parts, pair["B"].split(part_rows), strict=True):
            modules[layer_idx, part] = LoRAModuleWeights(pair["A"], lora_b)
    return modules


def _parse_weight_name(request: LoRARequest, name: str, arch: ModelArch) -> tuple[int, str, str]:
    """(decoder layer index, module path in the layer, "A" or "B") of a PEFT weight name; an error for anything
    else."""
    layers = checkpoint_modules(arch).layers
    match = re.fullmatch(WEIGHT_NAME.format(layers=re.escape(layers)), name)
    modules = target_modules(arch)
    if match is None or match.group(2) not in modules:
        raise _error(
            request,
            f"weight {name!r} is not a LoRA weight of a supported module; supported: "
            f"{layers}.N.{{{', '.join(modules)}}} (bias='none', no modules_to_save)",
        )
    layer_idx = int(match.group(1))
    if layer_idx >= arch.num_layers:
        raise _error(request, f"weight {name!r} is for layer {layer_idx}, but the base model has {arch.num_layers}")
    return layer_idx, match.group(2), match.group(3)
