"""How our Triton kernels feed tl.dot: the operands' dtype and the products' precision, chosen from the inputs.

Every kernel with a tl.dot (attention, the quantized GEMM, LoRA, the fused experts) takes its DOT_* arguments
from here, so the CPU interpreter's float32 workaround and the float32 precision rule are written once.
"""

import torch
import triton.language as tl

# tl.dot needs every matrix dimension to be at least 16 on NVIDIA GPUs (mma instruction shape).
MIN_DOT_SIZE = 16
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def dot_options(x: torch.Tensor) -> dict[str, bool | str]:
    """How the kernels' tl.dot calls run on operands like x: operand dtype and precision.

    Float32 operands get exact products ("ieee"; the GPU default rounds them to tf32). On CPU
    the operands are upcast to float32 because Triton's interpreter multiplies the raw bits
    of bfloat16 operands (triton-lang/triton#11584); on GPU they stay 16-bit for tensor cores.
    """
    fp32_dot = x.dtype == torch.float32 or x.device.type == "cpu"
    return {"FP32_DOT": fp32_dot, "DOT_PRECISION": "ieee" if fp32_dot else "tf32"}


def dot_dtype(x: torch.Tensor) -> tl.dtype:
    """The dtype of tl.dot operands that dot_options gives x: float32 where it says FP32_DOT, else x's own."""
    return tl.float32 if dot_options(x)["FP32_DOT"] else TL_DTYPES[x.dtype]
