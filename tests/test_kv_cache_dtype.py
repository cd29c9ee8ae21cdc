"""The kv_cache_dtype engine argument: its checks, the backend it picks, the cache's size in bytes, and FP8 scales
read from a checkpoint (vLLM's tensor names), all on CPU with the torch backend."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovllm import LLM, SamplingParams
from nanovllm.config import EngineConfig
from nanovllm.kernels.backends import check_fp8_cache_support, resolve_backend_name
from nanovllm.models.kv_scales import KVScales, read_kv_scales
from nanovllm.runner import model_runner
from nanovllm.serving.server import engine_args_from, make_parser

ARGS = dict(device="cpu", dtype="bfloat16", kvcache_block_size=16, max_model_len=64)
NUM_LAYERS = 2  # the tiny models'
# A compressed-tensors config.json entry for static per-tensor FP8 KV scales, as llm-compressor writes it.
KV_CACHE_SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}


@pytest.fixture(scope="module")
def model_dir(tiny_models: dict[str, Path]) -> str:
    return str(tiny_models["qwen3"])


def test_bad_kv_cache_dtype_and_backend_pairs_fail_before_any_memory(model_dir: str) -> None:
    """Guards against an unknown kv_cache_dtype passing silently, flash-attn 2 being handed an FP8 cache it
    cannot read, and an FP8 cache on a GPU whose Triton cannot convert FP8: each a clear error naming the field."""
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of .*'fp8_e5m2'.*got 'int8'"):
        EngineConfig(model_dir, kv_cache_dtype="int8")
    with pytest.raises(ValueError, match=r"attention_backend='flash_attn' cannot read kv_cache_dtype='fp8'.*'triton'"):
        EngineConfig(model_dir, kv_cache_dtype="fp8", attention_backend="flash_attn")
    assert resolve_backend_name("auto", "cuda", 256, has_flash_attn=True, is_fp8_cache=True) == "triton"
    assert resolve_backend_name("auto", "cuda", 256, has_flash_attn=True, is_fp8_cache=False) == "flash_attn"
    with pytest.raises(ValueError, match=r"compute capability 8\.9\+.*this one is 8\.0"):
        check_fp8_cache_support("triton", torch.float8_e4m3fn, (8, 0))
    check_fp8_cache_support("triton", torch.float8_e4m3fn, (9, 0))  # Hopper
    check_fp8_cache_support("torch", torch.float8_e4m3fn, (8, 0))  # torch converts FP8 on any GPU
    args = make_parser().parse_args(["--model", "M", "--kv-cache-dtype", "fp8_e5m2"])
    assert engine_args_from(args)["kv_cache_dtype"] == "fp8_e5m2", "the server's flag comes from EngineConfig"


def test_fp8_cache_holds_twice_the_tokens_of_bfloat16(model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against sizing the cache by the model's element size instead of the cache's: the same bytes
    (CPU's default budget, 1 MiB here) must hold twice the blocks in FP8, and stats() must say how many tokens fit."""
    monkeypatch.setattr(model_runner, "CPU_KV_CACHE_BYTES", 1 << 20)
    capacity = {}
    for kv_cache_dtype, dtype in [
        ("auto", torch.bfloat16), ("fp8", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)
    ]:  # fmt: skip
        with LLM(model_dir, kv_cache_dtype=kv_cache_dtype, **ARGS) as llm:
            assert llm.engine is not None
            runner = llm.engine.runner
            assert runner.kv_cache.dtype == dtype, f"{kv_cache_dtype}: cache dtype {runner.kv_cache.dtype}"
            assert runner.kv_cache.nbytes <= 1 << 20 < runner.kv_cache.nbytes + runner.block_bytes
            capacity[kv_cache_dtype] = llm.engine.stats().kv_cache_capacity_tokens
            assert capacity[kv_cache_dtype] == runner.num_kvcache_blocks * ARGS["kvcache_block_size"]
    assert capacity["fp8"] == capacity["fp8_e5m2"] == 2 * capacity["auto"], capacity


def write_scales(path: Path, scales: dict[str, torch.Tensor], scheme: dict | None = KV_CACHE_SCHEME) -> None:
    """Add KV-scale tensors to the checkpoint at ``path``, and kv_cache_scheme to its config.json."""
    weights = load_file(path / "model.safetensors")
    save_file({**weights, **scales}, path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "kv_cache_scheme": scheme}
    (path / "config.json").write_text(json.dumps(config))


