"""config.json's ``quantization_config`` (and the ``quantization="fp8"`` engine argument), read and checked once.

    quant_method         read                                                 refused with an error naming the field
    fp8                  E4M3, block-wise (weight_block_size, weight_scale_inv)   static activations, e5m2
                         or per tensor (weight_scale); dynamic activations
    compressed-tensors   pack-quantized: int 4/8-bit groups, sym or asym;         other formats, several config groups,
                         float-quantized: FP8 per tensor, channel or block with   static or missing activation scales,
                         dynamic per-token activations; ignore lists              kv-cache schemes, sparsity, transforms
    awq                  GEMM, 4-bit, zero points                                 other versions, no zero points
    gptq                 4/8-bit, sym, desc_act false                             desc_act true, asym, gptq_v2, lm_head
    (float checkpoint)   quantization="fp8": FP8 per output row, as it loads

A family may read fewer (its model class's ``quant_methods``: GPT-2 reads gptq only). Group sizes:
SUPPORTED_GROUP_SIZES. Everything here runs while config.json is read, before any weight or device memory: a
checkpoint nanovllm cannot run is refused with the field, its value and what would work.
"""

import re
from dataclasses import dataclass
from typing import Any

from nanovllm.kernels.quant_backends import QuantizedGemm
from nanovllm.layers.quantization.base import LinearQuantization, matches
from nanovllm.layers.quantization.fp8_weights import Fp8Weights, Fp8WeightScheme
from nanovllm.layers.quantization.int_weights import IntWeights, IntWeightScheme

SUPPORTED_GROUP_SIZES = (32, 64, 128)  # the integer GEMM steps K inside one group (kernels/triton_quant_gemm.py)
MIN_FP8_BLOCK_K = 16  # the FP8 GEMM's K step divides the block: a power of two of at least tl.dot's 16
ONLINE_QUANTIZATIONS = ("fp8",)  # what EngineConfig.quantization may ask for
ALL_LINEAR = ("Linear",)  # compressed-tensors' target for every linear layer


@dataclass(frozen=True)
class QuantConfig:
    """How a checkpoint's linear weights are quantized, and which layers are."""

    method: str  # config.json's quant_method, or "fp8-online" (quantization="fp8" on a float checkpoint)
    weights: IntWeights | Fp8Weights  # the format and settings of every quantized layer
    targets: tuple[str, ...]  # layers quantized: "Linear" (all), module names or "re:" regexes
    ignore: tuple[str, ...]  # layers left in the model's dtype, same spelling

    def linear_quantization(self, gemm: QuantizedGemm) -> LinearQuantization:
        """The layers' view: the scheme, multiplying with ``gemm`` (the engine's choice of kernels)."""
        w = self.weights
        scheme = IntWeightScheme(w, gemm) if isinstance(w, IntWeights) else Fp8WeightScheme(w, gemm)
        return LinearQuantization(scheme, self.targets, self.ignore)


def _refuse(method: str, field: str, value: Any, supported: str) -> ValueError:
    return ValueError(
        f"config.json quantization_config ({method}): {field}={value!r} is not supported; supported: {supported}"
    )


def _substring_patterns(names: list[str] | None) -> tuple[str, ...]:
    """AWQ's and fp8's modules_to_not_convert match anywhere in a module's name."""
    return tuple(f"re:.*{re.escape(name)}" for name in names or [])


def _group_size(method: str, value: Any) -> int:
    if value not in SUPPORTED_GROUP_SIZES:
        raise _refuse(method, "group_size", value, f"one of {SUPPORTED_GROUP_SIZES}")
    return int(value)


def _parse_fp8(raw: dict[str, Any]) -> QuantConfig:
    method = "fp8"
    if raw.get("fmt", "e4m3") != "e4m3":
        raise _refuse(method, "fmt", raw.get("fmt"), "'e4m3'")
    if raw.get("activation_scheme", "dynamic") != "dynamic":
        raise _refuse(method, "activation_scheme", raw.get("activation_scheme"), "'dynamic' (per-token scales)")
    block = raw.get("weight_block_size")
    if block is not None:
        block = _block_size(method, "weight_block_size", block)
    ignore = _substring_patterns(raw.get("ignored_layers") or raw.get("modules_to_not_convert"))
    weights = Fp8Weights("fp8", "block" if block else "tensor", block)
    return QuantConfig(method, weights, ALL_LINEAR, ignore)


def _block_size(method: str, field: str, value: Any) -> tuple[int, int]:
    is_pair = isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int) for v in value)
    if not is_pair or value[0] < 1 or value[1] < MIN_FP8_BLOCK_K or value[1] & (value[1] - 1):
        raise _refuse(method, field, value, f"[rows, columns], columns a power of two >= {MIN_FP8_BLOCK_K}")
    return int(value[0]), int(value[1])


