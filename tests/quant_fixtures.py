"""Tiny quantized checkpoints, written by the formats' own tools where they run on CPU, else by their documented layout.

- compressed-tensors: the `compressed-tensors` library quantizes a tiny float model (write_tiny_model) and
  saves it, exactly as llm-compressor does after calibration: scales and zero points from each group's
  (channel's, block's, tensor's) min and max through the library's calculate_qparams, then its
  ModelCompressor packs and saves. transformers loads these back (decompressed) as the reference.
- AWQ and GPTQ: their packers (AutoAWQ's WQLinear_GEMM.from_linear, AutoGPTQ's QuantLinear.pack) are GPU-bound
  packages, so the loops below re-state their documented layouts and repack a compressed-tensors checkpoint's
  codes, scales and zero points. The model they hold is the compressed-tensors one, which transformers runs.
- quant_method "fp8" (Qwen's FP8 releases): a compressed-tensors FP8 checkpoint with the tensors and config
  renamed as Qwen's (weight_scale_inv, weight_block_size); the numbers are the same.
- GPT-2: its Conv1D layers become the nn.Linear layers of the same product first (conv1d_as_linear); the
  compressed-tensors checkpoint saved then is only write_gptq's input, and the reference is transformers' own
  GPT-2 running the library's dequantized weights back in Conv1D's layout (dequantized_gpt2).

Widths are the smallest the group size allows: every linear layer's input is a multiple of 128 columns,
also per rank under TP=2 (o_proj's 4 heads x 64 = 256 columns). Every packer works per checkpoint module, so a
model that fuses layers in its checkpoint (Phi-3's qkv_proj, gate_up_proj) gets them fused in every format,
as its published quantized checkpoints have them.
"""

import json
import shutil
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    QuantizationStrategy,
    apply_quantization_config,
    fake_quantize,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.utils import calculate_qparams, compute_dynamic_scales_and_zp
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, CompressedTensorsConfig
from transformers.pytorch_utils import Conv1D

QUANT_SIZES = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 64}  # with 4 heads: o_proj reads 256
GROUP_SIZE = 128  # the presets' group size, and the fp8 blocks' columns
FP8_PER_TENSOR = QuantizationScheme(  # FP8 weights with one scale per tensor, dynamic per-token activations
    targets=["Linear"],
    weights=QuantizationArgs(num_bits=8, type="float", strategy="tensor", symmetric=True, dynamic=False),
    input_activations=QuantizationArgs(num_bits=8, type="float", strategy="token", symmetric=True, dynamic=True),
)
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
# The compressed-tensors schemes written (presets by name, and FP8 per tensor with per-token activations).
CT_PRESETS = ("W4A16", "W4A16_ASYM", "W8A16", "FP8_DYNAMIC", "FP8_PER_TENSOR", "FP8_BLOCK")
# Each repacked checkpoint -> the compressed-tensors one holding the same model (transformers' reference).
REPACKED_FROM = {"awq": "W4A16_ASYM", "gptq4": "W4A16", "gptq8": "W8A16", "fp8_block": "FP8_BLOCK"}
REPACKED_FROM["fp8_tensor"] = "FP8_PER_TENSOR"  # AutoAWQ GEMM: nibble i of a word holds column AWQ_ORDER[i] of its 8


def _scheme(preset: str) -> QuantizationScheme:
    return FP8_PER_TENSOR if preset == "FP8_PER_TENSOR" else preset_name_to_scheme(preset, ["Linear"])


def _min_max(weight: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """The minimum and maximum over what one scale covers (llm-compressor's min-max observer)."""
    if args.strategy == QuantizationStrategy.GROUP:
        groups = weight.unflatten(-1, (-1, args.group_size))  # [out, in / group, group]
        return groups.amin(-1), groups.amax(-1)
    if args.strategy == QuantizationStrategy.CHANNEL:
        return weight.amin(-1, keepdim=True), weight.amax(-1, keepdim=True)
    if args.strategy == QuantizationStrategy.BLOCK:
        block_rows, block_cols = args.block_structure
        # A partial last block is padded with zeros, which change nothing: the range always includes 0.
        padded = torch.nn.functional.pad(weight, (0, -weight.shape[1] % block_cols, 0, -weight.shape[0] % block_rows))
        blocks = padded.unflatten(0, (-1, block_rows)).unflatten(-1, (-1, block_cols))  # [R, rows, C, cols]
        return blocks.amin((1, 3)), blocks.amax((1, 3))
    return weight.amin(), weight.amax()


def calibrated_model(float_dir: Path, preset: str, ignore: tuple[str, ...] = ("lm_head",)) -> torch.nn.Module:
    """The float model in float_dir (GPT-2's Conv1D layers as nn.Linear ones) with compressed-tensors' preset
    scheme applied and its scales (and zero points) set from each group's min and max, as llm-compressor leaves
    it before saving."""
    model = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32)
    conv1d_as_linear(model)
    config = QuantizationConfig(
        config_groups={"group_0": _scheme(preset)},
        ignore=list(ignore),
        quantization_status=QuantizationStatus.INITIALIZED,
    )
    apply_quantization_config(model, config, show_progress=False)
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None:
            continue
        scale, zero_point = calculate_qparams(*_min_max(module.weight.data, scheme.weights), scheme.weights)
        module.weight_scale.data = scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype)
        if hasattr(module, "weight_zero_point"):
            zero_point = zero_point.reshape(module.weight_zero_point.shape)
            module.weight_zero_point.data = zero_point.to(module.weight_zero_point.dtype)
    return model


