# mypy: disable-error-code="no-untyped-def"
# (@triton.jit kernels take untyped pointers and scalars; the Python wrappers are typed.)
"""Triton GEMMs over quantized weights: y[M, N] = x[M, K] @ w[N, K]^T, w dequantized inside the K loop.

Same contracts and layouts as kernels/quant_reference.py (the oracle). Each program computes one
[BLOCK_M, BLOCK_N] tile of y, walking K in BLOCK_K steps:

    integer weights   words [BLOCK_N, BLOCK_K / codes_per_word], each row's words side by side in memory
                      -> codes [BLOCK_N, BLOCK_K] as floats (offset + code, see below) -> tl.dot with the x
                      tile -> minus (offset + zero) * the x tile's row sums -> times the group's scale.
                      BLOCK_K divides group_size: one scale and zero point per step and output column.
    FP8 weights       x already quantized per token (and block); tl.dot of the FP8 tiles (upcast where the
                      GPU has no FP8 dot) times the step's activation scale [BLOCK_M] and weight scale
                      [BLOCK_N]. BLOCK_K divides the scale block: one scale per step.

Decode reads every weight byte once and does little arithmetic per byte, so the integer GEMM's cost is
turning codes into floats. It takes two integer operations per code: shift and mask, then OR the code into
the low mantissa bits of a constant whose last place is 1 (bfloat16 128.0 is 0x4300: 0x4300 | code is
128 + code, exactly). The constant is subtracted after the dot, once per output and step, through the
row sums of x: sum_k x[m, k] (offset + code[n, k] - offset - zero[n]) = dot - sum_k x[m, k] (offset + zero[n]).
The scale multiplies the [BLOCK_M, BLOCK_N] result, not every weight. float32 and codes too wide for the
mantissa convert instead, with offset 0.

The tile sizes depend only on the shapes, so a CUDA graph captures one launch per bucket: decode
(M <= DECODE_MAX_ROWS) has its own tiles, chosen on a GPU, and splits K when few output tiles would leave SMs idle.
"""

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from nanovllm.kernels.triton_dots import TL_DTYPES, dot_dtype, dot_options

DECODE_MAX_ROWS = 16  # at most this many rows (tokens): decode tiles; tl.dot needs tiles of at least 16


@dataclass(frozen=True)
class TileSizes:
    """One program's share of y, how far it steps along K, and how Triton runs it."""

    block_m: int  # rows of x and y per program
    block_n: int  # output columns per program
    block_k: int  # input columns per step
    num_warps: int = 4
    num_stages: int = 3  # steps whose loads are in flight at once (Triton's software pipelining)
    split_k: int = 1  # programs sharing one tile's K (integer GEMM): each sums every split_k-th step
    weights_left: bool = False  # integer GEMM: y^T = w x^T, the unpacked weight as the dot's left operand


# Decode tiles from benchmarks/quant_gemm.py --sweep on an H200 (Qwen3-8B's linears, 1 and 16 tokens). The integer
# GEMM: wide N tiles with K split among programs (pick_split_k) were fastest in every shape; its cost is the
# unpacking, not the bytes (9-12% of the copy rate at best). FP8: narrow N tiles, five steps in flight.
INT_DECODE_TILES = TileSizes(block_m=16, block_n=128, block_k=128, num_stages=4)
FP8_DECODE_TILES = TileSizes(block_m=16, block_n=32, block_k=128, num_stages=5)
PREFILL_TILES = TileSizes(block_m=64, block_n=64, block_k=64)  # many rows: reuse each weight tile
MIN_DECODE_PROGRAMS = 512  # split K until a decode GEMM has this many programs (about 4 per SM of an H100/H200)
MAX_SPLIT_K = 8


def pick_tiles(num_rows: int, k_step_limit: int, decode_tiles: TileSizes) -> TileSizes:
    """The tiles for M = num_rows, with BLOCK_K dividing k_step_limit (a group or scale block: a power of two)."""
    tiles = decode_tiles if num_rows <= DECODE_MAX_ROWS else PREFILL_TILES
    return replace(tiles, block_k=min(tiles.block_k, k_step_limit))


