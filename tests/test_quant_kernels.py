"""The quantized GEMMs (kernels/triton_quant_gemm.py, kernels/quant_backends.py) against their torch reference.

On CPU the Triton kernels run in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1), so the shapes are
small; on a GPU the same tests run compiled kernels, and torch._scaled_mm where the GPU has it. Each shape
covers a decode tile (M <= 16) and a prefill tile (M > 16), and an N that is not a multiple of the tile.
"""

import pytest
import torch

from nanovllm.kernels import quant_reference as ref
from nanovllm.kernels.quant_backends import TritonQuantizedGemm, select_quantized_gemm
from nanovllm.kernels.triton_fp8_activations import quantize_fp8_per_token_triton
from nanovllm.kernels.triton_quant_gemm import TileSizes, fp8_gemm_triton, int_weight_gemm_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CAPABILITY = torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)
NUM_ROWS = (3, 40)  # a decode batch and a prefill chunk
NUM_OUT = 48  # not a multiple of the N tiles (32, 64)
# Against a float32 reference of the same dequantized weights: float32 differs by summation order only;
# bfloat16 carries its 8-bit mantissa through the weight tile and the output.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def random_int_weights(num_out: int, num_cols: int, bits: int, group_size: int, asymmetric: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (num_out, num_cols), generator=gen)
    scales = torch.rand(num_out, num_cols // group_size, generator=gen) * 0.02 + 0.001
    zeros = torch.randint(0, 1 << bits, scales.shape, generator=gen).float() if asymmetric else None
    return ref.pack_int32(codes, bits), scales, zeros


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    scale = float(want.abs().max())
    err = float((got.float() - want.float()).abs().max())
    assert err <= TOLERANCE[dtype] * max(1.0, scale), f"max error {err} (output scale {scale}, {dtype})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("bits", "group_size", "asymmetric"), [(4, 128, False), (4, 64, True), (8, 128, False)])
def test_int_weight_gemm(bits: int, group_size: int, asymmetric: bool, dtype: torch.dtype) -> None:
    """Guards against the integer GEMM's K loop reading the wrong code of a word (shift and mask), the wrong
    group's scale or zero point, the symmetric midpoint, or tiles that spill past M, N or K."""
    num_cols = 256
    qweight, scales, zeros = random_int_weights(NUM_OUT, num_cols, bits, group_size, asymmetric, seed=bits)
    scales, zeros = scales.to(dtype), None if zeros is None else zeros.to(dtype)
    for num_rows in NUM_ROWS:
        x = torch.randn(num_rows, num_cols, generator=torch.Generator().manual_seed(num_rows)).to(dtype)
        want = ref.int_weight_gemm(x.float(), qweight, scales.float(), zeros, bits, group_size)
        args = [t.to(DEVICE) if t is not None else None for t in (x, qweight, scales, zeros)]
        got = int_weight_gemm_triton(*args, bits, group_size)  # type: ignore[arg-type]
        assert got.shape == (num_rows, NUM_OUT) and got.dtype == dtype, (got.shape, got.dtype)
        close(got.cpu(), want, dtype)


@pytest.mark.parametrize(("num_cols", "block_k"), [(256, None), (192, 128)])  # per row; blocks, the last partial
def test_fp8_gemm(num_cols: int, block_k: int | None) -> None:
    """Guards against the FP8 GEMM applying a token's or a row's scale to the wrong K block (a partial last
    block included), and against activations quantized on the fly differently from the reference."""
    gen = torch.Generator().manual_seed(num_cols)
    weight = torch.randn(NUM_OUT, num_cols, generator=gen).to(ref.FP8_DTYPE)
    num_blocks = 1 if block_k is None else -(-num_cols // block_k)
    weight_scale = torch.rand(NUM_OUT, num_blocks, generator=gen) * 0.01 + 0.001
    for num_rows in NUM_ROWS:
        x = torch.randn(num_rows, num_cols, generator=gen)
        want = ref.fp8_gemm(x, weight, weight_scale, block_k)
        x_fp8, x_scales = ref.quantize_fp8_per_token(x.to(DEVICE), block_k)
        got = fp8_gemm_triton(
            x_fp8, x_scales, weight.to(DEVICE), weight_scale.to(DEVICE), block_k, torch.float32, False
        )
        close(got.cpu(), want, torch.float32)
        if DEVICE == "cuda":  # the backend the engine would pick on this GPU: _scaled_mm or the native FP8 dot
            gemm = TritonQuantizedGemm(CAPABILITY, torch.bfloat16)
            got = gemm.fp8_weights(x.to(DEVICE, torch.bfloat16), weight.to(DEVICE), weight_scale.to(DEVICE), block_k)
            close(got.cpu(), ref.fp8_gemm(x.bfloat16(), weight, weight_scale, block_k), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int_weight_gemm_other_tiles(dtype: torch.dtype) -> None:
    """Guards against the K loop assuming its default step or split: a step of a quarter group (four steps share
    one scale) with K split three ways (8 steps: uneven shares), wide N tiles with one warp, and the weight as the
    dot's left operand, as benchmarks/quant_gemm.py --sweep tries them."""
    qweight, scales, zeros = random_int_weights(NUM_OUT, 256, 4, 128, asymmetric=True, seed=7)
    scales, zeros = scales.to(dtype), zeros.to(dtype)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(5)).to(dtype)
    want = ref.int_weight_gemm(x.float(), qweight, scales.float(), zeros, 4, 128)
    args = [t.to(DEVICE) for t in (x, qweight, scales, zeros)]
    for tiles in (
        TileSizes(16, 16, 32, num_warps=2, num_stages=2, split_k=3),
        TileSizes(16, 64, 128, num_warps=1, weights_left=True),
        TileSizes(16, 32, 64, split_k=2, weights_left=True),
    ):
        close(int_weight_gemm_triton(*args, 4, 128, tiles=tiles).cpu(), want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("num_cols", "group_size"), [(300, None), (2500, None), (320, 128)])
def test_fp8_activation_kernel_matches_reference(num_cols: int, group_size: int | None, dtype: torch.dtype) -> None:
    """Guards against the one-launch activation quantization rounding, saturating or scaling differently from
    the reference (the bytes must be equal): rows longer than one load, a partial last group, an all-zero row,
    values far below a row's largest (FP8 subnormals) and ties."""
    gen = torch.Generator().manual_seed(num_cols)
    x = torch.randn(4, num_cols, generator=gen) * torch.logspace(-4, 2, num_cols)
    x[1] = 0.0
    x[2, :3] = torch.tensor([448.0, -448.0, 0.5 * (1.0 + 1.125)])  # the largest value, its negative, a tie
    x = x.to(dtype)
    want_fp8, want_scales = ref.quantize_fp8_per_token(x, group_size)
    got_fp8, got_scales = quantize_fp8_per_token_triton(x.to(DEVICE), group_size)
    assert torch.equal(got_scales.cpu(), want_scales), (got_scales, want_scales)
    assert torch.equal(got_fp8.cpu().view(torch.uint8), want_fp8.view(torch.uint8))


def test_per_token_quantization_and_backend_choice() -> None:
    """Guards against per-token FP8 scales that are not amax / 448 (compressed-tensors' definition), an
    all-zero token dividing by zero, and the Triton backend being chosen on CPU, where the reference runs."""
    x = torch.tensor([[1.0, -4.0, 2.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    x_fp8, scales = ref.quantize_fp8_per_token(x, None)
    assert torch.equal(scales, torch.tensor([[4.0 / ref.FP8_MAX], [ref.MIN_FP8_SCALE]])), scales
    assert torch.equal(x_fp8.float()[1], torch.zeros(4)) and float(x_fp8.float()[0, 1]) == -ref.FP8_MAX, x_fp8
    assert select_quantized_gemm(torch.device("cpu"), torch.float32).name == "torch"