def _parse_awq(raw: dict[str, Any]) -> QuantConfig:
    method = "awq"
    bits = raw.get("bits", raw.get("w_bit"))
    if bits != 4:
        raise _refuse(method, "bits", bits, "4")
    group_size = _group_size(method, raw.get("group_size", raw.get("q_group_size")))
    if str(raw.get("version", "gemm")).lower() != "gemm":
        raise _refuse(method, "version", raw.get("version"), "'gemm' (AutoAWQ's GEMM layout)")
    if raw.get("zero_point", True) is not True:
        raise _refuse(method, "zero_point", raw.get("zero_point"), "true")
    weights = IntWeights("awq", 4, group_size, has_zero_points=True)
    return QuantConfig(method, weights, ALL_LINEAR, _substring_patterns(raw.get("modules_to_not_convert")))


def _parse_gptq(raw: dict[str, Any]) -> QuantConfig:
    method = "gptq"
    bits = raw.get("bits")
    if bits not in (4, 8):
        raise _refuse(method, "bits", bits, "4 or 8")
    group_size = _group_size(method, raw.get("group_size"))
    for field, supported in [("desc_act", False), ("sym", True), ("lm_head", False)]:
        if raw.get(field, supported) is not supported:
            raise _refuse(method, field, raw.get(field), str(supported).lower())
    if raw.get("checkpoint_format", "gptq") != "gptq":
        raise _refuse(method, "checkpoint_format", raw.get("checkpoint_format"), "'gptq' (v1 zero points)")
    if raw.get("dynamic"):
        raise _refuse(method, "dynamic", raw.get("dynamic"), "none (one setting for every layer)")
    return QuantConfig(method, IntWeights("gptq", bits, group_size, has_zero_points=False), ALL_LINEAR, ())


def _parse_compressed_tensors(raw: dict[str, Any]) -> QuantConfig | None:
    """The linear weights' scheme; kv_cache_scheme is the KV cache's (models/kv_scales.py reads it)."""
    method = "compressed-tensors"
    for field in ("sparsity_config", "transform_config"):
        if raw.get(field):
            raise _refuse(method, field, raw[field], "none (quantized linear weights only)")
    groups = raw.get("config_groups") or {}
    if not groups and raw.get("kv_cache_scheme"):
        return None  # only the KV cache is quantized: the weights are float
    if len(groups) != 1:
        raise _refuse(method, "config_groups", sorted(groups), "exactly one group (one scheme for every layer)")
    group = next(iter(groups.values()))
    targets = tuple(group.get("targets") or ())
    class_targets = [t for t in targets if not t.startswith("re:") and "." not in t and t != "Linear"]
    if not targets or class_targets:
        raise _refuse(method, "targets", list(targets), "'Linear', module names or 're:' patterns")
    if group.get("output_activations"):
        raise _refuse(method, "output_activations", group["output_activations"], "none")
    fmt = group.get("format") or raw.get("format")
    weights, activations = group.get("weights") or {}, group.get("input_activations")
    if fmt == "pack-quantized":
        parsed: IntWeights | Fp8Weights = _ct_int_weights(weights, activations)
    elif fmt == "float-quantized":
        parsed = _ct_fp8_weights(weights, activations)
    else:
        raise _refuse(method, "format", fmt, "'pack-quantized' (W4A16, W8A16) or 'float-quantized' (FP8)")
    config = QuantConfig(method, parsed, targets, tuple(raw.get("ignore") or ()))
    if any(matches("lm_head", t) for t in targets) and not any(matches("lm_head", p) for p in config.ignore):
        raise _refuse(method, "ignore", list(config.ignore), "a list holding 'lm_head' (the LM head is not quantized)")
    return config


def _ct_int_weights(weights: dict[str, Any], activations: dict[str, Any] | None) -> IntWeights:
    method = "compressed-tensors pack-quantized"
    expected = {"type": "int", "strategy": "group", "dynamic": False}
    for field, value in expected.items():
        if weights.get(field) != value:
            raise _refuse(method, f"weights.{field}", weights.get(field), repr(value))
    if weights.get("num_bits") not in (4, 8):
        raise _refuse(method, "weights.num_bits", weights.get("num_bits"), "4 or 8")
    if weights.get("actorder") not in (None, "static"):
        raise _refuse(method, "weights.actorder", weights.get("actorder"), "null or 'static' (no g_idx)")
    if activations is not None:
        raise _refuse(method, "input_activations", activations, "null (W4A16, W8A16)")
    group_size = _group_size(method, weights.get("group_size"))
    return IntWeights("compressed-tensors", weights["num_bits"], group_size, not weights.get("symmetric", True))


