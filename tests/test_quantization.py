"""Quantized checkpoints in the engine against transformers running the same quantized model, float32 on CPU.

The checkpoints (tests/quant_fixtures.py) are written by compressed-tensors itself, or repacked from one into
AWQ, GPTQ and Qwen's "fp8" layouts; transformers runs the compressed-tensors checkpoint that holds the same
numbers (decompressing its weights, and quantizing FP8 activations per token on the fly as the format says).
Greedy tokens must be equal and the generated tokens' logprobs within LOGPROB_TOLERANCE.
"""

import logging
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from model_fixtures import write_tiny_model
from quant_fixtures import (
    REPACKED_FROM,
    dequantized_gpt2,
    load_reference,
    write_compressed_tensors,
    write_gptq,
    write_quant_checkpoints,
)
from safetensors.torch import load_file

from nanovllm import LLM, SamplingParams

ENGINE_ARGS = dict(device="cpu", dtype="float32", kvcache_block_size=16, num_kvcache_blocks=32, max_model_len=128)
PROMPTS = [[5], [11, 7, 301, 42, 9, 250, 3, 77, 120], list(range(30, 50))]  # 1 token, a partial block, 1.25 blocks
MAX_TOKENS = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
# Engine and transformers compute the same dequantized products in float32; they differ in summation order
# only (measured up to ~1e-5 on these models), far below a quantization step's effect on a logit (~1e-2).
LOGPROB_TOLERANCE = 1e-4
FP8_GPU_LOGPROB_TOLERANCE = 0.25  # see test_gpu_matches_transformers
# Run against transformers here; AWQ and fp8_block under TP=2 below; every repacked format loads the tensors
# of the checkpoint it came from (test_repacked_formats_load_the_same_tensors).
FORMATS = ["W4A16", "W4A16_ASYM", "FP8_DYNAMIC", "FP8_PER_TENSOR", "FP8_BLOCK", "gptq8"]
# One format per other architecture (qwen3 runs them all): q/k/v biases (qwen2), llama3 rope, tied embeddings
# and key/value projections narrower than a 128-row block (llama), mistral; Gemma 3's and Phi-3's layers (Phi-3's
# q/k/v and gate/up fused in the checkpoint), Phi's biased fc1/fc2 and dense; the MoE models' attention (the
# compressed-tensors library leaves transformers' stacked expert tensors unquantized). GPT-2 has no
# compressed-tensors checkpoints (its Conv1D layers are not the nn.Linear modules the library quantizes): its
# GPTQ and online FP8 run below.
OTHER_ARCHS = {
    "qwen2": "W4A16_ASYM", "llama": "FP8_BLOCK", "mistral": "W8A16", "gemma3": "FP8_DYNAMIC", "phi3": "FP8_DYNAMIC",
    "phi": "W4A16_ASYM", "qwen3_moe": "FP8_DYNAMIC", "mixtral": "FP8_DYNAMIC",
}  # fmt: skip
NATIVE_SIZE_ARCHS = {"phi3"}  # its tiny config's rope scaling factors fit its own head size only
# Phi-3 with head_dim 16 (its tiny rope factors'): q 256, k and v 128, gate and up 256 outputs, each a whole
# number of 128-row scale blocks and of packed words, and every input a whole number of 128-column groups.
PHI3_QUANT_SIZES = dict(hidden_size=256, num_attention_heads=16, num_key_value_heads=8, intermediate_size=256)
# Phi-3's fused tensors in each layout: compressed-tensors (zero points packed along the rows), AWQ and GPTQ
# (outputs in columns, qzeros packed along them, 8 or 4 a word), Qwen's fp8: blocks (a scale per 128 rows) and
# one scale per fused tensor (q, k and v each take it).
PHI3_FORMATS = ["W4A16_ASYM", "awq", "gptq4", "gptq8", "fp8_block", "fp8_tensor"]


@lru_cache(maxsize=16)
def reference_model(ct_dir: str) -> torch.nn.Module:
    return load_reference(Path(ct_dir), asymmetric="ASYM" in Path(ct_dir).name)


def hf_logprobs(model: torch.nn.Module, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """transformers' logprobs [len(generated), vocab] for each generated token, given the tokens before it.

    The engine's tokens are transformers' greedy tokens exactly when each is the argmax of its row: one
    forward over prompt + generated checks every step (the first difference is the first wrong argmax).
    """
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + generated])).logits[0]  # [len(prompt) + len(generated), vocab]
    return logits[len(prompt) - 1 : -1].log_softmax(-1)


