"""Quantized linear layers: the tensors each checkpoint format stores, read into one layout per weight kind.

    scheme                        formats it reads                               GEMM (kernels/quant_backends.py)
    int_weights.IntWeightScheme   compressed-tensors pack-quantized, AWQ, GPTQ   codes dequantized in the K loop
    fp8_weights.Fp8WeightScheme   compressed-tensors float-quantized, "fp8",     FP8 x FP8, activations quantized
                                  quantization="fp8" (online)                    per token on the fly

A linear layer (layers/linear.py) takes a scheme or None (its plain weight). Which layers get the scheme
is :class:`base.LinearQuantization`'s answer, built by models/quant_config.py from config.json.
"""