def test_checkpoint_scales_reach_every_layer(model_dir: str, tmp_path: Path) -> None:
    """Guards against FP8 scales in a checkpoint being ignored (or breaking the weight loader, which must leave
    them to the cache): each layer must hold its own, and kv_cache_dtype='auto' must load the same checkpoint."""
    path = Path(shutil.copytree(model_dir, tmp_path / "with_scales"))
    scales = {f"model.layers.{i}.self_attn.{kind}_scale": torch.tensor(0.5 + i + (kind == "v")) for i in range(2)
              for kind in "kv"}  # fmt: skip
    write_scales(path, scales)
    with LLM(str(path), kv_cache_dtype="fp8", num_kvcache_blocks=8, **ARGS) as llm:
        assert llm.engine is not None
        got = [(layer.k_scale, layer.v_scale) for layer in llm.engine.runner.attention_layers]
        assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)[0].token_ids
    assert got == [(0.5, 1.5), (1.5, 2.5)], got
    with LLM(str(path), num_kvcache_blocks=8, **ARGS) as llm:
        assert llm.engine is not None
        got = [(layer.k_scale, layer.v_scale) for layer in llm.engine.runner.attention_layers]
    assert got == [(1.0, 1.0), (1.0, 1.0)], f"a bfloat16 cache is not scaled: {got}"
    write_scales(path, {"model.layers.0.self_attn.k_scale": torch.ones(2)})  # per-head scales for layer 0's K
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.k_scale' has shape \[2\].*one scale per layer"):
        LLM(str(path), kv_cache_dtype="fp8", **ARGS)


@pytest.mark.parametrize(
    ("tensors", "expected"),
    [
        # ModelOpt's names; the deprecated kv_scale, one for both; compressed-tensors' older output_scale.
        ({"k_proj.k_scale": 2.0, "v_proj.v_scale": 3.0}, KVScales(2.0, 3.0)),
        ({"kv_scale": 4.0}, KVScales(4.0, 4.0)),
        ({"k_proj.output_scale": 0.25, "v_proj.output_scale": 0.5}, KVScales(0.25, 0.5)),
    ],
)
def test_every_vllm_spelling_of_the_scales(tmp_path: Path, tensors: dict[str, float], expected: KVScales) -> None:
    """Guards against missing a checkpoint's scales because they are spelled as another exporter spells them."""
    save_file(
        {f"model.layers.{i}.self_attn.{name}": torch.tensor([value]) for i in range(NUM_LAYERS)
         for name, value in tensors.items()},
        tmp_path / "model.safetensors",
    )  # fmt: skip
    assert read_kv_scales(str(tmp_path), {}, NUM_LAYERS) == [expected] * NUM_LAYERS


@pytest.mark.parametrize(
    ("tensors", "scheme", "match"),
    [
        ({"model.layers.0.self_attn.k_scale": 1.0, "model.layers.0.self_attn.v_scale": 1.0}, None, "layer 1 k_scale"),
        ({"model.layers.0.self_attn.kv_scale": 0.0, "model.layers.1.self_attn.kv_scale": 1.0}, None, "finite and > 0"),
        ({}, KV_CACHE_SCHEME, "no \\*.self_attn.k_scale / v_scale tensors"),
        ({}, {**KV_CACHE_SCHEME, "strategy": "attn_head"}, "kv_cache_scheme.strategy is 'attn_head'"),
        ({}, {**KV_CACHE_SCHEME, "type": "int"}, "kv_cache_scheme.type is 'int'"),
    ],
)
def test_scales_a_cache_cannot_follow_are_refused(
    tmp_path: Path, tensors: dict[str, float], scheme: dict | None, match: str
) -> None:
    """Guards against a checkpoint's scales being half used (some layers only), a zero scale dividing by zero, and
    a kv_cache_scheme asking for what this cache does not do (per-head scales, int8, scales that are not there)."""
    save_file({name: torch.tensor(value) for name, value in tensors.items()} or {"x": torch.zeros(1)},
              tmp_path / "model.safetensors")  # fmt: skip
    config = {} if scheme is None else {"quantization_config": {"kv_cache_scheme": scheme}}
    with pytest.raises(ValueError, match=match):
        read_kv_scales(str(tmp_path), config, NUM_LAYERS)