def check_against_transformers(
    model_dir: Path, reference: Path | torch.nn.Module, tolerance: float = LOGPROB_TOLERANCE, **engine_args: object
) -> None:
    """The engine on model_dir against transformers on ``reference``: a compressed-tensors checkpoint, or a model."""
    with LLM(str(model_dir), **{**ENGINE_ARGS, **engine_args}) as llm:  # type: ignore[arg-type]
        outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    if not isinstance(reference, torch.nn.Module):
        reference = reference_model(str(reference))
    for prompt_idx, (prompt, output) in enumerate(zip(PROMPTS, outputs, strict=True)):
        want_logprobs = hf_logprobs(reference, prompt, output.token_ids)  # [MAX_TOKENS, vocab]
        want_ids = want_logprobs.argmax(-1).tolist()
        where = f"{model_dir.name} {engine_args or ''} prompt {prompt_idx}"
        assert output.token_ids == want_ids, f"{where}: engine {output.token_ids}, transformers' argmax {want_ids}"
        got = torch.tensor([step[t] for step, t in zip(output.outputs[0].logprobs, want_ids, strict=True)])
        want = want_logprobs[torch.arange(MAX_TOKENS), want_ids]
        assert float((got - want).abs().max()) <= tolerance, f"{where}: logprobs {got} vs {want}"


@pytest.mark.parametrize("name", FORMATS)
def test_engine_matches_transformers(quant_checkpoints: dict[str, Path], name: str) -> None:
    """Guards against a misread format: packing order, zero-point offsets (GPTQ's zero - 1, compressed-tensors'
    signed codes), scales per group, channel, tensor or block, scales on the wrong fused part, and activations
    quantized per token (or per block) differently from what the format specifies."""
    check_against_transformers(quant_checkpoints[name], quant_checkpoints[REPACKED_FROM.get(name, name)])


def quantized_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """What the engine holds for every quantized layer after loading model_dir, by role, as raw bytes."""
    with LLM(str(model_dir), **ENGINE_ARGS) as llm:  # type: ignore[arg-type]
        assert llm.engine is not None
        tensors = {}
        for module_name, module in llm.engine.runner.model.named_modules():
            scheme = getattr(module, "scheme", None)
            if scheme is None:
                continue
            for role, name in scheme.names.items():  # role ("codes", "scales" ...) -> tensor name in its format
                tensors[f"{module_name}.{role}"] = getattr(module, name).detach().flatten().view(torch.uint8)
    return tensors


@pytest.mark.parametrize("name", sorted(REPACKED_FROM))
def test_repacked_formats_load_the_same_tensors(quant_checkpoints: dict[str, Path], name: str) -> None:
    """Guards against a reader of AWQ, GPTQ or Qwen's fp8 layout that unpacks, transposes or offsets anything
    differently from compressed-tensors' reader: the same model in both layouts must load to the same bytes
    (AWQ's word order and packed zero points, GPTQ's transposed codes and zero - 1, fp8's scalar and block
    scales). The compressed-tensors checkpoints match transformers above."""
    got, want = quantized_tensors(quant_checkpoints[name]), quantized_tensors(quant_checkpoints[REPACKED_FROM[name]])
    assert got.keys() == want.keys(), f"{sorted(got)} != {sorted(want)}"
    differing = [key for key in got if not torch.equal(got[key], want[key])]
    assert not differing, f"{name} loads different {differing} than {REPACKED_FROM[name]}"


@pytest.mark.parametrize("arch", sorted(OTHER_ARCHS))
def test_other_architectures(tmp_path: Path, arch: str) -> None:
    """Guards against quantization that works for qwen3's layers only: q/k/v biases added to a quantized
    product (qwen2, phi), tied embeddings left unquantized (llama), llama2 and mistral layouts, fused checkpoint
    tensors split before they are quantized layers' parts (phi3), a plain MLP's projections (phi)."""
    sizes = {} if arch in NATIVE_SIZE_ARCHS else dict(hidden_size=128, intermediate_size=256)  # groups of 128
    float_dir = write_tiny_model(tmp_path / "float", arch, **sizes)
    ct_dir = write_compressed_tensors(float_dir, tmp_path / OTHER_ARCHS[arch], OTHER_ARCHS[arch])
    check_against_transformers(ct_dir, ct_dir)


GPT2_SIZES = dict(hidden_size=128, n_inner=256)  # groups of 128, as QUANT_SIZES (n_inner: its intermediate_size)
GPT2_GPTQ = {"gptq4": ("W4A16", 4), "gptq8": ("W8A16", 8)}  # GPT-2's GPTQ checkpoints -> (repacked from, bits)


