"""W4A16 / W8A16: integer weight codes with group scales (and zero points), activations left as they are.

The layer keeps this rank's codes, scales and zero points in one layout whatever the checkpoint's format
(layers/quantization/int_layouts.py); the GEMM dequantizes them in its K loop (kernels/quant_backends.py).
"""

from functools import partial

import torch
from torch import Tensor, nn

from nanovllm.kernels.quant_backends import QuantizedGemm
from nanovllm.layers.quantization.base import ShardedLinear, WeightShard, add_quantized_param
from nanovllm.layers.quantization.int_layouts import IntReader, IntWeights, fused_splits, layout_tensors

# Dummy weights: codes uniform over 0..2^bits-1 around the midpoint, so (code - zero) has a std of about
# 2^bits / sqrt(12); a scale of DUMMY_INT_WEIGHT_STD / that gives weights of about that std.
DUMMY_INT_WEIGHT_STD = 0.02  # as models/loader.py's DUMMY_WEIGHT_STD


class IntWeightScheme:
    """Integer weights in ``weights``'s checkpoint format, multiplied by ``gemm``'s integer-weight GEMM."""

    def __init__(self, weights: IntWeights, gemm: QuantizedGemm) -> None:
        self.weights = weights
        self.gemm = gemm
        self.tensors = layout_tensors(weights)
        self.names = {t.role: t.name for t in self.tensors if t.role != "check"}  # role -> parameter name
        self.fused_splits = fused_splits(weights)

    def create_weights(self, layer: ShardedLinear, output_size: int, input_size: int) -> None:
        w = self.weights
        num_groups = input_size // w.group_size
        shapes = {
            "codes": (output_size, input_size // w.codes_per_word),
            "scales": (output_size, num_groups),
            "zeros": (output_size, num_groups),
            "check": (0,),  # nothing kept
        }
        for tensor in self.tensors:
            dtype = torch.int32 if tensor.role in ("codes", "check") else torch.get_default_dtype()
            data = torch.empty(shapes[tensor.role], dtype=dtype)
            read = partial(_read_with, tensor.read, w)
            add_quantized_param(layer, tensor.name, data, read, partial(self._dummy_fill, tensor.role))

    def _dummy_fill(self, role: str, data: Tensor, generator: torch.Generator) -> None:
        midpoint = 1 << (self.weights.bits - 1)
        if role == "codes":
            data.random_(-(2**31), 2**31 - 1, generator=generator)  # every bit pattern: uniform codes
        elif role == "scales":
            data.fill_(DUMMY_INT_WEIGHT_STD / (2 * midpoint / 12**0.5))
        elif role == "zeros":
            data.fill_(midpoint)

    def apply(self, layer: nn.Module, x: Tensor) -> Tensor:  # [N, input_size] -> [N, output_size]
        zeros = getattr(layer, self.names["zeros"]) if "zeros" in self.names else None
        codes, scales = getattr(layer, self.names["codes"]), getattr(layer, self.names["scales"])
        return self.gemm.int_weights(x, codes, scales, zeros, self.weights.bits, self.weights.group_size)


def _read_with(read: IntReader, weights: IntWeights, loaded: Tensor, shard: WeightShard) -> Tensor | None:
    return read(loaded, shard, weights)
