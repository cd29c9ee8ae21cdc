"""The model's shape, read once from a Hugging Face ``config.json``.

Both rope spellings are read: the older top-level ``rope_theta`` / ``rope_scaling`` and the newer
``rope_parameters`` dict that transformers 5 writes (per layer type for Gemma 3). A model family reads its
config through its class (models/registry.py): its own key spellings and defaults first, then this.
"""

import json
import math
import os
from dataclasses import dataclass
from typing import Any

from nanovllm.layers.activation import ACTIVATIONS
from nanovllm.layers.attention_block import AttentionSpec
from nanovllm.layers.rotary import ROPE_TYPES, RopeConfig
from nanovllm.models.moe_arch import MoeArch, parse_moe
from nanovllm.models.quant_config import QuantConfig, check_quantized_split, parse_quant_config

DEFAULT_ROPE_THETA = 10000.0  # transformers' default base when a config names none
# transformers' names for the two kinds of attention layer (config.json's layer_types).
FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"
LAYER_TYPES = (FULL_ATTENTION, SLIDING_ATTENTION)
ROPE_TYPE_ALIASES = {"su": "longrope"}  # Phi-3's first configs name LongRoPE "su"


@dataclass(frozen=True)
class ModelArch:
    architecture: str  # config.json "architectures"[0], e.g. "Qwen3ForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # width of the MLP (of each of gate and up in a gated one)
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (fewer than num_heads under GQA)
    head_dim: int
    norm_eps: float  # epsilon of every norm (config's rms_norm_eps or layer_norm_eps)
    hidden_act: str  # the MLP's activation, a key of layers/activation.ACTIVATIONS
    max_position_embeddings: int  # longest context the model supports
    tie_word_embeddings: bool  # the LM head reuses the input embedding matrix
    attention_bias: bool  # q/k/v/o projections carry biases (LLaMA's attention_bias)
    layer_attention: tuple[AttentionSpec, ...]  # per layer: its scale, rotary and sliding window
    final_logit_softcapping: float | None  # logits = cap * tanh(logits / cap) (Gemma); None: left as they are
    dtype: str  # the checkpoint's dtype name, e.g. "bfloat16"
    eos_token_ids: tuple[int, ...]  # config.json's end-of-sequence ids
    moe: MoeArch | None = None  # the mixture-of-experts layers (models/moe_arch.py); None for a dense model
    quantization: QuantConfig | None = None  # config.json's quantization_config; None = float weights

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes per token per element size: multiply by the cache dtype's itemsize."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


def read_config_json(model_dir: str) -> dict[str, Any]:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; the model directory needs a Hugging Face config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore the model's config.json") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a {type(config).__name__}, not a JSON object; restore the model's config.json")
    return config


def parse_rope(config: dict[str, Any], head_dim: int, layer_type: str = FULL_ATTENTION) -> RopeConfig:
    """Read the rope settings of one kind of layer from either spelling of the config."""
    params = dict(config.get("rope_parameters") or {})
    if set(params) & set(LAYER_TYPES):  # transformers 5 spells Gemma 3's as one dict per layer type
        params = dict(params.get(layer_type) or {})
    elif layer_type == SLIDING_ATTENTION and "rope_local_base_freq" in config:  # Gemma 3's older spelling
        return RopeConfig(theta=float(config["rope_local_base_freq"]))  # rope_scaling is the global layers'
    scaling = dict(config.get("rope_scaling") or {})
    theta = params.get("rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA))
    source = params if params else scaling
    rope_type = str(source.get("rope_type", source.get("type", "default")))
    rope_type = ROPE_TYPE_ALIASES.get(rope_type, rope_type)
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} in config.json is not supported; supported: {ROPE_TYPES}")
    defaults = RopeConfig(theta=float(theta))
    original_len = int(
        source.get("original_max_position_embeddings")
        or config.get("original_max_position_embeddings")
        or defaults.original_max_position_embeddings
    )
    rope = RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(source.get("factor") or defaults.factor),
        low_freq_factor=float(source.get("low_freq_factor", defaults.low_freq_factor)),
        high_freq_factor=float(source.get("high_freq_factor", defaults.high_freq_factor)),
        original_max_position_embeddings=original_len,
        partial_rotary_factor=float(params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))),
    )
    return _with_longrope(rope, source, config) if rope_type == "longrope" else rope