def write_compressed_tensors(
    float_dir: Path, out_dir: Path, preset: str, ignore: tuple[str, ...] = ("lm_head",)
) -> Path:
    """Quantize the float model in float_dir with compressed-tensors' preset scheme and save it to out_dir."""
    model = calibrated_model(float_dir, preset, ignore)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out_dir)
    compressor.update_config(str(out_dir))
    _copy_tokenizer(float_dir, out_dir)
    return out_dir


def conv1d_as_linear(model: torch.nn.Module) -> None:
    """GPT-2's Conv1D layers (x @ W + b, W [in, out]) as the nn.Linear layers of the same product (W^T [out, in]):
    compressed-tensors quantizes nn.Linear modules only, and AutoGPTQ too packs a Conv1D's weight transposed.
    The checkpoint saved then names GPT-2's modules but holds [out, in] tensors: write_gptq's input, not a
    checkpoint of its own."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape
            linear = torch.nn.Linear(in_features, out_features, dtype=module.weight.dtype)
            linear.weight.data, linear.bias.data = module.weight.data.t().contiguous(), module.bias.data
            model.set_submodule(name, linear)


def dequantized_gpt2(float_dir: Path, preset: str) -> torch.nn.Module:
    """transformers' GPT-2 of float_dir, each Conv1D weight replaced by compressed-tensors' quantize-dequantize
    under ``preset`` (the numbers write_compressed_tensors saves), back in Conv1D's [in, out]; under an FP8
    preset each Conv1D's input is also quantized per token by the library, as its quantized forward does."""
    reference = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32).eval()
    for name, module in calibrated_model(float_dir, preset).named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None:
            continue
        conv = reference.get_submodule(name)
        zero_point = getattr(module, "weight_zero_point", None)
        conv.weight.data = fake_quantize(module.weight, module.weight_scale, zero_point, scheme.weights).t()
        if scheme.input_activations is not None:
            conv.register_forward_pre_hook(partial(_quantize_input, scheme.input_activations))
    return reference


def _quantize_input(
    args: QuantizationArgs, module: torch.nn.Module, inputs: tuple[torch.Tensor]
) -> tuple[torch.Tensor]:
    """A forward pre-hook: the layer's input [batch, tokens, in] quantized as ``args`` says (dynamic scales)."""
    scale, zero_point = compute_dynamic_scales_and_zp(inputs[0], args, module)
    return (fake_quantize(inputs[0], scale, zero_point, args),)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for path in src.iterdir():
        if path.name != "config.json" and path.suffix != ".safetensors":
            shutil.copy(path, dst / path.name)


def load_reference(ct_dir: Path, asymmetric: bool = False) -> torch.nn.Module:
    """transformers' model of a compressed-tensors checkpoint, float32. Symmetric and FP8 checkpoints load as
    saved (the library decompresses them at the first forward and keeps quantizing activations on the fly);
    asymmetric ones fail that way in transformers 5 (zero points mis-shaped), so they are decompressed at load."""
    kwargs: dict[str, Any] = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if asymmetric else {}
    with warnings.catch_warnings():  # that the checkpoint's own quantization_config is used: it is, as wanted
        warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
        return AutoModelForCausalLM.from_pretrained(ct_dir, dtype=torch.float32, **kwargs).eval()


def _copy_with(src: Path, dst: Path, tensors: dict[str, torch.Tensor], quantization_config: dict[str, Any]) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    _copy_tokenizer(src, dst)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(dst / "model.safetensors"))
    return dst


def ct_codes(tensors: dict[str, torch.Tensor], module: str, bits: int) -> torch.Tensor:
    """A compressed-tensors layer's codes, unpacked by the library: [out, in], unsigned (0..2^bits-1)."""
    shape = tuple(tensors[f"{module}.weight_shape"].tolist())
    return unpack_from_int32(tensors[f"{module}.weight_packed"], bits, torch.Size(shape)).to(torch.int32) + (
        1 << (bits - 1)
    )


def ct_zeros(tensors: dict[str, torch.Tensor], module: str, bits: int) -> torch.Tensor:
    """A compressed-tensors layer's zero points, unpacked by the library: [out, in / group], unsigned."""
    out_features = int(tensors[f"{module}.weight_shape"][0])
    scale = tensors[f"{module}.weight_scale"]
    packed = tensors[f"{module}.weight_zero_point"]
    shape = torch.Size((out_features, scale.shape[1]))
    return unpack_from_int32(packed, bits, shape, packed_dim=0).to(torch.int32) + (1 << (bits - 1))


