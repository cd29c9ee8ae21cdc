# mypy: disable-error-code="no-untyped-def"
# (@triton.jit kernels take untyped pointers and scalars; the Python wrappers are typed.)
"""Triton GEMMs over quantized weights: y[M, N] = x[M, K] @ w[N, K]^T, w dequantized inside the K loop.

Same contracts and layouts as kernels/quant_reference.py (the oracle). Each program computes one
[BLOCK_M, BLOCK_N] tile of y, walking K in BLOCK_K steps:

    integer weights   words [BLOCK_K, BLOCK_N] (each int32 read once per code it holds, from cache)
                      -> codes (word >> (k % codes_per_word) * bits) & mask -> (code - zero) * scale, in x's
                      dtype -> tl.dot with the x tile. BLOCK_K divides group_size: one scale per step.
    FP8 weights       x already quantized per token (and block); tl.dot of the FP8 tiles (upcast where the
                      GPU has no FP8 dot) times the step's activation scale [BLOCK_M] and weight scale
                      [BLOCK_N]. BLOCK_K divides the scale block: one scale per step.

The tile sizes depend only on the shapes, so a CUDA graph captures one launch per bucket. They are
reasonable first choices, not tuned on a GPU: decode (M <= DECODE_MAX_ROWS) uses narrow N tiles so
that more programs stream the weight at once.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

DECODE_MAX_ROWS = 16  # at most this many rows (tokens): decode tiles; tl.dot needs tiles of at least 16


@dataclass(frozen=True)
class TileSizes:
    """One program's share of y and how far it steps along K."""

    block_m: int  # rows of x and y per program
    block_n: int  # output columns per program
    block_k: int  # input columns per step


DECODE_TILES = TileSizes(block_m=16, block_n=32, block_k=64)  # few rows: more programs over N
PREFILL_TILES = TileSizes(block_m=64, block_n=64, block_k=64)  # many rows: reuse each weight tile


def pick_tiles(num_rows: int, k_step_limit: int) -> TileSizes:
    """The tiles for M = num_rows, with BLOCK_K dividing k_step_limit (a group or scale block: a power of two)."""
    tiles = DECODE_TILES if num_rows <= DECODE_MAX_ROWS else PREFILL_TILES
    return TileSizes(tiles.block_m, tiles.block_n, min(tiles.block_k, k_step_limit))


@triton.jit
def _tile_rows_and_columns(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's rows of x and y [BLOCK_M] and output columns [BLOCK_N]."""
    return tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M), tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _load_x_tile(x_ptr, offs_m, k, M, K, stride_xm):
    """x[offs_m, k] as [BLOCK_M, BLOCK_K], zeros past M and K."""
    mask = (offs_m[:, None] < M) & (k[None, :] < K)
    return tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=mask, other=0.0)


