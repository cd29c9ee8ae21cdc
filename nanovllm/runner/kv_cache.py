"""The KV cache's plan: its dtype, the bytes of one block, each layer's scales, and the one tensor holding it.

    kv_cache: [2 (K, V), num_layers, num_blocks, block_size, num_kv_heads, head_dim]
    layer i reads and writes kv_cache[0, i] (K) and kv_cache[1, i] (V)

``kv_cache_dtype="auto"`` stores K and V in the model's dtype. ``"fp8"`` (= ``"fp8_e4m3"``) and
``"fp8_e5m2"`` store one byte a value, half of bfloat16's two: a block takes half the bytes, so the same
memory holds twice the blocks and twice the tokens. An FP8 layer holds K / k_scale and V / v_scale,
its scales read from the checkpoint (models/kv_scales.py); how many blocks fit is the model runner's
business (``ModelRunner._plan_num_blocks``), counted in these bytes.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nanovllm.config import EngineConfig
from nanovllm.kernels.reference import FP8_DTYPES
from nanovllm.layers.attention import Attention
from nanovllm.models.arch import read_config_json
from nanovllm.models.kv_scales import DEFAULT_KV_SCALE, KVScales, read_kv_scales

# kv_cache_dtype -> the cache's torch dtype ("auto" is the model's).
FP8_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
UNIT_SCALES = KVScales(DEFAULT_KV_SCALE, DEFAULT_KV_SCALE)
MEMORY_PAGE_BYTES = 4096  # the host's memory page (x86-64 and most ARM Linux)


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's dtype for ``kv_cache_dtype=name`` (validated by EngineConfig)."""
    return model_dtype if name == "auto" else FP8_CACHE_DTYPES[name]


def plan_kv_scales(config: EngineConfig, cache_dtype: torch.dtype, num_layers: int) -> list[KVScales]:
    """Each layer's scales: the checkpoint's for an FP8 cache (models/kv_scales.py), else 1.0.

    Dummy weights have no checkpoint, so their FP8 scales are 1.0 too. Called before the model is built,
    so that scales of the wrong shape are refused before any memory is taken.
    """
    if cache_dtype not in FP8_DTYPES or config.load_format == "dummy":
        return [UNIT_SCALES] * num_layers
    return read_kv_scales(config.model, read_config_json(config.model), num_layers)


@dataclass(frozen=True)
class KVCacheLayout:
    """This rank's KV cache, all but its number of blocks."""

    num_layers: int  # attention layers
    block_size: int  # tokens per block
    num_kv_heads: int  # key/value heads on this rank
    head_dim: int
    dtype: torch.dtype  # of the stored values: the model's dtype, or an FP8 one

    @classmethod
    def of(cls, layers: Sequence[Attention], block_size: int, dtype: torch.dtype) -> "KVCacheLayout":
        """The layout of these attention layers' cache (the layers of one model share their head shapes)."""
        return cls(len(layers), block_size, layers[0].num_kv_heads, layers[0].head_dim, dtype)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block: every layer's K and V for block_size tokens."""
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def allocate(self, num_blocks: int, device: torch.device) -> torch.Tensor:
        """The cache tensor, uninitialized: [2, num_layers, num_blocks, block_size, num_kv_heads, head_dim]."""
        shape = (2, self.num_layers, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        kv_cache = torch.empty(shape, dtype=self.dtype, device=device)
        if device.type == "cpu":
            # Take every page of host memory now: blocks are reused least recently freed first, so a cache
            # touched lazily grows the process's memory for a long time, as if it leaked. One byte per page is
            # written; the rest keeps what torch.empty gave (NaN in the tests that ask for it).
            kv_cache.view(torch.uint8).view(-1)[::MEMORY_PAGE_BYTES] = 0
        return kv_cache


def bind_kv_cache(kv_cache: torch.Tensor, layers: Sequence[Attention], scales: Sequence[KVScales]) -> None:
    """Give attention layer i its slices kv_cache[0, i] and kv_cache[1, i], and its scales."""
    for i, (layer, layer_scales) in enumerate(zip(layers, scales, strict=True)):
        layer.bind_kv_cache(kv_cache[0, i], kv_cache[1, i], layer_scales.k, layer_scales.v)
