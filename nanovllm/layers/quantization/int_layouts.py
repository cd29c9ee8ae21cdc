"""How compressed-tensors (pack-quantized), AWQ (GEMM) and GPTQ store 4- and 8-bit weights, read into one layout.

Every format stores integer codes packed in int32 words, a scale per group of ``group_size`` input columns,
and (asymmetric) a zero point per group; w = (code - zero) * scale. Where they differ (N = output rows,
K = input columns, G = K / group_size, P = 32 / bits codes per word):

    compressed-tensors  weight_packed [N, K/P], codes along K, code j of a word in bits [j*bits, (j+1)*bits);
                        weight_scale [N, G]; weight_zero_point [ceil(N/P), G], packed along N the same way
                        (asymmetric only); weight_shape [2] = (N, K). Codes and zero points are stored offset
                        by 2^(bits-1) (signed values as unsigned), which cancels in code - zero.
    AWQ (GEMM)          qweight [K, N/8], codes along N, word nibble i holding column AWQ_PACK_ORDER[i] of its
                        8; qzeros [G, N/8], packed likewise; scales [G, N]. 4-bit only.
    GPTQ                qweight [K/P, N], codes along K as compressed-tensors; scales [G, N]; qzeros [G, N/P]
                        holding zero - 1 (the v1 convention: 2^(bits-1) - 1 when symmetric); g_idx [K], the
                        group of each input column (in order when desc_act is false).

Ours, per rank: codes [N, K/P] int32 as compressed-tensors' weight_packed, scales [N, G], zeros [N, G]
(asymmetric only; else the midpoint 2^(bits-1)). Each reader below cuts this rank's shard out of one
checkpoint tensor and returns it in our layout; the tensors that only restate the settings are checked.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from nanovllm.kernels.quant_reference import BITS_PER_WORD, pack_int32, unpack_int32
from nanovllm.layers.quantization.base import (
    COLUMNS,
    ROWS,
    WHOLE,
    FusedSplit,
    WeightShard,
    check_shape,
    entry_range,
    slice_rows_cols,
)

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's GEMM packing: nibble i of a word holds column ORDER[i]
AWQ_CODES_PER_WORD = len(AWQ_PACK_ORDER)


@dataclass(frozen=True)
class IntWeights:
    """A checkpoint's integer weights: the format's settings, read and checked from config.json."""

    layout: str  # "compressed-tensors" (pack-quantized), "awq" (GEMM) or "gptq"
    bits: int  # bits per code: 4 or 8
    group_size: int  # input columns sharing a scale (and zero point)
    has_zero_points: bool  # asymmetric: a zero point per group; symmetric: the midpoint 2^(bits-1)

    @property
    def codes_per_word(self) -> int:
        return BITS_PER_WORD // self.bits


IntReader = Callable[[Tensor, WeightShard, IntWeights], Tensor | None]


@dataclass(frozen=True)
class IntTensor:
    """One checkpoint tensor of a format: its name (our parameter's too), what it holds and how to read it."""

    name: str  # suffix after the module name in the checkpoint, e.g. "qweight"
    role: str  # "codes", "scales", "zeros", or "check" (read and checked, not kept)
    read: IntReader  # checkpoint tensor, this rank's shard, the settings -> this rank's rows (None: a check)
    outputs: str  # where it holds the outputs: a key of OUTPUT_SPLITS, or "packed rows"/"packed columns"


def unpack_awq(packed: Tensor) -> Tensor:
    """AWQ words [rows, N/8] -> codes [rows, N] in column order."""
    nibbles = unpack_int32(packed, 4).unflatten(1, (-1, AWQ_CODES_PER_WORD))  # [rows, N/8, 8], nibble order
    columns = torch.empty_like(nibbles)
    columns[:, :, list(AWQ_PACK_ORDER)] = nibbles  # nibble i is column AWQ_PACK_ORDER[i]
    return columns.flatten(1)


def pack_awq(codes: Tensor) -> Tensor:
    """The inverse of unpack_awq: codes [rows, N] -> AWQ words [rows, N/8]."""
    columns = codes.unflatten(1, (-1, AWQ_CODES_PER_WORD))  # [rows, N/8, 8]
    return pack_int32(columns[:, :, list(AWQ_PACK_ORDER)].flatten(1), 4)


def _groups(shard: WeightShard, w: IntWeights) -> tuple[int, int]:
    return entry_range(shard.in_start, shard.in_size, shard.in_total, w.group_size, "group of input columns")


def _rows(shard: WeightShard) -> tuple[int, int]:
    return shard.out_start, shard.out_size


def read_ct_codes(loaded: Tensor, shard: WeightShard, w: IntWeights) -> Tensor:
    check_shape(loaded, (shard.out_total, shard.in_total // w.codes_per_word), "[out, in / codes per word] int32")
    words = entry_range(shard.in_start, shard.in_size, shard.in_total, w.codes_per_word, "packed word")
    return slice_rows_cols(loaded, _rows(shard), words)


def read_ct_scales(loaded: Tensor, shard: WeightShard, w: IntWeights) -> Tensor:
    check_shape(loaded, (shard.out_total, shard.in_total // w.group_size), "[out, in / group_size]")
    return slice_rows_cols(loaded, _rows(shard), _groups(shard, w))


def read_ct_zeros(loaded: Tensor, shard: WeightShard, w: IntWeights) -> Tensor:
    num_words = -(-shard.out_total // w.codes_per_word)
    check_shape(loaded, (num_words, shard.in_total // w.group_size), "[out / codes per word, in / group_size]")
    zeros = unpack_int32(loaded.t(), w.bits).t()[: shard.out_total]  # [out, in / group_size], unpacked along out
    return slice_rows_cols(zeros, _rows(shard), _groups(shard, w))


def check_ct_shape(loaded: Tensor, shard: WeightShard, w: IntWeights) -> None:
    check_shape(loaded, (2,), "the weight's [out, in]")
    expected = (shard.out_total, shard.in_total)
    if tuple(loaded.tolist()) != expected:
        raise ValueError(f"says the weight is {tuple(loaded.tolist())}, the model's config.json gives {expected}")


def read_awq_codes(loaded: Tensor, shard: WeightShard, w: IntWeights) -> Tensor:
    check_shape(loaded, (shard.in_total, shard.out_total // AWQ_CODES_PER_WORD), "AWQ GEMM [in, out / 8] int32")
    words = entry_range(shard.out_start, shard.out_size, shard.out_total, AWQ_CODES_PER_WORD, "packed word")
    codes = unpack_awq(slice_rows_cols(loaded, (shard.in_start, shard.in_size), words))  # [in_size, out_size]
    return pack_int32(codes.t(), 4)  # [out_size, in_size / 8]


def read_awq_zeros(loaded: Tensor, shard: WeightShard, w: IntWeights) -> Tensor:
    num_groups = shard.in_total // w.group_size
    check_shape(loaded, (num_groups, shard.out_total // AWQ_CODES_PER_WORD), "AWQ [in / group_size, out / 8] int32")
    words = entry_range(shard.out_start, shard.out_size, shard.out_total, AWQ_CODES_PER_WORD, "packed word")
    return unpack_awq(slice_rows_cols(loaded, _groups(shard, w), words)).t()  # [out_size, groups]


def read_transposed_scales(loaded: Tensor, shard: WeightShard, w: IntWeights) -> Tensor:
    check_shape(loaded, (shard.in_total // w.group_size, shard.out_total), "[in / group_size, out]")
    return slice_rows_cols(loaded, _groups(shard, w), _rows(shard)).t()  # [out_size, groups]


def read_gptq_codes(loaded: Tensor, shard: WeightShard, w: IntWeights) -> Tensor:
    check_shape(loaded, (shard.in_total // w.codes_per_word, shard.out_total), "GPTQ [in / codes per word, out]")
    words = entry_range(shard.in_start, shard.in_size, shard.in_total, w.codes_per_word, "packed word")
    return slice_rows_cols(loaded, words, _rows(shard)).t()  # [out_size, in_size / codes per word]


def check_gptq_zeros(loaded: Tensor, shard: WeightShard, w: IntWeights) -> None:
    num_words = -(-shard.out_total // w.codes_per_word)
    check_shape(loaded, (shard.in_total // w.group_size, num_words), "GPTQ [in / group_size, out / codes per word]")
    stored = unpack_int32(loaded, w.bits)[:, : shard.out_total]  # [groups, out]: zero - 1
    expected = (1 << (w.bits - 1)) - 1
    if not bool((stored == expected).all()):
        found = sorted(set(stored.unique().tolist()) - {expected})[:4]
        raise ValueError(
            f"holds zero points {found} besides {expected} (zero - 1 of a symmetric {w.bits}-bit GPTQ "
            "checkpoint); the config says sym=true: only symmetric GPTQ is supported"
        )


def check_gptq_group_index(loaded: Tensor, shard: WeightShard, w: IntWeights) -> None:
    check_shape(loaded, (shard.in_total,), "[in]")
    in_order = torch.arange(shard.in_total, device=loaded.device) // w.group_size
    if not torch.equal(loaded.to(in_order.dtype), in_order):
        raise ValueError(
            "does not list input columns in order (column k in group k // group_size): the weights were "
            "quantized with act-order; desc_act=true checkpoints are not supported"
        )


def _check(check: Callable[[Tensor, WeightShard, IntWeights], None]) -> IntReader:
    def read(loaded: Tensor, shard: WeightShard, w: IntWeights) -> None:
        check(loaded, shard, w)

    return read


INT_LAYOUTS: dict[str, tuple[IntTensor, ...]] = {
    "compressed-tensors": (
        IntTensor("weight_packed", "codes", read_ct_codes, "rows"),
        IntTensor("weight_scale", "scales", read_ct_scales, "rows"),
        IntTensor("weight_zero_point", "zeros", read_ct_zeros, "packed rows"),
        IntTensor("weight_shape", "check", _check(check_ct_shape), "shape"),
    ),
    "awq": (
        IntTensor("qweight", "codes", read_awq_codes, "packed columns"),
        IntTensor("scales", "scales", read_transposed_scales, "columns"),
        IntTensor("qzeros", "zeros", read_awq_zeros, "packed columns"),
    ),
    "gptq": (
        IntTensor("qweight", "codes", read_gptq_codes, "columns"),
        IntTensor("scales", "scales", read_transposed_scales, "columns"),
        IntTensor("qzeros", "check", _check(check_gptq_zeros), "packed columns"),
        IntTensor("g_idx", "check", _check(check_gptq_group_index), "whole"),
    ),
}
# IntTensor.outputs -> how a fused checkpoint tensor (Phi-3's qkv_proj) is cut into its parts; packed ones
# hold codes_per_word outputs in each int32 word of their dim, so the parts are cut in whole words.
OUTPUT_SPLITS = {"rows": ROWS, "columns": COLUMNS, "whole": WHOLE, "shape": FusedSplit(None, is_weight_shape=True)}
PACKED_OUTPUT_DIMS = {"packed rows": 0, "packed columns": 1}


def layout_tensors(w: IntWeights) -> tuple[IntTensor, ...]:
    """The checkpoint tensors of each quantized layer in ``w``'s layout (zero points only when asymmetric)."""
    return tuple(t for t in INT_LAYOUTS[w.layout] if t.role != "zeros" or w.has_zero_points)


def fused_splits(w: IntWeights) -> dict[str, FusedSplit]:
    """Each checkpoint tensor of ``w``'s layout -> where it holds the outputs (models split fused tensors by it)."""
    splits = {}
    for tensor in layout_tensors(w):
        if tensor.outputs in PACKED_OUTPUT_DIMS:
            splits[tensor.name] = FusedSplit(PACKED_OUTPUT_DIMS[tensor.outputs], w.codes_per_word, "packed word")
        else:
            splits[tensor.name] = OUTPUT_SPLITS[tensor.outputs]
    return splits
