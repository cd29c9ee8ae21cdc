# mypy: disable-error-code="no-untyped-def"
# (@triton.jit kernels take untyped pointers and scalars; the Python wrapper is typed.)
"""Dynamic FP8 activations in one launch: what kernels/quant_reference.quantize_fp8_per_token computes with
about ten torch operations, which at decode sizes cost more than the GEMM they feed.

One program per (token, group of columns) makes two passes over its group: the largest magnitude, then each
value divided by the group's scale (amax / 448, or the smallest scale for an all-zero group), rounded and
saturated to E4M3 by kernels/triton_fp8.encode_fp8 and written through a uint8 view. The division is
rounded to nearest (``div_rn``), as torch's is, so the bytes equal the reference's; the second pass reads
the group back from the L2 cache.
"""

import torch
import triton
import triton.language as tl

from nanovllm.kernels.quant_reference import FP8_DTYPE, FP8_MAX, MIN_FP8_SCALE
from nanovllm.kernels.triton_fp8 import encode_fp8, fp8_format

BLOCK_SIZE = 1024  # columns per load
E4M3 = fp8_format(FP8_DTYPE)


@triton.jit
def _load_chunk(x_ptr, row, stride_xm, start, offset, group_size, num_cols, BLOCK: tl.constexpr):
    """Columns [start + offset, + BLOCK) of x's row, within the group and the row, as float32 (0 past them)."""
    cols = start + offset + tl.arange(0, BLOCK)  # [BLOCK]
    mask = (offset + tl.arange(0, BLOCK) < group_size) & (cols < num_cols)
    return cols, mask, tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _quantize_per_token_kernel(
    x_ptr,  # [M, K]
    out_ptr,  # [M, K] uint8: the FP8 bytes
    scales_ptr,  # [M, num_groups] float32
    num_cols,
    group_size,  # columns per scale; the last group may be partial
    stride_xm,
    stride_om,
    stride_sm,
    MIN_SCALE: tl.constexpr,
    MANTISSA_BITS: tl.constexpr,
    EXPONENT_BIAS: tl.constexpr,
    MAX_VALUE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row, group = tl.program_id(0).to(tl.int64), tl.program_id(1)
    start = group * group_size
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for offset in range(0, group_size, BLOCK):
        _, _, values = _load_chunk(x_ptr, row, stride_xm, start, offset, group_size, num_cols, BLOCK)
        amax = tl.maximum(amax, tl.abs(values))
    scale = tl.math.div_rn(tl.max(amax, axis=0), MAX_VALUE)
    scale = tl.where(scale == 0.0, MIN_SCALE, scale)
    tl.store(scales_ptr + row * stride_sm + group, scale)
    for offset in range(0, group_size, BLOCK):
        cols, mask, values = _load_chunk(x_ptr, row, stride_xm, start, offset, group_size, num_cols, BLOCK)
        codes = encode_fp8(tl.math.div_rn(values, scale), MANTISSA_BITS, EXPONENT_BIAS, MAX_VALUE)
        tl.store(out_ptr + row * stride_om + cols, codes, mask=mask)


def quantize_fp8_per_token_triton(x: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x_fp8 [M, K] float8_e4m3fn, scales [M, ceil(K / group_size) or 1] float32): the same
    values as quant_reference.quantize_fp8_per_token."""
    num_rows, num_cols = x.shape
    group_size = group_size or num_cols
    num_groups = triton.cdiv(num_cols, group_size)
    x_fp8 = torch.empty(num_rows, num_cols, dtype=FP8_DTYPE, device=x.device)
    scales = torch.empty(num_rows, num_groups, dtype=torch.float32, device=x.device)
    if x.stride(1) != 1:
        x = x.contiguous()
    _quantize_per_token_kernel[(num_rows, num_groups)](
        x, x_fp8.view(torch.uint8), scales,
        num_cols, group_size, x.stride(0), x_fp8.stride(0), scales.stride(0),
        MIN_SCALE=MIN_FP8_SCALE, MANTISSA_BITS=E4M3.mantissa_bits, EXPONENT_BIAS=E4M3.exponent_bias,
        MAX_VALUE=FP8_MAX, BLOCK=min(BLOCK_SIZE, triton.next_power_of_2(group_size)),
    )  # fmt: skip
    return x_fp8, scales
