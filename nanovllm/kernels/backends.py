"""Attention backends behind one interface, chosen once when the engine is built.

    torch       plain PyTorch (kernels/reference.py): runs anywhere; the oracle for the others
    triton      our Triton kernels: the default on CUDA when flash-attn is absent, and for an FP8 cache
    flash_attn  the flash-attn package, when it imports (KV block size a multiple of 256; no FP8 cache)

Every backend stores K and V quantized with the layer's k_scale and v_scale and reads them back
dequantized, as kernels/reference.py spells out; a cache in the model's dtype has scales 1.0.

Importing this module imports neither Triton nor flash-attn: a backend loads its kernels
when it is constructed.
"""

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from nanovllm.kernels import reference
from nanovllm.kernels.quant_backends import QuantizedGemm, TorchQuantizedGemm
from nanovllm.utils.context import AttentionMetadata

FLASH_ATTN_BLOCK_MULTIPLE = 256  # flash-attn's paged KV needs page sizes that are multiples of 256
# Triton converts FP8 (float8e4nv) in hardware from compute capability 8.9 (Ada, Hopper) on.
MIN_FP8_CAPABILITY = (8, 9)


class AttentionBackend(Protocol):
    name: str
    is_graph_capturable: bool  # whether a CUDA graph can capture it (no shapes computed from data)

    def store_kv(
        self, key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
        k_scale: float = 1.0, v_scale: float = 1.0,
    ) -> None:  # fmt: skip
        """Write key/value [N, num_kv_heads, head_dim] / their scales into the caches at slot_mapping [N]
        (-1 = skip); an FP8 cache gets them rounded to nearest and saturated at the format's largest value."""
        ...

    def forward(
        self,
        query: Tensor,  # [N, num_heads, head_dim]
        key: Tensor,  # [N, num_kv_heads, head_dim], already stored in the cache
        value: Tensor,
        k_cache: Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: Tensor,
        metadata: AttentionMetadata,
        scale: float,  # of the softmax
        sliding_window: int | None,  # keys each query sees, itself included; None: every key before it
        k_scale: float = 1.0,  # the caches hold K / k_scale and V / v_scale
        v_scale: float = 1.0,
    ) -> Tensor:  # [N, num_heads, head_dim]
        ...


@dataclass(frozen=True)
class Kernels:
    """The hardware-specific choices a model is built with, made once at engine construction."""

    attention: AttentionBackend  # paged attention and KV store
    compile_ops: bool  # torch.compile the small ops no Triton kernel runs (LayerNorm, partial rotary, the sampler)
    triton_rotary: bool = False  # q/k RMSNorm and rotary in one Triton kernel (kernels/triton_rotary.py)
    triton_norms: bool = False  # the decoders' RMSNorms, with their residual adds, in Triton (kernels/triton_norm.py)
    triton_activation: bool = False  # gated MLPs' act(gate) * up in one Triton kernel (kernels/triton_activation.py)
    triton_moe: bool = False  # mixture-of-experts routing and experts in Triton (kernels/triton_fused_moe.py)
    quantized_gemm: QuantizedGemm = field(default_factory=TorchQuantizedGemm)  # GEMMs of quantized linear layers


