"""Weight loading: sharded checkpoints, and loud failures for missing or unknown tensors."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovllm import LLM, SamplingParams

ARGS = dict(device="cpu", dtype="float32", kvcache_block_size=16, num_kvcache_blocks=32, max_model_len=128)
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def rewrite_checkpoint(src: Path, dst: Path, num_shards: int, edit=None) -> None:
    """Copy a model dir, splitting (and optionally editing) its weights over num_shards safetensors files."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    if edit is not None:
        edit(tensors)
    names = sorted(tensors)
    for i in range(num_shards):
        part = {name: tensors[name].contiguous() for name in names[i::num_shards]}
        save_file(part, str(dst / f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"))


def tokens(model_dir: Path) -> list[int]:
    with LLM(str(model_dir), **ARGS) as llm:
        return llm.generate([[3, 1, 4, 1, 5]], GREEDY, use_tqdm=False)[0].token_ids


@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])
def test_sharded_checkpoint_loads_the_same_model(tiny_models: dict[str, Path], tmp_path: Path, arch: str) -> None:
    """Guards against tensors of a multi-file checkpoint being skipped or loaded into the wrong parameter."""
    rewrite_checkpoint(tiny_models[arch], tmp_path / "sharded", num_shards=3)
    assert tokens(tmp_path / "sharded") == tokens(tiny_models[arch])


def test_missing_tensor_is_an_error(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Guards against a parameter silently keeping uninitialized memory when the checkpoint lacks it."""
    rewrite_checkpoint(tiny_models["qwen3"], tmp_path / "m", 2, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"lacks 1 parameter.*gate_up_proj.weight\[1\]"):
        LLM(str(tmp_path / "m"), **ARGS)


def test_unknown_tensor_is_an_error(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Guards against checkpoint tensors the model does not use being dropped without a word."""
    rewrite_checkpoint(tiny_models["qwen3"], tmp_path / "m", 1, lambda t: t.update(extra=torch.ones(2)))
    with pytest.raises(ValueError, match="'extra'.*has no parameter"):
        LLM(str(tmp_path / "m"), **ARGS)
