"""Engine settings, validated once at construction and never changed afterwards.

:class:`EngineConfig` holds what the user chose. What is discovered later (the model's
shape, how many KV blocks fit) lives in its own objects: the model's ``ModelArch`` (models/arch.py)
and the model runner's cache plan.
"""

import dataclasses
import importlib.util
import inspect
import os
import re
from dataclasses import dataclass
from typing import Any

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOAD_FORMATS = ("safetensors", "dummy")
ATTENTION_BACKENDS = ("auto", "torch", "triton", "flash_attn")
QUANTIZATIONS = (None, "fp8")  # online quantization of a float checkpoint's linear weights as they load
# vLLM's kv_cache_dtype values: "auto" is the model's dtype, "fp8" means "fp8_e4m3".
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
DISTRIBUTED_EXECUTOR_BACKENDS = ("mp", "external_launcher", "ray")  # vLLM's names; see docs/distributed.md
MIN_BLOCK_SIZE = 16  # smallest KV block, in tokens; below this the block tables outgrow the blocks
# A field line of EngineConfig and its comment: `    name: type = default  # what it means`.
FIELD_LINE = re.compile(r"^    (?P<name>\w+): [^#]+#\s*(?P<comment>.+)$")


@dataclass(frozen=True)
class EngineConfig:
    """Everything ``LLM(model, **engine_args)`` accepts. Every field is checked in ``__post_init__``."""

    model: str  # a Hugging Face model directory: config.json, *.safetensors, tokenizer files
    max_num_batched_tokens: int = 16384  # token budget of one engine step (prefill chunks and decodes)
    # N: every step decodes all running sequences and prefills at most N prompt tokens beside them, so that a long
    # prompt does not stall the streams (scheduler/mixed.py); None: prompts prefill in steps of their own.
    max_num_prefill_tokens: int | None = None  # prompt tokens per step beside the decodes; None = prefill steps
    max_num_seqs: int = 512  # most sequences running at once
    max_model_len: int = 4096  # longest prompt + completion, in tokens; clamped to the model's limit
    gpu_memory_utilization: float = 0.9  # share of GPU memory the engine may use, KV cache included
    tensor_parallel_size: int = 1  # processes (GPUs) the model is split over
    data_parallel_size: int = 1  # replicas of the model (each tensor_parallel_size GPUs) sharing generate()'s prompts
    # How the ranks start and talk: "mp" (spawned on this host), "external_launcher" (each rank started by
    # torchrun, on one host or several) or "ray" (Ray actors; pip install nanovllm[ray])
    distributed_executor_backend: str = "mp"  # "mp" (spawned here), "external_launcher" (torchrun) or "ray"
    enforce_eager: bool = False  # True turns CUDA graphs off
    async_scheduling: bool = True  # generate() schedules each step while the device runs the one before
    kvcache_block_size: int = 256  # tokens per KV-cache block: a power of two, >= 16
    num_kvcache_blocks: int | None = None  # KV-cache blocks; None = as many as memory allows
    enable_prefix_caching: bool = True  # reuse the KV blocks of prompts' shared prefixes
    device: str = "auto"  # "auto" (CUDA when available, else CPU), "cpu" or "cuda"
    dtype: str = "auto"  # "auto" (the checkpoint's), "float32", "bfloat16" or "float16"
    load_format: str = "safetensors"  # "safetensors", or "dummy": random weights of the right shapes
    attention_backend: str = "auto"  # "auto", "torch", "triton" or "flash_attn"
    kv_cache_dtype: str = "auto"  # "auto" (the model's dtype), "fp8" (= "fp8_e4m3") or "fp8_e5m2": 1 byte a value
    seed: int = 0  # seeds random sampling and dummy weights
    skip_tokenizer_init: bool = False  # load no tokenizer: prompts must be token ids, outputs have empty text
    quantization: str | None = None  # "fp8": quantize a float checkpoint's linear weights to FP8 per row as they load
    enable_lora: bool = False  # serve LoRA adapters (LoRARequest) beside the base model
    max_loras: int = 4  # adapters on the device at once: distinct adapters among running requests
    max_lora_rank: int = 16  # largest adapter rank `r` accepted
    max_cpu_loras: int | None = None  # adapters kept in host memory; None = max_loras

    def __post_init__(self) -> None:
        if not os.path.isdir(self.model):
            raise FileNotFoundError(f"model directory {self.model!r} does not exist; pass a Hugging Face model dir")
        _check_positive_int("max_num_batched_tokens", self.max_num_batched_tokens)
        _check_positive_int("max_num_seqs", self.max_num_seqs)
        if self.max_num_prefill_tokens is not None:
            _check_positive_int("max_num_prefill_tokens", self.max_num_prefill_tokens)
        _check_positive_int("max_model_len", self.max_model_len)
        _check_positive_int("tensor_parallel_size", self.tensor_parallel_size)
        _check_positive_int("data_parallel_size", self.data_parallel_size)
        _check_backend(self.distributed_executor_backend, self.data_parallel_size)
        size = self.kvcache_block_size
        if not isinstance(size, int) or size < MIN_BLOCK_SIZE or size & (size - 1):
            raise ValueError(f"kvcache_block_size must be a power of two >= {MIN_BLOCK_SIZE}, got {size!r}")
        if self.num_kvcache_blocks is not None:
            _check_positive_int("num_kvcache_blocks", self.num_kvcache_blocks)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        _check_choice("device", self.device, DEVICES)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("load_format", self.load_format, LOAD_FORMATS)
        _check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}; a quantized checkpoint "
                "(fp8, compressed-tensors, AWQ, GPTQ) needs none: its config.json's quantization_config is read"
            )
        _check_choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        if self.kv_cache_dtype != "auto" and self.attention_backend == "flash_attn":
            raise ValueError(
                f"attention_backend='flash_attn' cannot read kv_cache_dtype={self.kv_cache_dtype!r}: flash-attn 2 "
                "reads only 16-bit caches; use attention_backend='triton' (or 'auto'), or kv_cache_dtype='auto'"
            )

        _check_lora_limits(self.max_loras, self.max_lora_rank, self.max_cpu_loras)

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Each field's one-line description: its comment above, where it is written once (for --help)."""
        lines = inspect.getsource(cls).splitlines()
        return {m["name"]: m["comment"] for m in map(FIELD_LINE.match, lines) if m is not None}

    @classmethod
    def from_kwargs(cls, model: str, **engine_args: Any) -> "EngineConfig":
        """Build from ``LLM``'s keyword arguments; an unknown one is a TypeError listing the valid ones."""
        valid = [f.name for f in dataclasses.fields(cls) if f.name != "model"]
        unknown = sorted(set(engine_args) - set(valid))
        if unknown:
            raise TypeError(f"unknown engine argument(s) {unknown}; valid ones are: {', '.join(valid)}")
        return cls(model=model, **engine_args)


