# mypy: disable-error-code="no-untyped-def"
# (@triton.jit kernels take untyped pointers and scalars; the Python wrappers are typed.)
"""Triton kernel of the decoders' RMSNorm, optionally fused with the residual add before it: the same
functions as layers/layernorm.py's ``rms_norm`` and ``add_rms_norm``, rounding where they round.

    residual' = x + residual                      (rounded to the input dtype, as torch adds)
    out       = residual' / sqrt(mean(residual'^2) + eps) * w         LLaMA: normed rounded, then times w
                                                  * (1 + w)           Gemma: in float32, rounded once

One program normalizes one row. On the GPU the work is a copy, which torch.compile fuses just as well;
the kernel is here for the host: a prefill step runs the model eagerly, and a compiled function's call
(guards, wrappers) took about 130 us of host time on an H200's host against about 35 us for a Triton
launch, twice per layer, with the whole prefill step bound by the host.
"""

import torch
import triton
import triton.language as tl

# Warps per row: one per VALUES_PER_WARP values (8 per thread), at most MAX_WARPS (hidden 4,096 and up).
VALUES_PER_WARP = 256
MAX_WARPS = 16


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [N, hidden]
    residual_ptr,  # [N, hidden], read when HAS_RESIDUAL
    weight_ptr,  # [hidden]
    out_ptr,  # [N, hidden]
    residual_out_ptr,  # [N, hidden], x + residual, written when HAS_RESIDUAL
    hidden,
    stride_x,  # elements between rows
    stride_residual,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    UNIT_OFFSET: tl.constexpr,  # Gemma's (1 + w) weights
    BLOCK: tl.constexpr,  # next power of two of hidden
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
        tl.store(residual_out_ptr + row * hidden + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    normed = x32 * tl.rsqrt(tl.sum(x32 * x32, axis=0) / hidden + eps)  # [BLOCK]
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if UNIT_OFFSET:  # noqa: SIM108 (Triton compiles a constexpr branch, not a conditional expression, alike)
        out = normed * (1.0 + weight)
    else:
        out = normed.to(x.dtype).to(tl.float32) * weight
    tl.store(out_ptr + row * hidden + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """layers/layernorm.py's rms_norm of x [N, hidden] over its last dimension."""
    return _launch(x, None, weight, eps, unit_offset)[0]


def add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """layers/layernorm.py's add_rms_norm: (rms_norm(x + residual), x + residual), out of place."""
    out, residual_out = _launch(x, residual, weight, eps, unit_offset)
    assert residual_out is not None
    return out, residual_out


def _launch(
    x: torch.Tensor,  # [N, hidden]
    residual: torch.Tensor | None,  # [N, hidden]: normalize x + residual, and return it too
    weight: torch.Tensor,  # [hidden]
    eps: float,
    unit_offset: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # (normalized [N, hidden], x + residual or None)
    if x.dim() != 2 or x.stride(1) != 1 or (residual is not None and residual.stride(-1) != 1):
        raise ValueError(f"expected [N, hidden] rows with contiguous values, got {tuple(x.shape)}, {x.stride()}")
    num_rows, hidden = x.shape
    out = torch.empty(num_rows, hidden, dtype=x.dtype, device=x.device)
    residual_out = None if residual is None else torch.empty_like(out)
    if num_rows == 0:
        return out, residual_out
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(num_rows,)](
        x, x if residual is None else residual, weight, out, out if residual_out is None else residual_out,
        hidden, x.stride(0), x.stride(0) if residual is None else residual.stride(0), eps,
        HAS_RESIDUAL=residual is not None, UNIT_OFFSET=unit_offset, BLOCK=block,
        num_warps=min(MAX_WARPS, max(1, block // VALUES_PER_WARP)),
    )  # fmt: skip
    return out, residual_out