@pytest.fixture(scope="module")
def gpt2_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny float GPT-2 ("float") and its GPTQ checkpoints, repacked from compressed-tensors' presets of its
    Conv1D layers taken as nn.Linear ones (quant_fixtures.conv1d_as_linear), as AutoGPTQ packs them."""
    root = tmp_path_factory.mktemp("gpt2_quant")
    dirs = {"float": write_tiny_model(root / "float", "gpt2", **GPT2_SIZES)}
    for name, (preset, bits) in GPT2_GPTQ.items():
        ct_dir = write_compressed_tensors(dirs["float"], root / preset, preset)
        dirs[name] = write_gptq(ct_dir, root / name, bits)
    return dirs


@pytest.mark.parametrize("name", sorted(GPT2_GPTQ))
def test_gpt2_gptq_matches_transformers(gpt2_checkpoints: dict[str, Path], name: str) -> None:
    """Guards against GPT-2's Conv1D transposition applied to GPTQ tensors (already [in / P, out]), c_attn's
    q/k/v split along the packed inputs instead of the outputs (qweight's and scales' columns, qzeros' packed
    words), or g_idx given to one part only: the engine against transformers' own GPT-2 running the weights
    compressed-tensors dequantizes, back in its Conv1D layout."""
    reference = dequantized_gpt2(gpt2_checkpoints["float"], GPT2_GPTQ[name][0])
    check_against_transformers(gpt2_checkpoints[name], reference)


def test_gpt2_gptq_tp2_matches_transformers(tmp_path: Path) -> None:
    """Guards against c_attn's GPTQ parts sharded like float rows at TP=2: each rank must take its columns of
    q's, k's and v's qweight and scales, and its packed words of their qzeros (twice GPT2_SIZES, so that each
    rank's share of o_proj and c_proj's inputs is a whole group of 128)."""
    float_dir = write_tiny_model(tmp_path / "float", "gpt2", hidden_size=256, n_inner=512)
    gptq_dir = write_gptq(write_compressed_tensors(float_dir, tmp_path / "W4A16", "W4A16"), tmp_path / "gptq4", 4)
    check_against_transformers(gptq_dir, dequantized_gpt2(float_dir, "W4A16"), tensor_parallel_size=2)


def test_gpt2_online_fp8_matches_transformers(gpt2_checkpoints: dict[str, Path]) -> None:
    """Guards against quantization="fp8" quantizing GPT-2's Conv1D weights before they are transposed (a scale
    per input feature instead of per output row): the engine against transformers' GPT-2 with compressed-tensors'
    FP8_DYNAMIC arithmetic on each Conv1D (weights per output channel, inputs per token)."""
    reference = dequantized_gpt2(gpt2_checkpoints["float"], "FP8_DYNAMIC")
    check_against_transformers(gpt2_checkpoints["float"], reference, quantization="fp8")


@pytest.fixture(scope="module")
def phi3_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PHI3_FORMATS' checkpoints of one tiny Phi-3, and the compressed-tensors ones they are repacked from."""
    root = tmp_path_factory.mktemp("phi3_quant")
    float_dir = write_tiny_model(root / "float", "phi3", **PHI3_QUANT_SIZES)
    presets = tuple({REPACKED_FROM.get(name, name) for name in PHI3_FORMATS})
    return write_quant_checkpoints(float_dir, root, presets)


@pytest.mark.parametrize("name", PHI3_FORMATS)
def test_phi3_fused_quantized_tensors(phi3_checkpoints: dict[str, Path], name: str) -> None:
    """Guards against Phi-3's fused qkv_proj and gate_up_proj tensors cut along the wrong dim of a quantized
    format: GPTQ and AWQ keep the outputs in columns (qweight [in / 8, q + k + v]), packed zero points hold 8
    (or 4) outputs per word and block FP8 one scale per 128 rows, so each part takes whole words and blocks."""
    check_against_transformers(phi3_checkpoints[name], phi3_checkpoints[REPACKED_FROM.get(name, name)])


def test_phi3_fused_awq_tp2_matches_transformers(phi3_checkpoints: dict[str, Path]) -> None:
    """Guards against the parts cut from Phi-3's fused AWQ tensors then sharded at TP=2 as one tensor would be:
    each rank takes its packed words of q's, k's and v's qweight and qzeros (k and v: 64 outputs a rank)."""
    check_against_transformers(phi3_checkpoints["awq"], phi3_checkpoints[REPACKED_FROM["awq"]], tensor_parallel_size=2)


