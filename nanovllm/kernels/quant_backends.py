"""GEMMs over quantized weights behind one interface, chosen once when the engine is built.

    torch   dequantize, then multiply (kernels/quant_reference.py): runs anywhere; the oracle for the others
    triton  on CUDA: the integer-weight GEMM dequantizes in its K loop; FP8 weights quantize the activations
            in one kernel (kernels/triton_fp8_activations.py), then go through torch._scaled_mm where the GPU
            and shapes allow it (Hopper, bfloat16, one scale per row, more than 16 tokens), else through the
            Triton FP8 GEMM (decode batches, blocks of scales, other GPUs and dtypes)

Importing this module imports no Triton: the Triton backend loads its kernels when it is constructed.
"""

from typing import Protocol

import torch
from torch import Tensor

from nanovllm.kernels import quant_reference

SCALED_MM_MIN_CAPABILITY = (9, 0)  # torch._scaled_mm with a scale per row (and per column): Hopper and up
FP8_DOT_MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada and Hopper
SCALED_MM_ALIGNMENT = 16  # torch._scaled_mm needs K and N to be multiples of 16


class QuantizedGemm(Protocol):
    name: str

    def int_weights(
        self, x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int
    ) -> Tensor:
        """x [M, K] @ the integer weight [N, K]^T -> [M, N] (layouts: kernels/quant_reference.py)."""
        ...

    def fp8_weights(self, x: Tensor, weight: Tensor, weight_scale: Tensor, block_k: int | None) -> Tensor:
        """x [M, K], quantized to FP8 per token (and block_k columns), @ the FP8 weight [N, K]^T -> [M, N]."""
        ...


class TorchQuantizedGemm:
    name = "torch"

    def int_weights(
        self, x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int
    ) -> Tensor:
        return quant_reference.int_weight_gemm(x, qweight, scales, zeros, bits, group_size)

    def fp8_weights(self, x: Tensor, weight: Tensor, weight_scale: Tensor, block_k: int | None) -> Tensor:
        return quant_reference.fp8_gemm(x, weight, weight_scale, block_k)


class TritonQuantizedGemm:
    name = "triton"

    def __init__(self, capability: tuple[int, int], dtype: torch.dtype) -> None:
        from nanovllm.kernels import triton_fp8_activations, triton_quant_gemm

        self._kernels = triton_quant_gemm
        self._quantize_activations = triton_fp8_activations.quantize_fp8_per_token_triton
        # FP8 tensor cores keep fewer bits than float32 while they sum inside a dot (on an H200, logprobs of the
        # float32 test models moved by up to 0.2), so a float32 model multiplies the FP8 values' exact bfloat16
        # images instead, summed in float32.
        self.has_fp8_dot = capability >= FP8_DOT_MIN_CAPABILITY and dtype != torch.float32
        # _scaled_mm's per-row scales give bfloat16 outputs only; other dtypes take the Triton FP8 GEMM.
        self.has_scaled_mm = capability >= SCALED_MM_MIN_CAPABILITY and dtype == torch.bfloat16

    def int_weights(
        self, x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int
    ) -> Tensor:
        return self._kernels.int_weight_gemm_triton(x, qweight, scales, zeros, bits, group_size)

    def fp8_weights(self, x: Tensor, weight: Tensor, weight_scale: Tensor, block_k: int | None) -> Tensor:
        x_fp8, x_scales = self._quantize_activations(x, block_k)  # [M, K], [M, num_k_blocks]
        num_out, num_cols = weight.shape
        is_aligned = num_out % SCALED_MM_ALIGNMENT == 0 and num_cols % SCALED_MM_ALIGNMENT == 0
        # At decode sizes the Triton GEMM beat _scaled_mm by 1.3-1.5x on an H200 (benchmarks/quant_gemm.py --sweep).
        is_decode = x.shape[0] <= self._kernels.DECODE_MAX_ROWS
        if self.has_scaled_mm and block_k is None and is_aligned and not is_decode:
            return torch._scaled_mm(
                x_fp8, weight.t(), scale_a=x_scales, scale_b=weight_scale.view(1, num_out), out_dtype=x.dtype
            )  # [M, N]: the scales are [M, 1] and [1, N]
        return self._kernels.fp8_gemm_triton(x_fp8, x_scales, weight, weight_scale, block_k, x.dtype, self.has_fp8_dot)


def select_quantized_gemm(device: torch.device, dtype: torch.dtype) -> QuantizedGemm:
    """The Triton backend on CUDA, the torch reference elsewhere."""
    if device.type != "cuda":
        return TorchQuantizedGemm()
    return TritonQuantizedGemm(torch.cuda.get_device_capability(device), dtype)
