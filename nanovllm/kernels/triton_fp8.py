# mypy: disable-error-code="no-untyped-def"
# (@triton.jit functions take untyped tensors and constexprs; the Python helper is typed.)
"""FP8 encoding for the Triton KV store: float32 -> the byte of an FP8 format, rounded to nearest even,
saturated at the format's largest finite value.

The kernel encodes the byte with integer arithmetic instead of casting with ``.to(float8)``, for two
reasons: Triton's CPU interpreter rounds that cast wrongly when rounding carries into the exponent
(float32 500.0 -> e5m2 256.0), and the cast does not saturate, while a cache must never hold inf or
NaN. The decoding side needs nothing of the kind: the attention kernels load the FP8 tensor and convert
it exactly (every FP8 value is a bfloat16, float16 and float32 value).

An FP8 byte is sign | exponent | mantissa with EXPONENT_BIAS and MANTISSA_BITS:

    e4m3fn: s eeee mmm,  bias 7,  largest 448 (0x7E; 0x7F is NaN),   subnormal step 2^-9
    e5m2:   s eeeee mm,  bias 15, largest 57344 (0x7B; 0x7C is inf), subnormal step 2^-16
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# float32's layout (IEEE 754), as constexprs so the jit function can read them.
FLOAT32_MANTISSA_BITS = tl.constexpr(23)
FLOAT32_EXPONENT_BIAS = tl.constexpr(127)


@dataclass(frozen=True)
class Fp8Format:
    """What encode_fp8 needs to know about a cache dtype; mantissa_bits 0 means "not FP8"."""

    mantissa_bits: int  # 3 for e4m3fn, 2 for e5m2
    exponent_bias: int  # 7 for e4m3fn, 15 for e5m2
    max_value: float  # largest finite value: saturation bound


NOT_FP8 = Fp8Format(0, 0, 0.0)
FP8_FORMATS = {
    torch.float8_e4m3fn: Fp8Format(3, 7, 448.0),
    torch.float8_e5m2: Fp8Format(2, 15, 57344.0),
}


def fp8_format(dtype: torch.dtype) -> Fp8Format:
    """The FP8 format of a cache dtype, or NOT_FP8 for any other dtype."""
    return FP8_FORMATS.get(dtype, NOT_FP8)


@triton.jit
def encode_fp8(x, MANTISSA_BITS: tl.constexpr, EXPONENT_BIAS: tl.constexpr, MAX_VALUE: tl.constexpr):
    """float32 x -> FP8 bytes (uint8, same shape): round to nearest even, saturate at +-MAX_VALUE.

    Normal range: in float32's bits, exponent and mantissa sit side by side, so adding half a unit of the
    FP8 mantissa's last place (less one, plus the last kept bit: ties go to even) and shifting the extra
    mantissa bits away rounds, and a carry out of the mantissa bumps the exponent as it should. The
    exponent is then re-biased. Subnormal range (below 2^(1 - EXPONENT_BIAS)): the values are multiples
    of one step, so adding a float32 whose last place is that step rounds |x| to a multiple of it (the
    float add rounds to nearest even), and the bits above that float count the steps.
    """
    DROPPED_BITS: tl.constexpr = FLOAT32_MANTISSA_BITS - MANTISSA_BITS
    HALF_UNIT_LESS_ONE: tl.constexpr = 2 ** (DROPPED_BITS - 1) - 1  # in float32 bits
    REBIAS: tl.constexpr = (FLOAT32_EXPONENT_BIAS - EXPONENT_BIAS) << MANTISSA_BITS
    MIN_NORMAL: tl.constexpr = 2.0 ** (1 - EXPONENT_BIAS)
    # 2^ANCHOR_EXPONENT has a float32 last place of 2^(1 - EXPONENT_BIAS - MANTISSA_BITS), the subnormal step.
    ANCHOR_EXPONENT: tl.constexpr = FLOAT32_MANTISSA_BITS + 1 - EXPONENT_BIAS - MANTISSA_BITS
    ANCHOR: tl.constexpr = 2.0**ANCHOR_EXPONENT
    ANCHOR_BITS: tl.constexpr = (FLOAT32_EXPONENT_BIAS + ANCHOR_EXPONENT) << FLOAT32_MANTISSA_BITS
    magnitude = tl.minimum(tl.abs(x), MAX_VALUE)  # saturate
    bits = magnitude.to(tl.int32, bitcast=True)
    last_kept_bit = (bits >> DROPPED_BITS) & 1
    normal_code = ((bits + HALF_UNIT_LESS_ONE + last_kept_bit) >> DROPPED_BITS) - REBIAS
    subnormal_code = (magnitude + ANCHOR).to(tl.int32, bitcast=True) - ANCHOR_BITS
    code = tl.where(magnitude < MIN_NORMAL, subnormal_code, normal_code)  # 0..0x7E (e4m3), 0..0x7B (e5m2)
    is_negative = x.to(tl.int32, bitcast=True) < 0  # the sign bit, so -0.0 stays -0.0 as in torch's cast
    code = tl.where(is_negative, code | 0x80, code)
    return code.to(tl.uint8)