class TorchBackend:
    """The reference: gathers each sequence's cache and calls scaled_dot_product_attention."""

    name = "torch"
    is_graph_capturable = False  # repeat_interleave sizes its output from data

    def store_kv(
        self, key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
        k_scale: float = 1.0, v_scale: float = 1.0,
    ) -> None:  # fmt: skip
        reference.store_kv(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        metadata: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> Tensor:
        m = metadata
        return reference.paged_attention(
            query, k_cache, v_cache, m.cu_seqlens_q, m.max_seqlen_q, m.context_lens, m.max_context_len,
            m.block_tables, scale, sliding_window, k_scale, v_scale,
        )  # fmt: skip


class TritonBackend:
    """Our Triton kernels: a prefill kernel over cached prefixes and a split-KV decode kernel."""

    name = "triton"
    is_graph_capturable = True

    def __init__(self) -> None:
        from nanovllm.kernels import triton_decode_attention, triton_kv_store, triton_prefill_attention

        self._prefill = triton_prefill_attention.paged_prefill_attention_triton
        self._decode = triton_decode_attention.paged_decode_attention_triton
        self._store = triton_kv_store.store_kv_triton

    def store_kv(
        self, key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
        k_scale: float = 1.0, v_scale: float = 1.0,
    ) -> None:  # fmt: skip
        self._store(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        metadata: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> Tensor:
        m = metadata
        if m.is_prefill:
            return self._prefill(
                query, k_cache, v_cache, m.cu_seqlens_q, m.max_seqlen_q, m.context_lens, m.max_context_len,
                m.block_tables, scale, sliding_window, k_scale, v_scale,
            )  # fmt: skip
        return self._decode(
            query, k_cache, v_cache, m.context_lens, m.max_context_len, m.block_tables, scale,
            sliding_window=sliding_window, k_scale=k_scale, v_scale=v_scale,
        )  # fmt: skip


class FlashAttnBackend(TritonBackend):
    """flash-attn: varlen prefill reading cached prefixes through the block table, and kvcache decode.

    It has no KV-store kernel of its own, so it keeps our Triton one (inherited ``store_kv``). A sliding
    window is its ``window_size=(window - 1, 0)``: keys at most window - 1 before the query, none after.
    flash-attn 2 reads only 16-bit caches, so it never runs with an FP8 cache (EngineConfig refuses the pair)
    and its scales are always 1.0.
    """

    name = "flash_attn"

    def __init__(self) -> None:
        super().__init__()
        import flash_attn

        self._varlen = flash_attn.flash_attn_varlen_func
        self._with_kvcache = flash_attn.flash_attn_with_kvcache

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        metadata: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> Tensor:
        m = metadata
        window_size = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)  # (-1, -1): no window
        if m.is_prefill:
            cu_seqlens_k = torch.nn.functional.pad(m.context_lens.cumsum(0, dtype=torch.int32), (1, 0))
            return self._varlen(
                query, k_cache, v_cache, cu_seqlens_q=m.cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                max_seqlen_q=m.max_seqlen_q, max_seqlen_k=m.max_context_len, softmax_scale=scale, causal=True,
                block_table=m.block_tables, window_size=window_size,
            )  # fmt: skip
        out = self._with_kvcache(
            query.unsqueeze(1), k_cache, v_cache, cache_seqlens=m.context_lens, block_table=m.block_tables,
            softmax_scale=scale, causal=True, window_size=window_size,
        )  # fmt: skip  # [B, 1, num_heads, head_dim]
        return out.squeeze(1)


def is_flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_backend_name(
    name: str, device_type: str, block_size: int, has_flash_attn: bool, is_fp8_cache: bool = False
) -> str:
    """Which backend ``attention_backend=name`` means here; an error when it cannot run.

    "auto" is flash_attn when installed (and the block size suits it, and the cache is not FP8), else
    triton on CUDA, torch on CPU. Triton also runs on CPU tensors under its interpreter
    (TRITON_INTERPRET=1), which tests use.
    """
    can_run_triton = device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    if name == "auto":
        if device_type != "cuda":
            return "torch"
        suits_flash_attn = block_size % FLASH_ATTN_BLOCK_MULTIPLE == 0 and not is_fp8_cache
        return "flash_attn" if has_flash_attn and suits_flash_attn else "triton"
    if name == "triton" and not can_run_triton:
        raise ValueError(f"attention_backend='triton' needs a CUDA device (or TRITON_INTERPRET=1), not {device_type}")
    if name == "flash_attn":
        if device_type != "cuda":
            raise ValueError(f"attention_backend='flash_attn' needs a CUDA device, not {device_type}")
        if not has_flash_attn:
            raise ValueError("attention_backend='flash_attn' but the flash_attn package is not installed; use 'triton'")
        if block_size % FLASH_ATTN_BLOCK_MULTIPLE:
            raise ValueError(
                f"attention_backend='flash_attn' needs kvcache_block_size to be a multiple of "
                f"{FLASH_ATTN_BLOCK_MULTIPLE}, got {block_size}; change the block size or use 'triton'"
            )
    return name


def check_fp8_cache_support(backend_name: str, cache_dtype: torch.dtype, capability: tuple[int, int] | None) -> None:
    """Refuse an FP8 cache where the Triton kernels cannot convert FP8 (``capability``: the GPU's, None on CPU).

    flash_attn with FP8 never gets here: EngineConfig refuses the pair, and "auto" picks triton for FP8.
    """
    if backend_name == "triton" and capability is not None and capability < MIN_FP8_CAPABILITY:
        major, minor = MIN_FP8_CAPABILITY
        raise ValueError(
            f"an FP8 KV cache ({cache_dtype}, from kv_cache_dtype) read by attention_backend='triton' needs a GPU "
            f"of compute capability {major}.{minor}+ (Ada, Hopper); this one is {capability[0]}.{capability[1]}. "
            "Use kv_cache_dtype='auto', or attention_backend='torch' (slow)"
        )


def select_attention_backend(
    name: str, device: torch.device, block_size: int, kv_cache_dtype: torch.dtype
) -> AttentionBackend:
    """Build the backend for ``attention_backend=name`` on ``device`` for a KV cache of ``kv_cache_dtype``."""
    is_fp8_cache = kv_cache_dtype in reference.FP8_DTYPES
    resolved = resolve_backend_name(name, device.type, block_size, is_flash_attn_installed(), is_fp8_cache)
    if is_fp8_cache:
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        check_fp8_cache_support(resolved, kv_cache_dtype, capability)
    backends: dict[str, type[TorchBackend | TritonBackend | FlashAttnBackend]] = {
        "torch": TorchBackend,
        "triton": TritonBackend,
        "flash_attn": FlashAttnBackend,
    }
    return backends[resolved]()
