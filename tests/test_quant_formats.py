"""Quantized formats' layouts bit for bit, and the errors for what nanovllm does not read.

The packed-word tests state each format's documented bit layout as literal numbers; the AWQ repack of the
test fixtures goes back through compressed-tensors' own AutoAWQ converter (written by the vLLM project from
AutoAWQ's code), which must give back the compressed-tensors tensors it came from.
"""

import copy
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter
from model_fixtures import write_tiny_model
from quant_fixtures import quantized_modules, write_compressed_tensors, write_fp8_method
from safetensors.torch import load_file, save_file

from nanovllm import LLM
from nanovllm.kernels.quant_reference import pack_int32, unpack_int32
from nanovllm.layers.quantization.int_layouts import IntWeights, fused_splits, pack_awq, unpack_awq
from nanovllm.models.arch import check_tensor_parallel_split, parse_model_arch
from nanovllm.models.fused_tensors import split_fused
from nanovllm.models.quant_config import parse_quant_config

ENGINE_ARGS = dict(device="cpu", dtype="float32", kvcache_block_size=16, num_kvcache_blocks=32, max_model_len=128)


def test_packed_word_layouts() -> None:
    """Guards against a packing order that round-trips through itself but is not the format's: codes 0..7 in
    column order are 0x76543210 packed sequentially (compressed-tensors, GPTQ) and 0x75316420 in AWQ's order
    (nibble i holds column [0, 2, 4, 6, 1, 3, 5, 7][i]); 8-bit codes 1..4 are 0x04030201."""
    columns = torch.arange(8).unsqueeze(0)  # [1, 8]
    assert pack_int32(columns, 4).tolist() == [[0x76543210]]
    assert pack_awq(columns).tolist() == [[0x75316420]]
    assert pack_int32(torch.tensor([[1, 2, 3, 4]]), 8).tolist() == [[0x04030201]]
    codes = torch.randint(0, 16, (5, 64), generator=torch.Generator().manual_seed(0))
    high = torch.full((1, 8), 15)  # every bit set: the int32 word is negative, its shifts must still mask
    assert torch.equal(unpack_int32(pack_int32(codes, 4), 4), codes)
    assert torch.equal(unpack_awq(pack_awq(codes)), codes)
    assert torch.equal(unpack_int32(pack_int32(high, 4), 4), high) and pack_int32(high, 4).item() == -1


def test_awq_repack_goes_back_through_compressed_tensors(quant_checkpoints: dict[str, Path]) -> None:
    """Guards the AWQ test checkpoints themselves: compressed-tensors' AutoAWQ converter must turn them back
    into the compressed-tensors tensors they were packed from, bit for bit (codes, scales, zero points)."""
    original = load_file(str(quant_checkpoints["W4A16_ASYM"] / "model.safetensors"))
    converted = AutoAWQConverter(bits=4, group_size=128, zero_point=True).process(
        load_file(str(quant_checkpoints["awq"] / "model.safetensors"))
    )
    for module in quantized_modules(original):
        for suffix in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape"):
            name = f"{module}.{suffix}"
            assert torch.equal(converted[name], original[name]), f"{name} differs after the round trip"


# (quant_method's config) -> a bad field, and what the error must say.
BAD_CONFIGS: list[tuple[str, dict[str, Any], str]] = [
    ("awq", {"quant_method": "bitsandbytes"}, r"quant_method='bitsandbytes'.*supported: \['awq', 'compressed"),
    ("awq", {"bits": 3}, r"\(awq\): bits=3 .*supported: 4"),
    ("awq", {"version": "gemv"}, r"version='gemv'.*'gemm'"),
    ("gptq4", {"desc_act": True}, r"\(gptq\): desc_act=True .*supported: false"),
    ("gptq4", {"group_size": -1}, r"group_size=-1 .*\(32, 64, 128\)"),
    ("gptq4", {"sym": False}, r"sym=False"),
    ("gptq4", {"checkpoint_format": "gptq_v2"}, r"checkpoint_format='gptq_v2'"),
    ("fp8_block", {"activation_scheme": "static"}, r"activation_scheme='static'.*'dynamic'"),
    ("fp8_block", {"weight_block_size": [128, 100]}, r"weight_block_size=\[128, 100\]"),
    ("W4A16", {"format": "marlin-24"}, r"format='marlin-24'.*'pack-quantized'"),
    ("W4A16", {"weights.num_bits": 2}, r"weights.num_bits=2 .*4 or 8"),
    ("W4A16", {"weights.actorder": "group"}, r"weights.actorder='group'"),
    ("W4A16", {"ignore": []}, r"ignore=\[\].*'lm_head'"),
    ("W4A16", {"config_groups.group_1": {}}, r"config_groups=\['group_0', 'group_1'\].*exactly one"),
    ("FP8_DYNAMIC", {"input_activations": None}, r"input_activations.type=None"),
    ("FP8_DYNAMIC", {"input_activations.dynamic": False}, r"input_activations.dynamic=False"),
    ("FP8_DYNAMIC", {"sparsity_config": {"format": "sparse-24"}}, r"sparsity_config="),
]