def _with_longrope(rope: RopeConfig, source: dict[str, Any], config: dict[str, Any]) -> RopeConfig:
    """LongRoPE's per-frequency factors and its cos/sin scale, computed as transformers does."""
    original_len = rope.original_max_position_embeddings
    factor = float(source.get("factor") or config.get("max_position_embeddings", original_len) / original_len)
    attention_factor = source.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_len))
    return RopeConfig(
        theta=rope.theta,
        rope_type=rope.rope_type,
        factor=factor,
        original_max_position_embeddings=original_len,
        partial_rotary_factor=rope.partial_rotary_factor,
        short_factor=tuple(float(f) for f in source.get("short_factor") or ()),
        long_factor=tuple(float(f) for f in source.get("long_factor") or ()),
        attention_factor=float(attention_factor),
    )


def _check_longrope(rope: RopeConfig, head_dim: int) -> None:
    num_freqs = rope.rotary_dim(head_dim) // 2
    for name, factors in (("short_factor", rope.short_factor), ("long_factor", rope.long_factor)):
        if len(factors) != num_freqs:
            raise ValueError(
                f"config.json's longrope {name} has {len(factors)} values; head_dim={head_dim} with "
                f"partial_rotary_factor={rope.partial_rotary_factor} needs {num_freqs}, one per rotary frequency"
            )


