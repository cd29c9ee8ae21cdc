"""W8A8 FP8: E4M3 weights with a scale per tensor, per output row or per block; activations quantized per token.

Three sources, one layout per rank: ``weight`` [N, K] float8_e4m3fn and ``weight_scale`` [N, num_k_blocks]
float32, one column unless the scales are blocked, each row holding its own scales:

    compressed-tensors float-quantized   weight; weight_scale [1] (tensor), [N, 1] (channel) or
                                         [ceil(N/bn), ceil(K/bk)] (block)
    quant_method "fp8"                   weight; weight_scale_inv [ceil(N/bn), ceil(K/bk)] (block-wise, what
                                         Qwen publishes; multiplied, despite the name) or weight_scale [] (tensor)
    quantization="fp8" (online)          a float checkpoint's weight, quantized per row as it loads

A tensor scale becomes a scale per row, so a fused layer's parts keep theirs; a block scale is repeated on
each of its block's rows, so any split of rows over ranks keeps the right scale (K is split on block edges).
Activations get one scale per token, or per token and bk columns under block scales, as the formats define.
"""

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from nanovllm.kernels.quant_backends import QuantizedGemm
from nanovllm.kernels.quant_reference import FP8_DTYPE, quantize_fp8_per_row
from nanovllm.layers.quantization.base import (
    ROWS,
    WHOLE,
    FusedSplit,
    Reader,
    ShardedLinear,
    WeightShard,
    add_quantized_param,
    check_shape,
)

DUMMY_FP8_WEIGHT_STD = 0.02  # dummy weights' spread, as models/loader.py's DUMMY_WEIGHT_STD


@dataclass(frozen=True)
class Fp8Weights:
    """A checkpoint's FP8 weights (or the online quantization of float ones), read and checked from config.json."""

    layout: str  # "compressed-tensors", "fp8" (quant_method) or "online" (quantization="fp8")
    scale: str  # what one weight scale covers: "tensor", "channel" (an output row) or "block"
    block_size: tuple[int, int] | None  # (rows, columns) of a block when scale == "block"

    @property
    def scale_name(self) -> str:
        return "weight_scale_inv" if self.layout == "fp8" and self.scale == "block" else "weight_scale"

    @property
    def block_k(self) -> int | None:
        """Input columns per scale (weights and activations); None = whole rows."""
        return self.block_size[1] if self.block_size is not None else None