def pick_split_k(tiles: TileSizes, num_rows: int, num_out: int, num_cols: int) -> int:
    """Decode GEMMs with few output tiles (o and down projections) share each tile's K among programs, so that
    enough weight bytes are in flight to reach the copy rate; one program per tile otherwise."""
    num_programs = triton.cdiv(num_rows, tiles.block_m) * triton.cdiv(num_out, tiles.block_n)
    if num_rows > DECODE_MAX_ROWS or num_programs >= MIN_DECODE_PROGRAMS:
        return 1
    split_k = triton.next_power_of_2(triton.cdiv(MIN_DECODE_PROGRAMS, num_programs))
    return min(MAX_SPLIT_K, split_k, triton.cdiv(num_cols, tiles.block_k))


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
def _load_codes(qweight_ptr, offs_n, mask_n, k_start, K, stride_qn, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """The codes of w[offs_n, k_start : k_start + BLOCK_K] as int32 [BLOCK_N, BLOCK_K] (0 past K): each row's words
    loaded once, side by side, then each word's codes spread out by a reshape."""
    CODES_PER_WORD: tl.constexpr = 32 // BITS
    word_cols = k_start // CODES_PER_WORD + tl.arange(0, BLOCK_K // CODES_PER_WORD)  # [BLOCK_K / CPW]
    words = tl.load(
        qweight_ptr + offs_n[:, None] * stride_qn + word_cols[None, :],
        mask=mask_n[:, None] & (word_cols[None, :] < K // CODES_PER_WORD),
        other=0,
    )  # [BLOCK_N, BLOCK_K / CPW]
    shifts = tl.arange(0, CODES_PER_WORD) * BITS  # [CPW]
    codes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)  # [BLOCK_N, BLOCK_K / CPW, CPW]
    return tl.reshape(codes, (words.shape[0], BLOCK_K))  # k = word * CPW + j


@triton.jit
def _codes_as_floats(codes, CODE_DTYPE: tl.constexpr, CODE_BITS: tl.constexpr):
    """int32 codes -> offset + code in CODE_DTYPE (CODE_BITS: the offset's bit pattern), or float32 (CODE_BITS 0)."""
    if CODE_BITS == 0:  # noqa: SIM108 (a constexpr if: Triton compiles the taken branch only)
        floats = codes.to(tl.float32)
    else:
        floats = (codes | CODE_BITS).to(tl.int16).to(CODE_DTYPE, bitcast=True)  # the code in the mantissa's low bits
    return floats


@triton.jit
def _int_weight_gemm_kernel(
    x_ptr,  # [M, K]
    qweight_ptr,  # [N, K / CODES_PER_WORD] int32
    scales_ptr,  # [N, K / GROUP_SIZE]
    zeros_ptr,  # [N, K / GROUP_SIZE], unused without HAS_ZEROS
    y_ptr,  # [M, N] in x's dtype, or [SPLIT_K, M, N] float32 partial sums
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
    CODE_DTYPE: tl.constexpr,  # what a code becomes: x's dtype
    CODE_BITS: tl.constexpr,  # the offset's bit pattern in CODE_DTYPE (0: convert to float32, offset 0)
    CODE_OFFSET: tl.constexpr,  # the offset's value
    DOT_DTYPE: tl.constexpr,  # the dot's operands: x's dtype on a GPU, float32 under the CPU interpreter
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 operands (exact products), else "tf32" (unused by 16-bit)
    WEIGHTS_LEFT: tl.constexpr,  # see TileSizes.weights_left
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    offs_m, offs_n = _tile_rows_and_columns(BLOCK_M, BLOCK_N)  # [BLOCK_M], [BLOCK_N]
    mask_n = offs_n < N
    split = tl.program_id(2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(split * BLOCK_K, K, SPLIT_K * BLOCK_K):
        k = k_start + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        x = _load_x_tile(x_ptr, offs_m, k, M, K, stride_xm)  # [BLOCK_M, BLOCK_K]
        codes = _load_codes(qweight_ptr, offs_n, mask_n, k_start, K, stride_qn, BITS, BLOCK_K)
        codes = _codes_as_floats(codes, CODE_DTYPE, CODE_BITS)  # [BLOCK_N, BLOCK_K]: offset + code
        if WEIGHTS_LEFT:  # [BLOCK_N, BLOCK_K] @ [BLOCK_K, BLOCK_M]: the tokens are the dot's narrow side
            dot = tl.trans(tl.dot(codes.to(DOT_DTYPE), tl.trans(x).to(DOT_DTYPE), input_precision=DOT_PRECISION))
        else:
            dot = tl.dot(x.to(DOT_DTYPE), tl.trans(codes).to(DOT_DTYPE), input_precision=DOT_PRECISION)
        x_sums = tl.sum(x.to(tl.float32), axis=1)  # [BLOCK_M]
        group = k_start // GROUP_SIZE
        scale = tl.load(scales_ptr + offs_n * stride_sn + group, mask=mask_n, other=0.0).to(tl.float32)  # [BLOCK_N]
        if HAS_ZEROS:
            zero = tl.load(zeros_ptr + offs_n * stride_zn + group, mask=mask_n, other=0.0).to(tl.float32)
        else:
            zero = tl.full((BLOCK_N,), 1 << (BITS - 1), tl.float32)  # the midpoint
        acc += (dot - x_sums[:, None] * (CODE_OFFSET + zero)[None, :]) * scale[None, :]
    _store_y_tile(y_ptr + split * M * N, acc, offs_m, offs_n, M, N, stride_ym)


# Per 16-bit dtype: a constant whose last place is 1, and the widest code its mantissa holds after it.
CODE_CONSTANTS = {torch.bfloat16: (0x4300, 128.0, 7), torch.float16: (0x6400, 1024.0, 10)}


def _int_code_options(x: torch.Tensor, bits: int) -> dict[str, tl.dtype | str | int | float]:
    """How codes become floats for x (see the module docstring), and the dot's operands: x's dtype, or float32
    as kernels/triton_dots.py's dot_options decides (float32 x, and the CPU interpreter). Products of codes
    and x are exact either way; the reference rounds the dequantized weight to x's dtype."""
    code_bits, offset, max_bits = CODE_CONSTANTS.get(x.dtype, (0, 0.0, 0))
    if bits > max_bits:  # float32, or 8-bit codes in bfloat16: converted, still exact (8 significant bits)
        code_bits, offset = 0, 0.0
    return {
        "CODE_DTYPE": TL_DTYPES[x.dtype],
        "CODE_BITS": code_bits,
        "CODE_OFFSET": offset,
        "DOT_DTYPE": dot_dtype(x),
        "DOT_PRECISION": dot_options(x)["DOT_PRECISION"],
    }


def int_weight_gemm_triton(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # [N, K * bits / 32] int32
    scales: torch.Tensor,  # [N, K / group_size]
    zeros: torch.Tensor | None,  # [N, K / group_size]; None = the midpoint 2^(bits-1)
    bits: int,
    group_size: int,
    tiles: TileSizes | None = None,  # None: pick_tiles' and pick_split_k's (quant_gemm.py --sweep tries others)
) -> torch.Tensor:  # [M, N] in x's dtype
    """W4A16 / W8A16: see kernels/quant_reference.int_weight_gemm for the contract."""
    x = x.contiguous()
    num_rows, num_cols = x.shape
    num_out = qweight.shape[0]
    if tiles is None:
        tiles = pick_tiles(num_rows, group_size, INT_DECODE_TILES)
        tiles = replace(tiles, split_k=pick_split_k(tiles, num_rows, num_out, num_cols))
    # With K split, each split writes its float32 partial sums, and torch adds them (a fixed order: deterministic).
    y_shape = (num_rows, num_out) if tiles.split_k == 1 else (tiles.split_k, num_rows, num_out)
    y = torch.empty(y_shape, dtype=x.dtype if tiles.split_k == 1 else torch.float32, device=x.device)
    grid = (triton.cdiv(num_rows, tiles.block_m), triton.cdiv(num_out, tiles.block_n), tiles.split_k)
    _int_weight_gemm_kernel[grid](
        x, qweight, scales, scales if zeros is None else zeros, y,
        num_rows, num_out, num_cols,
        x.stride(0), qweight.stride(0), scales.stride(0), scales.stride(0) if zeros is None else zeros.stride(0),
        num_out,
        BITS=bits, GROUP_SIZE=group_size, HAS_ZEROS=zeros is not None, **_int_code_options(x, bits),
        WEIGHTS_LEFT=tiles.weights_left, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        SPLIT_K=tiles.split_k, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    return y if tiles.split_k == 1 else y.sum(0).to(x.dtype)


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
    tiles: TileSizes | None = None,  # None: pick_tiles' (benchmarks/quant_gemm.py --sweep tries others)
) -> torch.Tensor:  # [M, N]
    """W8A8 with per-row (or per-row-and-block) scales on both sides: see quant_reference.fp8_gemm."""
    num_rows, num_cols = x_fp8.shape
    num_out = weight.shape[0]
    y = torch.empty(num_rows, num_out, dtype=out_dtype, device=x_fp8.device)
    # One scale per row puts no limit on the step; blocks of scales need steps that stay inside one block.
    tiles = tiles or pick_tiles(num_rows, block_k or FP8_DECODE_TILES.block_k, FP8_DECODE_TILES)
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
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    return y