def test_online_fp8_is_compressed_tensors_fp8_dynamic(quant_checkpoints: dict[str, Path]) -> None:
    """Guards against quantization="fp8" quantizing a float checkpoint differently from the per-channel FP8
    that compressed-tensors writes (FP8_DYNAMIC of the same model): the weights must be bit-equal, scales too,
    and the engine must match transformers on that checkpoint."""
    check_against_transformers(quant_checkpoints["float"], quant_checkpoints["FP8_DYNAMIC"], quantization="fp8")
    written = load_file(str(quant_checkpoints["FP8_DYNAMIC"] / "model.safetensors"))
    with LLM(str(quant_checkpoints["float"]), quantization="fp8", **ENGINE_ARGS) as llm:  # type: ignore[arg-type]
        assert llm.engine is not None
        mlp = llm.engine.runner.model.model.layers[1].mlp
        down_weight, down_scale = mlp.down_proj.weight, mlp.down_proj.weight_scale
        gate_up_scale = mlp.gate_up_proj.weight_scale
    prefix = "model.layers.1.mlp"
    want_weight = written[f"{prefix}.down_proj.weight"]
    assert torch.equal(down_weight.view(torch.uint8), want_weight.view(torch.uint8)), "FP8 bits differ"
    assert torch.equal(down_scale, written[f"{prefix}.down_proj.weight_scale"]), "down_proj scales differ"
    want_gate_up = torch.cat([written[f"{prefix}.gate_proj.weight_scale"], written[f"{prefix}.up_proj.weight_scale"]])
    assert torch.equal(gate_up_scale, want_gate_up), "fused gate/up scales differ"


@pytest.mark.parametrize("name", ["awq", "fp8_block"])
def test_tp2_matches_transformers(quant_checkpoints: dict[str, Path], name: str) -> None:
    """Guards against quantized weights sharded across the wrong rows or columns: AWQ's words packed along the
    output (split between ranks at 8-column word edges), group scales and zero points cut with the input
    columns of o_proj and down_proj, FP8 block scales repeated on the rows of each rank. TP=1 gives
    transformers' tokens too (test_engine_matches_transformers), so TP=2 gives TP=1's."""
    check_against_transformers(quant_checkpoints[name], quant_checkpoints[REPACKED_FROM[name]], tensor_parallel_size=2)


def test_weight_memory_is_logged_and_smaller(
    quant_checkpoints: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Guards against quantized layers that still hold (or also hold) float weights, which the KV-cache sizing
    would then count: the 4-bit model's linear layers must take about an eighth of the float32 ones."""
    sizes = {}
    with caplog.at_level(logging.INFO, logger="nanovllm.runner.model_runner"):
        for name in ("float", "W4A16"):
            with LLM(str(quant_checkpoints[name]), **ENGINE_ARGS) as llm:  # type: ignore[arg-type]
                assert llm.engine is not None
                sizes[name] = llm.engine.runner.weight_bytes
    assert "model weights take" in caplog.text and "compressed-tensors" in caplog.text, caplog.text
    # 2 layers x (qkv 128 x 512 + o 256 x 128 + gate_up 128 x 512 + down 256 x 128) weights; the embeddings,
    # LM head and norms stay float32. Each weight: 4 bytes -> half a byte of code plus a 4-byte scale per 128.
    num_linear = 2 * (128 * 512 + 256 * 128 + 128 * 512 + 256 * 128)
    saved = sizes["float"] - sizes["W4A16"]
    assert saved == num_linear * (4 - 0.5 - 4 / 128), f"float {sizes['float']} B, W4A16 {sizes['W4A16']} B"


@pytest.mark.parametrize(("name", "quantization"), [("awq", None), ("fp8_block", None), ("float", "fp8")])
def test_dummy_weights(quant_checkpoints: dict[str, Path], name: str, quantization: str | None) -> None:
    """Guards against load_format="dummy" (bench.py's random weights) failing on quantized tensors or giving
    NaN: integer codes, FP8 values and scales each need their own random fill."""
    args = dict(ENGINE_ARGS, load_format="dummy", quantization=quantization)
    with LLM(str(quant_checkpoints[name]), **args) as llm:  # type: ignore[arg-type]
        output = llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0]
    logprobs = [step[token] for step, token in zip(output.outputs[0].logprobs, output.token_ids, strict=True)]
    assert all(torch.isfinite(torch.tensor(logprobs))), logprobs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the Triton GEMMs compiled, CUDA graphs")