class Fp8WeightScheme:
    """FP8 weights from ``weights``'s source, multiplied by ``gemm``'s FP8 GEMM."""

    def __init__(self, weights: Fp8Weights, gemm: QuantizedGemm) -> None:
        self.weights = weights
        self.gemm = gemm
        self.names = {"values": "weight", "scales": weights.scale_name}  # role -> parameter (or buffer) name
        self.fused_splits = {"weight": ROWS, weights.scale_name: _scale_split(weights)}

    def create_weights(self, layer: ShardedLinear, output_size: int, input_size: int) -> None:
        w = self.weights
        num_scale_cols = -(-input_size // w.block_size[1]) if w.block_size is not None else 1
        scales = torch.ones(output_size, num_scale_cols, dtype=torch.float32)  # [N, num_k_blocks]
        weight = torch.empty(output_size, input_size, dtype=FP8_DTYPE)
        read_weight: Reader
        if w.layout == "online":
            layer.register_buffer("weight_scale", scales)  # filled by the weight's loader: no checkpoint tensor
            read_weight = partial(_quantize_rows, layer)
        else:
            read_weight = _read_fp8_weight
            add_quantized_param(layer, w.scale_name, scales, partial(_read_scale, w), _fill_dummy_scale)
        online_layer = layer if w.layout == "online" else None
        add_quantized_param(layer, "weight", weight, read_weight, partial(_fill_dummy_weight, online_layer))

    def apply(self, layer: nn.Module, x: Tensor) -> Tensor:  # [N, input_size] -> [N, output_size]
        weight, scale = layer.get_parameter("weight"), getattr(layer, self.names["scales"])
        return self.gemm.fp8_weights(x, weight, scale, self.weights.block_k)


def _scale_split(w: Fp8Weights) -> FusedSplit:
    """Where the scales hold the outputs: one for all (tensor), one per row (channel), one per block_n rows."""
    if w.block_size is None:
        return WHOLE if w.scale == "tensor" else ROWS
    return FusedSplit(0, w.block_size[0], "scale block")


def _this_rank(loaded: Tensor, shard: WeightShard) -> Tensor:
    check_shape(loaded, (shard.out_total, shard.in_total), "[out, in]")
    return loaded.narrow(0, shard.out_start, shard.out_size).narrow(1, shard.in_start, shard.in_size)


def _read_fp8_weight(loaded: Tensor, shard: WeightShard) -> Tensor:
    if loaded.dtype != FP8_DTYPE:
        raise ValueError(f"is {loaded.dtype}, expected {FP8_DTYPE} (E4M3); other FP8 kinds are not supported")
    return _this_rank(loaded, shard)


def _quantize_rows(layer: ShardedLinear, loaded: Tensor, shard: WeightShard) -> Tensor:
    """Online quantization: this rank's float rows -> FP8 values (returned) and their scales (stored here)."""
    if not loaded.is_floating_point() or loaded.dtype == FP8_DTYPE:
        raise ValueError(f"is {loaded.dtype}; quantization='fp8' quantizes float (bf16, fp16, fp32) weights")
    scale_rows = layer.weight_scale.narrow(0, shard.out_offset, shard.out_size)  # type: ignore[attr-defined]
    rows = _this_rank(loaded, shard).to(scale_rows.device, torch.float32)  # quantized where the weights live
    values, scales = quantize_fp8_per_row(rows)  # [rows, in] FP8, [rows] float32
    scale_rows.copy_(scales.unsqueeze(1))
    return values


def _read_scale(w: Fp8Weights, loaded: Tensor, shard: WeightShard) -> Tensor:
    """This rank's rows of scales, [out_size, num_k_blocks] float32."""
    loaded = loaded.to(torch.float32)
    if w.scale == "tensor":
        if loaded.numel() != 1:
            raise ValueError(f"has shape {tuple(loaded.shape)}, expected one value (a per-tensor scale)")
        return loaded.reshape(1, 1).expand(shard.out_size, 1)
    if w.scale == "channel":
        if tuple(loaded.shape) not in ((shard.out_total, 1), (shard.out_total,)):
            raise ValueError(f"has shape {tuple(loaded.shape)}, expected ({shard.out_total}, 1) (a scale per row)")
        return loaded.reshape(-1, 1).narrow(0, shard.out_start, shard.out_size)
    assert w.block_size is not None, "block scales come with a block size (checked in models/quant_config.py)"
    block_n, block_k = w.block_size
    check_shape(loaded, (-(-shard.out_total // block_n), -(-shard.in_total // block_k)), f"blocks of {w.block_size}")
    if shard.in_start % block_k:
        raise ValueError(f"this rank's input columns start at {shard.in_start}, inside a block of {block_k}")
    block_rows = torch.arange(shard.out_start, shard.out_start + shard.out_size, device=loaded.device) // block_n
    return loaded[block_rows].narrow(1, shard.in_start // block_k, -(-shard.in_size // block_k))


def _fill_dummy_scale(data: Tensor, generator: torch.Generator) -> None:
    data.fill_(DUMMY_FP8_WEIGHT_STD)


def _fill_dummy_weight(online_layer: ShardedLinear | None, data: Tensor, generator: torch.Generator) -> None:
    """Standard normal FP8 values; with the scales at DUMMY_FP8_WEIGHT_STD, weights of that spread."""
    data.copy_(torch.randn(data.shape, generator=generator, device=data.device).to(FP8_DTYPE))
    if online_layer is not None:  # its scales are a buffer, which no loader visits
        online_layer.weight_scale.fill_(DUMMY_FP8_WEIGHT_STD)  # type: ignore[attr-defined]