def parse_layer_types(config: dict[str, Any], num_layers: int) -> tuple[str, ...]:
    """Each layer's kind of attention: full, or a sliding window of config.json's ``sliding_window`` keys."""
    window = config.get("sliding_window")
    if config.get("layer_types") is not None:  # transformers 5 spells it out
        layer_types = tuple(config["layer_types"])
        unknown = sorted(set(layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"config.json's layer_types holds {unknown}; supported layer types: {LAYER_TYPES}")
        if len(layer_types) != num_layers:
            raise ValueError(f"config.json's layer_types names {len(layer_types)} layers, the model has {num_layers}")
        if SLIDING_ATTENTION in layer_types and window is None:
            raise ValueError("config.json's layer_types has sliding_attention layers but sliding_window is null")
        return layer_types
    if window is None or config.get("use_sliding_window") is False:  # Qwen2 keeps a window in config but off
        return (FULL_ATTENTION,) * num_layers
    pattern = config.get("sliding_window_pattern")  # Gemma 3's older spelling: every pattern-th layer is full
    if pattern:
        return tuple(SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION for i in range(num_layers))
    first_sliding = config.get("max_window_layers", 0) if "use_sliding_window" in config else 0  # Qwen2
    return tuple(SLIDING_ATTENTION if i >= first_sliding else FULL_ATTENTION for i in range(num_layers))


def attention_scale(config: dict[str, Any], head_dim: int, layer_idx: int) -> float:
    """What q.k is multiplied by: 1 / sqrt(head_dim), or Gemma's 1 / sqrt(query_pre_attn_scalar); GPT-2's
    configs may turn it off (scale_attn_weights) or divide it by the layer's number (scale_attn_by_inverse_...)."""
    scale = float(config.get("query_pre_attn_scalar") or head_dim) ** -0.5
    if config.get("scale_attn_weights") is False:
        scale = 1.0
    if config.get("scale_attn_by_inverse_layer_idx"):
        scale /= layer_idx + 1
    return scale


def parse_layer_attention(
    config: dict[str, Any], num_layers: int, head_dim: int, has_rotary: bool
) -> tuple[AttentionSpec, ...]:
    """Every layer's AttentionSpec; ``has_rotary`` False for families without rotary (GPT-2)."""
    ropes: dict[str, RopeConfig | None] = {layer_type: None for layer_type in LAYER_TYPES}
    if has_rotary:
        ropes = {layer_type: parse_rope(config, head_dim, layer_type) for layer_type in LAYER_TYPES}
    for rope in ropes.values():
        if rope is not None and rope.rope_type == "longrope":
            _check_longrope(rope, head_dim)
    window = config.get("sliding_window")
    layer_types = parse_layer_types(config, num_layers)
    if SLIDING_ATTENTION in layer_types and (not isinstance(window, int) or window < 1):
        raise ValueError(f"config.json's sliding_window={window!r} must be a positive number of tokens")
    return tuple(
        AttentionSpec(
            scale=attention_scale(config, head_dim, layer_idx),
            rope=ropes[layer_type],
            sliding_window=window if layer_type == SLIDING_ATTENTION else None,
        )
        for layer_idx, layer_type in enumerate(layer_types)
    )


def parse_model_arch(config: dict[str, Any], has_rotary: bool = True) -> ModelArch:
    """The ModelArch of a config.json already in transformers' usual key names (see LlamaForCausalLM.read_arch)."""
    architectures = config.get("architectures") or ["<none>"]
    num_heads = config["num_attention_heads"]
    hidden_size = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden_size // num_heads
    num_layers = config["num_hidden_layers"]
    hidden_act = config.get("hidden_act", "silu")
    if hidden_act not in ACTIVATIONS:
        raise ValueError(
            f"config.json's activation {hidden_act!r} is not supported; supported: {', '.join(ACTIVATIONS)}"
        )
    eos = config.get("eos_token_id")
    return ModelArch(
        architecture=architectures[0],
        vocab_size=config["vocab_size"],
        hidden_size=hidden_size,
        intermediate_size=config.get("intermediate_size") or 4 * hidden_size,  # GPT-2's n_inner null: 4 x hidden
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=config.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        norm_eps=config.get("rms_norm_eps", config.get("layer_norm_eps", 1e-6)),
        hidden_act=hidden_act,
        max_position_embeddings=config.get("max_position_embeddings", 4096),
        tie_word_embeddings=config.get("tie_word_embeddings", False),
        attention_bias=config.get("attention_bias", False),
        layer_attention=parse_layer_attention(config, num_layers, head_dim, has_rotary),
        final_logit_softcapping=config.get("final_logit_softcapping"),
        dtype=config.get("dtype") or config.get("torch_dtype") or "float32",
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
        moe=parse_moe(config, architectures[0], num_layers),
        quantization=parse_quant_config(config.get("quantization_config")),
    )


def check_supported_options(config: dict[str, Any], supported: dict[str, tuple[Any, ...]], family: str) -> None:
    """Refuse a config.json option this implementation does not run (``supported``: key -> values it runs)."""
    for key, values in supported.items():
        if key in config and config[key] not in values:
            raise ValueError(
                f"config.json's {key}={config[key]!r} is not supported for {family}; supported: "
                f"{' or '.join(repr(value) for value in values)}"
            )


def check_tensor_parallel_split(tensor_parallel_size: int, arch: ModelArch) -> None:
    """Refuse a tensor_parallel_size that does not split the model's heads, MLP and vocabulary evenly.

    Query heads, MLP rows (each expert's too) and vocabulary rows are divided among the ranks. Key/value heads are
    divided too, or, when there are fewer of them than ranks, each is replicated on
    tensor_parallel_size / num_key_value_heads ranks.
    """
    size = tensor_parallel_size
    experts = [] if arch.moe is None else [("moe_intermediate_size", arch.moe.moe_intermediate_size)]
    for name, value in [
        ("num_attention_heads", arch.num_heads),
        ("intermediate_size", arch.intermediate_size),
        *experts,
        ("vocab_size", arch.vocab_size),
    ]:
        if value % size:
            raise ValueError(
                f"tensor_parallel_size={size} does not divide the model's {name}={value}; "
                f"use a tensor_parallel_size that divides it (one of {_divisors(value)[:8]})"
            )
    kv = arch.num_kv_heads
    if kv % size and size % kv:
        raise ValueError(
            f"tensor_parallel_size={size} and the model's num_key_value_heads={kv} must divide one another "
            f"(KV heads are split, or replicated when fewer than the ranks); use one of {_divisors(kv)} or a "
            f"multiple of {kv}"
        )
    if arch.quantization is not None:
        check_quantized_split(
            arch.quantization, size, arch.hidden_size, arch.intermediate_size, arch.num_heads, kv, arch.head_dim
        )


def _divisors(value: int) -> list[int]:
    return [d for d in range(1, value + 1) if value % d == 0]