def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_lora_limits(max_loras: int, max_lora_rank: int, max_cpu_loras: int | None) -> None:
    _check_positive_int("max_loras", max_loras)
    _check_positive_int("max_lora_rank", max_lora_rank)
    if max_cpu_loras is not None:
        _check_positive_int("max_cpu_loras", max_cpu_loras)
        if max_cpu_loras < max_loras:
            raise ValueError(
                f"max_cpu_loras={max_cpu_loras} is less than max_loras={max_loras}: every adapter on the device is "
                "also kept in host memory; raise max_cpu_loras or leave it None"
            )


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_backend(backend: object, data_parallel_size: int) -> None:
    _check_choice("distributed_executor_backend", backend, DISTRIBUTED_EXECUTOR_BACKENDS)
    if backend == "ray" and data_parallel_size > 1:
        raise ValueError(
            f"data_parallel_size={data_parallel_size} is not supported with distributed_executor_backend='ray'; "
            "use 'mp' (replicas on this host) or 'external_launcher' (torchrun, across hosts)"
        )
    if backend == "ray" and importlib.util.find_spec("ray") is None:
        raise ValueError(
            "distributed_executor_backend='ray' needs Ray, which is not installed; pip install 'nanovllm[ray]', "
            "or use 'mp' (one host) or 'external_launcher' (torchrun)"
        )
