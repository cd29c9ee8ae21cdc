# mypy: disable-error-code="no-untyped-def"
# (@triton.jit kernels take untyped pointers and scalars; the Python wrappers are typed.)
"""Triton kernel of a gated MLP's activation: act(gate) * up, the same function as layers/activation.py's
``gated(act)``, for SiLU (SwiGLU) and both GELUs (GeGLU).

Each row of the input holds the gate then the up projection, as the merged gate_up GEMM writes them:

    x    [N, 2 * d]:  | gate_0 .. gate_{d-1} | up_0 .. up_{d-1} |
    out  [N, d]:      act(gate_j) * up_j

A program takes BLOCK_ROWS rows and BLOCK_COLS columns of the output. The work is a copy (read 2 d values,
write d per row), so the kernel is measured against the copy rate; torch.compile's fused version of the same
function ran at about 40% of it in a prefill step of 16,384 tokens on an H200 (dynamic row count).
The activation is computed in float32 and rounded once, on the product.
"""

import torch
import triton
import triton.language as tl

# config.json's activation name -> the kernel's ACT code (one name per code; the spellings are
# layers/activation.py's ACTIVATIONS keys).
ACT_CODES = {"silu": 0, "swish": 0, "gelu_new": 1, "gelu_pytorch_tanh": 1, "gelu": 2}
BLOCK_COLS = 1024  # output columns per program: 16-byte loads for 16-bit values with 4 warps, d up to 1024 in one
BLOCK_ROWS = 4  # output rows per program: enough bytes in flight per program at decode's few rows, too
# Constants the kernel reads: tl.constexpr, since a Triton kernel cannot read other globals when compiled
# (the interpreter can, so CPU tests do not catch it).
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # GELU's tanh approximation: tanh(sqrt(2 / pi) (x + 0.044715 x^3))
INV_SQRT_2 = tl.constexpr(0.7071067811865476)  # exact GELU: 0.5 x (1 + erf(x / sqrt(2)))


@triton.jit
def _tanh(x):
    """tanh through exp: 1 - 2 / (exp(2x) + 1), with x clamped to +-15, where float32's tanh is +-1 already."""
    x = tl.minimum(tl.maximum(x, -15.0), 15.0)
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _gated_kernel(
    x_ptr,  # [N, 2 * d]: gate | up
    out_ptr,  # [N, d]
    num_rows,
    d,
    stride_x,  # elements between rows of x
    stride_out,
    ACT: tl.constexpr,  # 0 SiLU, 1 GELU (tanh), 2 GELU (erf)
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # [BLOCK_ROWS]
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)  # [BLOCK_COLS]
    mask = (rows[:, None] < num_rows) & (cols[None, :] < d)
    gate_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_x + cols[None, :]  # int64: N x 2d may pass 2^31
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + d, mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:
        act = gate * tl.sigmoid(gate)
    elif ACT == 1:
        act = 0.5 * gate * (1.0 + _tanh(SQRT_2_OVER_PI * (gate + 0.044715 * gate * gate * gate)))
    else:
        act = 0.5 * gate * (1.0 + tl.erf(gate * INV_SQRT_2))
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out_ptrs, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def gated_activation_triton(x: torch.Tensor, name: str) -> torch.Tensor:  # [N, 2 * d] -> [N, d]
    """act(gate) * up of x = [N, 2 * d] holding (gate | up), for the activation config.json calls ``name``."""
    if name not in ACT_CODES:
        raise ValueError(f"the Triton gated activation has no {name!r}; it has {', '.join(ACT_CODES)}")
    if x.dim() != 2 or x.shape[1] % 2 or x.stride(1) != 1:
        raise ValueError(f"expected [N, 2 * d] with contiguous rows, got shape {tuple(x.shape)}, strides {x.stride()}")
    num_rows, d = x.shape[0], x.shape[1] // 2
    out = torch.empty(num_rows, d, dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out
    grid = (triton.cdiv(num_rows, BLOCK_ROWS), triton.cdiv(d, BLOCK_COLS))
    _gated_kernel[grid](
        x, out, num_rows, d, x.stride(0), out.stride(0),
        ACT=ACT_CODES[name], BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLS=BLOCK_COLS, num_warps=4,
    )  # fmt: skip
    return out
