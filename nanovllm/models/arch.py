"""The model's shape, read once from a Hugging Face ``config.json``.

Both rope spellings are read: the older top-level ``rope_theta`` / ``rope_scaling`` and
the newer ``rope_parameters`` dict that transformers 5 writes.
"""

import json
import os
from dataclasses import dataclass
from typing import Any

from nanovllm.layers.rotary import ROPE_TYPES, RopeConfig
from nanovllm.models.quant_config import QuantConfig, check_quantized_split, parse_quant_config

DEFAULT_ROPE_THETA = 10000.0  # transformers' default base when a config names none


@dataclass(frozen=True)
class ModelArch:
    architecture: str  # config.json "architectures"[0], e.g. "Qwen3ForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # width of the gated MLP
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (fewer than num_heads under GQA)
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int  # longest context the model supports
    tie_word_embeddings: bool  # the LM head reuses the input embedding matrix
    attention_bias: bool  # q/k/v/o projections carry biases (LLaMA's attention_bias)
    rope: RopeConfig
    dtype: str  # the checkpoint's dtype name, e.g. "bfloat16"
    sliding_window: int | None  # Mistral-style attention window; None = full attention
    eos_token_ids: tuple[int, ...]  # config.json's end-of-sequence ids
    quantization: QuantConfig | None = None  # config.json's quantization_config; None = float weights

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes per token per element size: multiply by the cache dtype's itemsize."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


def read_config_json(model_dir: str) -> dict[str, Any]:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; the model directory needs a Hugging Face config.json")
    with open(path) as f:
        config: dict[str, Any] = json.load(f)
    return config


def parse_rope(config: dict[str, Any]) -> RopeConfig:
    """Read rope settings from either spelling of the config."""
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    theta = params.get("rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA))
    source = params if params else scaling
    rope_type = source.get("rope_type", source.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} in config.json is not supported; supported: {ROPE_TYPES}")
    defaults = RopeConfig(theta=float(theta))
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(source.get("factor", defaults.factor)),
        low_freq_factor=float(source.get("low_freq_factor", defaults.low_freq_factor)),
        high_freq_factor=float(source.get("high_freq_factor", defaults.high_freq_factor)),
        original_max_position_embeddings=int(
            source.get("original_max_position_embeddings", defaults.original_max_position_embeddings)
        ),
    )


def parse_model_arch(config: dict[str, Any]) -> ModelArch:
    architectures = config.get("architectures") or ["<none>"]
    num_heads = config["num_attention_heads"]
    eos = config.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    use_sliding = config.get("use_sliding_window", True)  # Qwen2 keeps a window in config but off
    return ModelArch(
        architecture=architectures[0],
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=config.get("num_key_value_heads") or num_heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // num_heads,
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        max_position_embeddings=config.get("max_position_embeddings", 4096),
        tie_word_embeddings=config.get("tie_word_embeddings", False),
        attention_bias=config.get("attention_bias", False),
        rope=parse_rope(config),
        dtype=config.get("dtype") or config.get("torch_dtype") or "float32",
        sliding_window=config.get("sliding_window") if use_sliding else None,
        eos_token_ids=eos_ids,
        quantization=parse_quant_config(config.get("quantization_config")),
    )


def load_model_arch(model_dir: str) -> ModelArch:
    return parse_model_arch(read_config_json(model_dir))


def check_tensor_parallel_split(tensor_parallel_size: int, arch: ModelArch) -> None:
    """Refuse a tensor_parallel_size that does not split the model's heads, MLP and vocabulary evenly.

    Query heads, MLP rows and vocabulary rows are divided among the ranks. Key/value heads are
    divided too, or, when there are fewer of them than ranks, each is replicated on
    tensor_parallel_size / num_key_value_heads ranks.
    """
    size = tensor_parallel_size
    for name, value in [
        ("num_attention_heads", arch.num_heads),
        ("intermediate_size", arch.intermediate_size),
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