def pack_along_rows(codes: torch.Tensor, bits: int, order: list[int]) -> torch.Tensor:
    """[rows, cols] codes -> [rows / per_word, cols] int32: word w's field i holds row w * per_word + order[i]."""
    per_word = 32 // bits
    words = torch.zeros(codes.shape[0] // per_word, codes.shape[1], dtype=torch.int64)
    for i in range(per_word):
        words |= codes[order[i] :: per_word].to(torch.int64) << (bits * i)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def quantized_modules(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(name.removesuffix(".weight_shape") for name in tensors if name.endswith(".weight_shape"))


def write_awq(ct_dir: Path, out_dir: Path) -> Path:
    """AutoAWQ's GEMM layout of a 4-bit asymmetric compressed-tensors checkpoint (from_linear's packing loop:
    qweight [in, out/8] and qzeros [in/group, out/8] with AWQ_ORDER, scales [in/group, out])."""
    tensors = load_file(str(ct_dir / "model.safetensors"))
    for module in quantized_modules(tensors):
        codes, zeros = ct_codes(tensors, module, 4), ct_zeros(tensors, module, 4)
        tensors[f"{module}.qweight"] = pack_along_rows(codes, 4, AWQ_ORDER).t()  # packs along out: [in, out / 8]
        tensors[f"{module}.qzeros"] = pack_along_rows(zeros, 4, AWQ_ORDER).t()
        tensors[f"{module}.scales"] = tensors.pop(f"{module}.weight_scale").t()
        for suffix in ("weight_packed", "weight_zero_point", "weight_shape"):
            del tensors[f"{module}.{suffix}"]
    config = {"quant_method": "awq", "bits": 4, "group_size": GROUP_SIZE, "zero_point": True, "version": "gemm"}
    return _copy_with(ct_dir, out_dir, tensors, config)


def write_gptq(ct_dir: Path, out_dir: Path, bits: int) -> Path:
    """GPTQ's v1 layout of a symmetric compressed-tensors checkpoint (AutoGPTQ's pack loop: qweight [in/P, out]
    sequential along in, qzeros [in/group, out/P] holding zero - 1, scales [in/group, out], g_idx in order)."""
    tensors = load_file(str(ct_dir / "model.safetensors"))
    sequential = list(range(32 // bits))
    for module in quantized_modules(tensors):
        codes = ct_codes(tensors, module, bits)  # [out, in]
        scales = tensors.pop(f"{module}.weight_scale").t()  # [in / group, out]
        zeros_minus_one = torch.full(scales.shape, (1 << (bits - 1)) - 1, dtype=torch.int32)
        tensors[f"{module}.qweight"] = pack_along_rows(codes.t(), bits, sequential)
        tensors[f"{module}.qzeros"] = pack_along_rows(zeros_minus_one.t(), bits, sequential).t()
        tensors[f"{module}.scales"] = scales
        tensors[f"{module}.g_idx"] = torch.arange(codes.shape[1], dtype=torch.int32) // GROUP_SIZE
        del tensors[f"{module}.weight_packed"], tensors[f"{module}.weight_shape"]
    config = {"quant_method": "gptq", "bits": bits, "group_size": GROUP_SIZE, "desc_act": False, "sym": True}
    return _copy_with(ct_dir, out_dir, tensors, config)


def write_fp8_method(ct_dir: Path, out_dir: Path) -> Path:
    """Qwen's quant_method "fp8" spelling of a compressed-tensors FP8 checkpoint: block scales renamed to
    weight_scale_inv (with weight_block_size in the config), a per-tensor scale stored as a scalar."""
    tensors = load_file(str(ct_dir / "model.safetensors"))
    ct_config = json.loads((ct_dir / "config.json").read_text())["quantization_config"]
    block = ct_config["config_groups"]["group_0"]["weights"].get("block_structure")
    config: dict[str, Any] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3"}
    for name in [n for n in tensors if n.endswith(".weight_scale")]:
        scale = tensors.pop(name)
        tensors[name + "_inv" if block else name] = scale if block else scale.reshape(())
    if block:
        config["weight_block_size"] = block
    return _copy_with(ct_dir, out_dir, tensors, config)


# Each repacked format -> its writer, from the REPACKED_FROM checkpoint's directory to its own.
REPACKERS: dict[str, Callable[[Path, Path], Path]] = {
    "awq": write_awq,
    "gptq4": partial(write_gptq, bits=4),
    "gptq8": partial(write_gptq, bits=8),
    "fp8_block": write_fp8_method,
    "fp8_tensor": write_fp8_method,
}


def write_quant_checkpoints(float_dir: Path, root: Path, presets: tuple[str, ...] = CT_PRESETS) -> dict[str, Path]:
    """The float model in float_dir quantized with each compressed-tensors preset, and repacked into every format
    whose source preset is among them, under root: name ("float", a preset, a key of REPACKERS) -> directory."""
    dirs = {"float": float_dir}
    for preset in presets:
        dirs[preset] = write_compressed_tensors(float_dir, root / preset, preset)
    for name, source in REPACKED_FROM.items():
        if source in presets:
            dirs[name] = REPACKERS[name](dirs[source], root / name)
    return dirs