@pytest.mark.parametrize("name", ["W4A16_ASYM", "gptq8", "FP8_DYNAMIC", "FP8_BLOCK", "awq"])
def test_gpu_matches_transformers(quant_checkpoints: dict[str, Path], name: str) -> None:
    """Guards against the compiled GEMMs (and decode steps replayed from CUDA graphs) diverging from the CPU
    path: float32 on the GPU, so FP8 goes through the Triton FP8 GEMM, multiplying the FP8 values' bfloat16
    images. Integer formats differ from the CPU by summation order only (1e-3). FP8 activations are rounded to
    FP8 per token, and rounding is not continuous: a float32 difference of one unit in the last place upstream
    can move an activation a whole FP8 step (up to 1/8 of it), and on an H200 one such flip moved a logprob of
    these tiny models by 0.15 while every token stayed equal; a wrong scale or block moves them by far more."""
    reference = quant_checkpoints[REPACKED_FROM.get(name, name)]
    tolerance = FP8_GPU_LOGPROB_TOLERANCE if name.startswith("FP8") else 1e-3
    check_against_transformers(quant_checkpoints[name], reference, tolerance=tolerance, device="cuda")


def test_phi3_ignore_list_names_its_fused_modules(tmp_path: Path) -> None:
    """Guards against an ignore list matched against our layer names (q_proj, gate_proj) where the checkpoint
    names its own fused modules (qkv_proj, gate_up_proj): the ignored layers hold float weights, which the engine
    must load unquantized, and must match transformers on the same checkpoint."""
    float_dir = write_tiny_model(tmp_path / "float", "phi3")
    ignore = ("lm_head", "model.layers.0.self_attn.qkv_proj", r"re:.*layers\.1\.mlp\.gate_up_proj$")
    ct_dir = write_compressed_tensors(float_dir, tmp_path / "fp8", "FP8_DYNAMIC", ignore)
    with LLM(str(ct_dir), **ENGINE_ARGS) as llm:  # type: ignore[arg-type]
        assert llm.engine is not None
        layers = llm.engine.runner.model.model.layers
        schemes = {
            "layers.0 qkv": layers[0].self_attn.qkv_proj.scheme, "layers.0 gate_up": layers[0].mlp.gate_up_proj.scheme,
            "layers.1 qkv": layers[1].self_attn.qkv_proj.scheme, "layers.1 gate_up": layers[1].mlp.gate_up_proj.scheme,
        }  # fmt: skip
    unquantized = sorted(name for name, scheme in schemes.items() if scheme is None)
    assert unquantized == ["layers.0 qkv", "layers.1 gate_up"], f"unquantized: {unquantized}"
    check_against_transformers(ct_dir, ct_dir)


@pytest.mark.parametrize(
    ("family", "ignore", "ignored", "quantized"),
    [
        (
            "gpt2",
            ("transformer.h.0.attn.c_attn", r"re:.*h\.1\.mlp\.c_proj$"),
            {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.fc2"},
            {"model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.k_proj", "model.layers.0.mlp.fc2"},
        ),
        (
            "phi",
            ("model.layers.1.self_attn.dense",),
            {"model.layers.1.self_attn.o_proj"},
            {"model.layers.0.self_attn.o_proj"},
        ),
    ],
)
def test_quantization_matches_checkpoint_module_names(
    family: str, ignore: tuple[str, ...], ignored: set[str], quantized: set[str]
) -> None:
    """Guards against quantization_config's targets and ignore lists (which spell GPT-2's transformer.h.N.attn.c_attn
    and Phi's self_attn.dense) matched against our module names (model.layers.N.self_attn.q_proj, o_proj): an ignored
    layer would load as quantized. The renames come from each family's checkpoint_renames and fused modules."""
    from nanovllm.layers.quantization.base import LinearQuantization
    from nanovllm.models.gpt2 import GPT2LMHeadModel
    from nanovllm.models.phi import PhiForCausalLM

    model_cls = {"gpt2": GPT2LMHeadModel, "phi": PhiForCausalLM}[family]
    quant = LinearQuantization(
        None,  # type: ignore[arg-type]  # the scheme is not used to decide what is quantized
        targets=("Linear",),
        ignore=ignore,
        module_renames=model_cls.quant_module_renames(),
    )
    for name in ignored | quantized:
        assert quant.is_quantized(name) == (name in quantized), f"{name}: is_quantized {quant.is_quantized(name)}"
