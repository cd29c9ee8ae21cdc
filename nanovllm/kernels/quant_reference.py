"""Plain-PyTorch GEMMs over quantized weights: dequantize, then multiply.

What runs on CPU, and the oracle the Triton kernels (kernels/triton_quant_gemm.py) are tested against.
Two weight kinds, in the layouts the linear layers keep them in (layers/quantization/):

    integer (W4A16, W8A16)  qweight [N, K * bits / 32] int32: K codes packed along each row, code j of a word in
                            bits [j * bits, (j + 1) * bits); scales [N, K / group_size]; zeros [N, K / group_size]
                            (None: the code's midpoint 2^(bits-1)). w[n, k] = (code - zero) * scale of k's group.
    FP8 (W8A8)              weight [N, K] float8_e4m3fn; weight_scale [N, num_k_blocks] float32 (one column: a
                            scale per row). w[n, k] = weight[n, k] * weight_scale[n, k // block_k]. Activations are
                            quantized on the fly, one scale per token (and per block_k columns when blocked).
"""

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn  # OCP E4M3 (no infinities): what FP8 checkpoints store
FP8_MAX = 448.0  # largest finite E4M3 value, torch.finfo(torch.float8_e4m3fn).max
# A zero scale (an all-zero token or group) becomes this, as compressed-tensors does, so 0 / scale stays 0.
MIN_FP8_SCALE = torch.finfo(torch.float32).eps
BITS_PER_WORD = 32  # codes are packed into int32 words


def unpack_int32(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, words] int32 -> [rows, words * 32 / bits] int32 codes in 0..2^bits-1, code j of a word at bits j*bits."""
    codes_per_word = BITS_PER_WORD // bits
    shifts = torch.arange(0, BITS_PER_WORD, bits, dtype=torch.int32, device=packed.device)  # [codes_per_word]
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [rows, words, codes_per_word]
    return codes.flatten(-2)[..., : packed.shape[-1] * codes_per_word]


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of unpack_int32: [rows, cols] codes in 0..2^bits-1 (cols a multiple of 32 / bits) -> int32."""
    codes_per_word = BITS_PER_WORD // bits
    shifts = torch.arange(0, BITS_PER_WORD, bits, dtype=torch.int64, device=codes.device)
    words = (codes.to(torch.int64).unflatten(-1, (-1, codes_per_word)) << shifts).sum(-1)  # [rows, words] < 2^32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same bits as int32


def dequantize_int(
    qweight: torch.Tensor,  # [N, K * bits / 32] int32
    scales: torch.Tensor,  # [N, K / group_size]
    zeros: torch.Tensor | None,  # [N, K / group_size]; None = the midpoint 2^(bits-1)
    bits: int,
    group_size: int,
) -> torch.Tensor:  # [N, K] float32
    codes = unpack_int32(qweight, bits).float()  # [N, K]
    zero = zeros.float().repeat_interleave(group_size, dim=1) if zeros is not None else float(1 << (bits - 1))
    return (codes - zero) * scales.float().repeat_interleave(group_size, dim=1)


def int_weight_gemm(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:  # [M, N] in x's dtype
    return F.linear(x, dequantize_int(qweight, scales, zeros, bits, group_size).to(x.dtype))


def quantize_fp8_per_token(x: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic FP8 activations: one scale per token (group_size None) or per token and group_size columns.

    x [M, K] -> (x_fp8 [M, K] float8_e4m3fn, scales [M, ceil(K / group_size) or 1] float32), x ~ x_fp8 * scale.
    The scale maps each group's largest magnitude to FP8_MAX; the division, clamp and cast are compressed-tensors',
    each division rounded to nearest on every device (the Triton kernel, triton_fp8_activations.py, matches it).
    """
    num_rows, num_cols = x.shape
    group_size = group_size or num_cols
    padded = F.pad(x.float(), (0, -num_cols % group_size))  # a partial last group is padded with zeros
    groups = padded.unflatten(1, (-1, group_size))  # [M, num_groups, group_size]
    amax = groups.abs().amax(dim=-1, keepdim=True)  # [M, num_groups, 1]
    # Divided by a tensor on amax's device: by a Python number, CUDA torch multiplies by its reciprocal instead,
    # which rounds differently (1 ulp) and moves values that sit on an FP8 tie (common with bfloat16 inputs).
    scales = amax / amax.new_tensor(FP8_MAX)
    scales = torch.where(scales == 0, MIN_FP8_SCALE, scales)
    x_fp8 = (groups / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x_fp8.flatten(1)[:, :num_cols], scales.squeeze(-1)


def dequantize_fp8(values: torch.Tensor, scales: torch.Tensor, block_k: int | None) -> torch.Tensor:
    """[R, K] FP8 values and [R, ceil(K / block_k)] float32 scales (block_k None: one per row) -> float32."""
    block_k = block_k or values.shape[1]  # the last block may be partial
    return values.float() * scales.repeat_interleave(block_k, dim=1)[:, : values.shape[1]]


def fp8_gemm(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale: torch.Tensor,  # [N, num_k_blocks] float32
    block_k: int | None,  # columns per weight and activation scale; None = whole rows (per-channel weights)
) -> torch.Tensor:  # [M, N] in x's dtype
    """W8A8: quantize x per token (and block), dequantize both, multiply in float32."""
    x_fp8, x_scales = quantize_fp8_per_token(x, block_k)
    x_dequantized = dequantize_fp8(x_fp8, x_scales, block_k)  # [M, K]
    return F.linear(x_dequantized, dequantize_fp8(weight, weight_scale, block_k)).to(x.dtype)


def quantize_fp8_per_row(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight [N, K] -> (FP8 values [N, K], float32 scales [N]): online quantization per output channel."""
    values, scales = quantize_fp8_per_token(weight, None)
    return values, scales.squeeze(1)