def _ct_fp8_weights(weights: dict[str, Any], activations: dict[str, Any] | None) -> Fp8Weights:
    method = "compressed-tensors float-quantized"
    for field, value in {"type": "float", "num_bits": 8, "symmetric": True, "dynamic": False}.items():
        if weights.get(field) != value:
            raise _refuse(method, f"weights.{field}", weights.get(field), repr(value))
    strategy = weights.get("strategy")
    if strategy not in ("tensor", "channel", "block"):
        raise _refuse(method, "weights.strategy", strategy, "'tensor', 'channel' or 'block'")
    block = (
        _block_size(method, "weights.block_structure", weights.get("block_structure")) if strategy == "block" else None
    )
    act = activations or {}
    act_strategy, act_group = ("group", block[1]) if block else ("token", None)
    expected = {"type": "float", "num_bits": 8, "dynamic": True, "strategy": act_strategy}
    for field, value in expected.items():
        if act.get(field) != value:
            raise _refuse(method, f"input_activations.{field}", act.get(field), f"{value!r} (dynamic FP8 activations)")
    if act_group is not None and act.get("group_size") != act_group:
        raise _refuse(
            method, "input_activations.group_size", act.get("group_size"), f"{act_group} (the block's columns)"
        )
    return Fp8Weights("compressed-tensors", strategy, block)


PARSERS = {"fp8": _parse_fp8, "compressed-tensors": _parse_compressed_tensors, "awq": _parse_awq, "gptq": _parse_gptq}


def parse_quant_config(raw: dict[str, Any] | None) -> QuantConfig | None:
    """config.json's quantization_config -> QuantConfig; None for a float checkpoint."""
    if raw is None:
        return None
    method = raw.get("quant_method")
    if method not in PARSERS:
        raise ValueError(
            f"config.json quantization_config: quant_method={method!r} is not supported; supported: {sorted(PARSERS)}"
        )
    return PARSERS[method](raw)


def check_quant_method(quant: QuantConfig | None, supported: tuple[str, ...] | None, family: str) -> None:
    """Refuse a checkpoint quantized in a format ``family`` does not read (``supported``; None: every one)."""
    if quant is None or supported is None or quant.method in supported:
        return
    raise ValueError(
        f"config.json quantization_config: quant_method={quant.method!r} is not supported for {family}; "
        f"supported: {list(supported)}, or quantization='fp8' on a float checkpoint"
    )


def choose_quantization(checkpoint: QuantConfig | None, requested: str | None) -> QuantConfig | None:
    """The checkpoint's quantization, or EngineConfig.quantization's online one for a float checkpoint."""
    if requested is None or (checkpoint is not None and checkpoint.method == requested):
        return checkpoint
    if checkpoint is not None:
        raise ValueError(
            f"quantization={requested!r} quantizes a float checkpoint as it loads, but this one is already "
            f"quantized (quant_method={checkpoint.method!r}); drop the quantization argument to load it as it is"
        )
    return QuantConfig("fp8-online", Fp8Weights("online", "channel", None), ALL_LINEAR, ())


def check_quantized_split(
    quant: QuantConfig, tp: int, hidden_size: int, intermediate_size: int, num_heads: int, num_kv_heads: int,
    head_dim: int,
) -> None:  # fmt: skip
    """Refuse a model whose per-rank weights would cut a group, a packed word or a scale block in two."""
    w = quant.weights
    inputs = [  # (layers, what, input columns per rank)
        ("qkv_proj and gate_up_proj", "hidden_size", hidden_size),
        ("o_proj", "num_attention_heads * head_dim / tensor_parallel_size", num_heads * head_dim // tp),
        ("down_proj", "intermediate_size / tensor_parallel_size", intermediate_size // tp),
    ]
    outputs = [  # (layers, what, output rows per rank)
        ("q_proj", "num_attention_heads * head_dim / tensor_parallel_size", num_heads * head_dim // tp),
        ("k_proj and v_proj", "the key/value heads per rank * head_dim", max(1, num_kv_heads // tp) * head_dim),
        ("gate_proj and up_proj", "intermediate_size / tensor_parallel_size", intermediate_size // tp),
    ]
    checks: list[tuple[str, str, int, str, int]] = []
    if isinstance(w, IntWeights):
        checks += [(layer, what, size, "group_size", w.group_size) for layer, what, size in inputs]
        if w.layout == "awq":  # qweight packs 8 output columns per word
            checks += [(layer, what, size, "8 columns of a packed word", 8) for layer, what, size in outputs]
    elif w.block_size is not None and tp > 1:  # the split inputs must start on block edges
        checks += [(layer, what, size, "scale block's columns", w.block_size[1]) for layer, what, size in inputs[1:]]
    for layer, what, size, unit, multiple in checks:
        if size % multiple:
            raise ValueError(
                f"{quant.method} weights: {layer} get {what} = {size} input/output features per rank "
                f"(tensor_parallel_size={tp}), not a multiple of the {unit} ({multiple}); use a "
                "tensor_parallel_size that keeps them whole"
            )