@triton.jit
def _store_y_tile(y_ptr, acc, offs_m, offs_n, M, N, stride_ym):
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _int_weight_gemm_kernel(
    x_ptr,  # [M, K]
    qweight_ptr,  # [N, K / CODES_PER_WORD] int32
    scales_ptr,  # [N, K / GROUP_SIZE]
    zeros_ptr,  # [N, K / GROUP_SIZE], unused without HAS_ZEROS
    y_ptr,  # [M, N]
    M,
    N,
    K,
    stride_xm,
    stride_qn,
    stride_sn,
    stride_zn,
    stride_ym,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # x's dtype on a GPU; float32 under the CPU interpreter (see _int_dot_options)
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 operands (exact products), else "tf32" (unused by 16-bit)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    CODES_PER_WORD: tl.constexpr = 32 // BITS
    offs_m, offs_n = _tile_rows_and_columns(BLOCK_M, BLOCK_N)  # [BLOCK_M], [BLOCK_N]
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k = k_start + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        mask_k = k < K
        x = _load_x_tile(x_ptr, offs_m, k, M, K, stride_xm)  # [BLOCK_M, BLOCK_K]
        words = tl.load(
            qweight_ptr + offs_n[None, :] * stride_qn + (k // CODES_PER_WORD)[:, None],
            mask=mask_k[:, None] & mask_n[None, :],
            other=0,
        )  # [BLOCK_K, BLOCK_N] int32
        codes = (words >> ((k % CODES_PER_WORD) * BITS)[:, None]) & ((1 << BITS) - 1)
        group = k_start // GROUP_SIZE
        scale = tl.load(scales_ptr + offs_n * stride_sn + group, mask=mask_n, other=0.0).to(tl.float32)  # [BLOCK_N]
        if HAS_ZEROS:
            zero = tl.load(zeros_ptr + offs_n * stride_zn + group, mask=mask_n, other=0.0).to(tl.float32)
            w = (codes.to(tl.float32) - zero[None, :]) * scale[None, :]  # [BLOCK_K, BLOCK_N]
        else:
            w = (codes.to(tl.float32) - (1 << (BITS - 1))) * scale[None, :]
        acc += tl.dot(x.to(DOT_DTYPE), w.to(x.dtype).to(DOT_DTYPE), input_precision=DOT_PRECISION)
    _store_y_tile(y_ptr, acc, offs_m, offs_n, M, N, stride_ym)


def _int_dot_options(x: torch.Tensor) -> dict[str, tl.dtype | str]:
    """The dequantized tile is rounded to x's dtype (as the reference rounds the weight), then multiplied in
    x's dtype on a GPU. On CPU the operands go up to float32: Triton's interpreter multiplies the raw bits of
    bfloat16 operands (triton-lang/triton#11584), as kernels/triton_attention.py notes."""
    is_fp32 = x.dtype == torch.float32 or x.device.type == "cpu"
    dot_dtype = tl.float32 if is_fp32 else {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[x.dtype]
    return {"DOT_DTYPE": dot_dtype, "DOT_PRECISION": "ieee" if is_fp32 else "tf32"}


def int_weight_gemm_triton(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # [N, K * bits / 32] int32
    scales: torch.Tensor,  # [N, K / group_size]
    zeros: torch.Tensor | None,  # [N, K / group_size]; None = the midpoint 2^(bits-1)
    bits: int,
    group_size: int,
) -> torch.Tensor:  # [M, N] in x's dtype
    """W4A16 / W8A16: see kernels/quant_reference.int_weight_gemm for the contract."""
    x = x.contiguous()
    num_rows, num_cols = x.shape
    num_out = qweight.shape[0]
    y = torch.empty(num_rows, num_out, dtype=x.dtype, device=x.device)
    tiles = pick_tiles(num_rows, group_size)
    grid = (triton.cdiv(num_rows, tiles.block_m), triton.cdiv(num_out, tiles.block_n))
    _int_weight_gemm_kernel[grid](
        x, qweight, scales, scales if zeros is None else zeros, y,
        num_rows, num_out, num_cols,
        x.stride(0), qweight.stride(0), scales.stride(0), scales.stride(0) if zeros is None else zeros.stride(0),
        y.stride(0),
        BITS=bits, GROUP_SIZE=group_size, HAS_ZEROS=zeros is not None, **_int_dot_options(x),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
    )  # fmt: skip
    return y


@triton.jit
def _fp8_gemm_kernel(
    x_ptr,  # [M, K] float8_e4m3fn
    x_scales_ptr,  # [M, num_k_blocks] float32
    w_ptr,  # [N, K] float8_e4m3fn
    w_scales_ptr,  # [N, num_k_blocks] float32
    y_ptr,  # [M, N]
    M,
    N,
    K,
    stride_xm,
    stride_xsm,
    stride_wn,
    stride_wsn,
    stride_ym,
    SCALE_BLOCK_K: tl.constexpr,  # input columns per scale
    DOT_DTYPE: tl.constexpr,  # FP8 where the GPU multiplies it natively, else a wider type holding it exactly
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m, offs_n = _tile_rows_and_columns(BLOCK_M, BLOCK_N)  # [BLOCK_M], [BLOCK_N]
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k = k_start + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        mask_k = k < K
        x = _load_x_tile(x_ptr, offs_m, k, M, K, stride_xm)  # [BLOCK_M, BLOCK_K] FP8
        w = tl.load(
            w_ptr + offs_n[None, :] * stride_wn + k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0
        )  # [BLOCK_K, BLOCK_N]
        scale_idx = k_start // SCALE_BLOCK_K
        x_scale = tl.load(x_scales_ptr + offs_m * stride_xsm + scale_idx, mask=mask_m, other=0.0)  # [BLOCK_M]
        w_scale = tl.load(w_scales_ptr + offs_n * stride_wsn + scale_idx, mask=mask_n, other=0.0)  # [BLOCK_N]
        partial = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), out_dtype=tl.float32)  # [BLOCK_M, BLOCK_N]
        acc += partial * x_scale[:, None] * w_scale[None, :]
    _store_y_tile(y_ptr, acc, offs_m, offs_n, M, N, stride_ym)


def fp8_gemm_triton(
    x_fp8: torch.Tensor,  # [M, K] float8_e4m3fn, quantized per token (and block)
    x_scales: torch.Tensor,  # [M, num_k_blocks] float32
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale: torch.Tensor,  # [N, num_k_blocks] float32
    block_k: int | None,  # input columns per scale (a power of two); None = one scale per row
    out_dtype: torch.dtype,
    has_fp8_dot: bool,  # the GPU multiplies FP8 natively (compute capability 8.9 and up)
) -> torch.Tensor:  # [M, N]
    """W8A8 with per-row (or per-row-and-block) scales on both sides: see quant_reference.fp8_gemm."""
    num_rows, num_cols = x_fp8.shape
    num_out = weight.shape[0]
    y = torch.empty(num_rows, num_out, dtype=out_dtype, device=x_fp8.device)
    # One scale per row puts no limit on the step; blocks of scales need steps that stay inside one block.
    tiles = pick_tiles(num_rows, block_k or PREFILL_TILES.block_k)
    scale_block_k = block_k or num_cols  # one block: every step reads scale column 0
    grid = (triton.cdiv(num_rows, tiles.block_m), triton.cdiv(num_out, tiles.block_n))
    # Without an FP8 dot, bfloat16 holds every E4M3 value exactly (under the CPU interpreter: float32).
    dot_dtype = tl.float8e4nv if has_fp8_dot else (tl.bfloat16 if x_fp8.is_cuda else tl.float32)
    _fp8_gemm_kernel[grid](
        x_fp8, x_scales, weight, weight_scale, y,
        num_rows, num_out, num_cols,
        x_fp8.stride(0), x_scales.stride(0), weight.stride(0), weight_scale.stride(0), y.stride(0),
        SCALE_BLOCK_K=scale_block_k, DOT_DTYPE=dot_dtype,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
    )  # fmt: skip
    return y