def edited(config: dict[str, Any], edit: dict[str, Any]) -> dict[str, Any]:
    """A copy of config with each "a.b" key set (inside config_groups' one group for weights/activations)."""
    config = copy.deepcopy(config)
    for key, value in edit.items():
        *path, last = key.split(".")
        is_group_field = path[:1] in (["weights"], ["input_activations"]) or last in ("format", "input_activations")
        target = config["config_groups"]["group_0"] if is_group_field and "config_groups" in config else config
        for part in path:
            target = target[part]
        target[last] = value
    return config


@pytest.mark.parametrize(("source", "edit", "message"), BAD_CONFIGS)
def test_unsupported_configs_are_refused(
    quant_checkpoints: dict[str, Path], source: str, edit: dict[str, Any], message: str
) -> None:
    """Guards against a checkpoint nanovllm cannot run loading anyway (or failing later, obscurely): each
    unsupported field is an error naming the field, its value and what is supported."""
    config = json.loads((quant_checkpoints[source] / "config.json").read_text())["quantization_config"]
    with pytest.raises(ValueError, match=message):
        parse_quant_config(edited(config, edit))


def test_tensor_parallel_split_must_keep_groups_whole(quant_checkpoints: dict[str, Path]) -> None:
    """Guards against ranks cutting a 128-column group in two: o_proj's 256 input columns over 4 ranks."""
    arch = parse_model_arch(json.loads((quant_checkpoints["W4A16"] / "config.json").read_text()))
    check_tensor_parallel_split(2, arch)
    with pytest.raises(ValueError, match=r"o_proj get .* = 64 .*tensor_parallel_size=4.*group_size \(128\)"):
        check_tensor_parallel_split(4, arch)


def rewrite(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(dst / "model.safetensors"))
    return dst


