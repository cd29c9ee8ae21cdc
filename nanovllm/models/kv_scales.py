"""FP8 KV-cache scales from a checkpoint, in the tensor names vLLM reads.

A layer's cache holds K / k_scale and V / v_scale in FP8 and attention reads them back times the
scales (kernels/reference.py). A checkpoint calibrated for an FP8 cache carries one float32 scale per
layer for K and one for V, under one of these names (prefix ``model.layers.{i}.self_attn``):

    .k_scale                .v_scale                compressed-tensors / llm-compressor
    .k_proj.k_scale         .v_proj.v_scale         NVIDIA ModelOpt
    .k_proj.output_scale    .v_proj.output_scale    older compressed-tensors
    .kv_scale                                       deprecated: one scale for both

and compressed-tensors says so in config.json: ``quantization_config.kv_cache_scheme``, which must then
be static, per-tensor, 8-bit float. Without such tensors every scale is DEFAULT_KV_SCALE. The loader
(models/loader.py) skips these tensors: only the KV cache uses them, and only when it is FP8.
"""

import glob
import math
import os
import re
from dataclasses import dataclass
from typing import Any

from safetensors import safe_open

# Scale of a layer whose checkpoint has none: FP8 then holds K and V as they are (e4m3 up to +-448,
# e5m2 up to +-57344, larger values saturate), which is vLLM's default too.
DEFAULT_KV_SCALE = 1.0
# "<prefix>layers.<i>.self_attn.<suffix>" -> which scale the tensor holds; "kv" is both.
SCALE_SUFFIXES = {
    "k_scale": "k",
    "v_scale": "v",
    "k_proj.k_scale": "k",
    "v_proj.v_scale": "v",
    "k_proj.output_scale": "k",
    "v_proj.output_scale": "v",
    "kv_scale": "kv",
}
SCALE_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.(" + "|".join(map(re.escape, SCALE_SUFFIXES)) + r")$")
# What the only supported kv_cache_scheme says, field by field (compressed-tensors' QuantizationArgs).
SUPPORTED_KV_CACHE_SCHEME = {"type": "float", "num_bits": 8, "strategy": "tensor", "dynamic": False}


@dataclass(frozen=True)
class KVScales:
    """One layer's FP8 cache scales: the cache holds K / k and V / v."""

    k: float  # K's scale, > 0
    v: float  # V's scale, > 0


def is_kv_scale_name(name: str) -> bool:
    """Whether a checkpoint tensor is a KV-cache scale (the weight loader leaves those to this module)."""
    return SCALE_NAME.search(name) is not None


def read_kv_scales(model_dir: str, config: dict[str, Any], num_layers: int) -> list[KVScales]:
    """Each layer's scales from the checkpoint's safetensors, or DEFAULT_KV_SCALE for all when it has none.

    An error, naming the tensor or field, for scales that are not one finite positive number per layer,
    for layers without them when others have them, and for a kv_cache_scheme this cache cannot follow.
    """
    scheme = (config.get("quantization_config") or {}).get("kv_cache_scheme")
    if scheme is not None:
        check_kv_cache_scheme(scheme)
    found: dict[tuple[int, str], float] = {}  # (layer, "k" | "v") -> scale
    for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                match = SCALE_NAME.search(name)
                if match is not None:
                    scale = _scalar(name, f.get_tensor(name))
                    for kind in SCALE_SUFFIXES[match.group(2)]:
                        found[(int(match.group(1)), kind)] = scale
    if not found:
        if scheme is not None:
            raise ValueError(
                f"config.json's quantization_config.kv_cache_scheme asks for static KV-cache scales but no "
                f"*.self_attn.k_scale / v_scale tensors are in {model_dir}; add them or remove kv_cache_scheme"
            )
        return [KVScales(DEFAULT_KV_SCALE, DEFAULT_KV_SCALE)] * num_layers
    missing = [f"layer {i} {kind}_scale" for i in range(num_layers) for kind in "kv" if (i, kind) not in found]
    if missing:
        raise ValueError(
            f"the checkpoint in {model_dir} has KV-cache scales for some layers but lacks {len(missing)}: "
            f"{missing[:6]}; every layer needs both k_scale and v_scale (or one kv_scale)"
        )
    return [KVScales(found[(i, "k")], found[(i, "v")]) for i in range(num_layers)]


def check_kv_cache_scheme(scheme: dict[str, Any]) -> None:
    """Refuse a kv_cache_scheme other than static per-tensor FP8 (per-head scales, int8, dynamic)."""
    defaults = {"strategy": "tensor", "dynamic": False}  # compressed-tensors' own defaults
    for field, supported in SUPPORTED_KV_CACHE_SCHEME.items():
        value = scheme.get(field, defaults.get(field))
        if value != supported:
            raise ValueError(
                f"config.json's quantization_config.kv_cache_scheme.{field} is {value!r}; the FP8 KV cache "
                f"supports only {SUPPORTED_KV_CACHE_SCHEME} (one static scale per layer for K and for V)"
            )


def _scalar(name: str, tensor: Any) -> float:
    """A scale tensor's one value; an error for any other shape, or a value that is not finite and > 0."""
    if tensor.numel() != 1:
        raise ValueError(
            f"checkpoint tensor {name!r} has shape {list(tensor.shape)}; the FP8 KV cache takes one scale per "
            "layer (kv_cache_scheme strategy 'tensor'), not per head or channel"
        )
    value = float(tensor.float().item())
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"checkpoint tensor {name!r} holds {value}; a KV-cache scale must be finite and > 0")
    return value