LAYER = "model.layers.1.self_attn.k_proj"
WIDE_LAYER = "model.layers.1.self_attn.o_proj"  # two groups of input columns
BAD_TENSORS: dict[str, tuple[str, Callable[[dict[str, torch.Tensor]], None], str]] = {
    "misshapen": (
        "gptq4",
        lambda t: t.update({f"{LAYER}.scales": t[f"{LAYER}.scales"][:, :64]}),
        rf"model.safetensors in .*'{LAYER}.scales' has shape \(1, 64\), expected \(1, 128\)",
    ),
    "missing": ("awq", lambda t: t.pop(f"{LAYER}.qzeros"), r"lacks 1 parameter.*qkv_proj.qzeros\[k\]"),
    "act_order": (
        "gptq4",
        lambda t: t.update({f"{WIDE_LAYER}.g_idx": t[f"{WIDE_LAYER}.g_idx"].flip(0)}),
        rf"'{WIDE_LAYER}.g_idx'.*not list input columns in order.*desc_act=true",
    ),
    "asymmetric_gptq": (
        "gptq4",
        lambda t: t.update({f"{LAYER}.qzeros": t[f"{LAYER}.qzeros"] + 1}),
        rf"'{LAYER}.qzeros'.*holds zero points \[8\] besides 7",
    ),
    "not_fp8": (
        "fp8_block",
        lambda t: t.update({f"{LAYER}.weight": t[f"{LAYER}.weight"].float()}),
        rf"'{LAYER}.weight'.*is torch.float32, expected torch.float8_e4m3fn",
    ),
    "shape_says_otherwise": (
        "W4A16",
        lambda t: t.update({f"{LAYER}.weight_shape": torch.tensor([128, 256])}),
        rf"'{LAYER}.weight_shape'.*says the weight is \(128, 256\), .* gives \(128, 128\)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TENSORS))
def test_bad_tensors_are_errors(quant_checkpoints: dict[str, Path], tmp_path: Path, case: str) -> None:
    """Guards against a tensor missing or misshapen for its format loading silently (wrong numbers): the error
    names the tensor, its file and what was expected; act-order and asymmetric GPTQ tensors are refused."""
    source, edit, message = BAD_TENSORS[case]
    model_dir = rewrite(quant_checkpoints[source], tmp_path / case, edit)
    with pytest.raises(ValueError, match=message):
        LLM(str(model_dir), **ENGINE_ARGS)  # type: ignore[arg-type]


def test_online_quantization_argument(quant_checkpoints: dict[str, Path]) -> None:
    """Guards against quantization= silently re-quantizing a quantized checkpoint, or taking an unknown value."""
    with pytest.raises(ValueError, match=re.escape("quantization='fp8' quantizes a float checkpoint")):
        LLM(str(quant_checkpoints["awq"]), quantization="fp8", **ENGINE_ARGS)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"quantization must be one of \(None, 'fp8'\), got 'int4'"):
        LLM(str(quant_checkpoints["float"]), quantization="int4", **ENGINE_ARGS)  # type: ignore[arg-type]


@pytest.mark.parametrize("source", ["awq", "fp8_block", "W4A16"])
def test_gpt2_refuses_formats_it_does_not_read(
    quant_checkpoints: dict[str, Path], tiny_model_dir: Callable[..., Path], source: str
) -> None:
    """Guards against a GPT-2 checkpoint in a format nobody lays out for its Conv1D layers (AWQ, FP8 and
    compressed-tensors quantize nn.Linear modules) loading with its tensors transposed or split by guesswork:
    the quant_method is refused while config.json is read, naming GPT-2's format and the online one."""
    quantization_config = json.loads((quant_checkpoints[source] / "config.json").read_text())["quantization_config"]
    model_dir = tiny_model_dir("gpt2")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    method = quantization_config["quant_method"]
    message = rf"quant_method='{method}' is not supported for GPT2LMHeadModel; supported: \['gptq'\], or quantization="
    with pytest.raises(ValueError, match=message):
        LLM(str(model_dir), **ENGINE_ARGS)  # type: ignore[arg-type]


def test_gpt2_refuses_tensors_it_does_not_read(tiny_model_dir: Callable[..., Path], tmp_path: Path) -> None:
    """Guards against a tensor of a GPT-2 linear layer that is neither Conv1D's nor GPTQ's (an FP8 scale) being
    transposed or split as if it were one of them: the error names the tensor and what GPT-2's layers hold."""
    name = "transformer.h.0.mlp.c_fc.weight_scale"
    model_dir = rewrite(tiny_model_dir("gpt2"), tmp_path / "gpt2", lambda t: t.update({name: torch.ones(128, 1)}))
    with pytest.raises(ValueError, match=rf"'{name}' is not one GPT-2's linear layers hold; they hold \['bias'"):
        LLM(str(model_dir), **ENGINE_ARGS)  # type: ignore[arg-type]


def test_phi3_block_fp8_parts_must_be_whole_blocks(tmp_path: Path) -> None:
    """Guards against Phi-3's fused q/k/v loading with a 128-row scale block that holds the end of q_proj and
    the start of k_proj (k and v are 4 heads x 16 = 64 rows here): refused, naming the tensor, sizes and block."""
    float_dir = write_tiny_model(
        tmp_path / "float", "phi3", hidden_size=256, num_attention_heads=16, num_key_value_heads=4,
        intermediate_size=256,
    )  # fmt: skip
    fp8_dir = write_fp8_method(write_compressed_tensors(float_dir, tmp_path / "ct", "FP8_BLOCK"), tmp_path / "fp8")
    message = (
        r"'model.layers.0.self_attn.qkv_proj.weight_scale_inv' holds \['q_proj', 'k_proj', 'v_proj'\] with "
        r"\[256, 64, 64\] outputs in one tensor, 128 outputs per scale block.*multiple of 128"
    )
    with pytest.raises(ValueError, match=message):
        LLM(str(fp8_dir), **ENGINE_ARGS)  # type: ignore[arg-type]


# (format, its tensor that packs outputs along their dim, codes per word)
PACKED_OUTPUTS = [
    (IntWeights("awq", 4, 128, has_zero_points=True), "qweight", 8),
    (IntWeights("awq", 4, 128, has_zero_points=True), "qzeros", 8),
    (IntWeights("gptq", 8, 128, has_zero_points=False), "qzeros", 4),
    (IntWeights("compressed-tensors", 4, 128, has_zero_points=True), "weight_zero_point", 8),
]


@pytest.mark.parametrize(("weights", "tensor_name", "codes_per_word"), PACKED_OUTPUTS)
def test_fused_parts_must_be_whole_packed_words(weights: IntWeights, tensor_name: str, codes_per_word: int) -> None:
    """Guards against a fused tensor whose packed word holds outputs of two parts (k_proj's last 2 and v_proj's
    first, with 10 outputs each) being cut anyway: refused, naming the tensor, the sizes and the word."""
    parts = [(".q_proj.", 32), (".k_proj.", 10), (".v_proj.", 10)]
    name = f"model.layers.0.self_attn.qkv_proj.{tensor_name}"
    split = fused_splits(weights)[tensor_name]
    message = rf"'{name}' holds .* \[32, 10, 10\] outputs in one tensor, {codes_per_word} outputs per packed word"
    with pytest.raises(ValueError, match=message):
        list(split_fused(name, torch.zeros(1, 1, dtype=torch.int32), ".qkv_proj.", parts, split))
