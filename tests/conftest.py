"""Shared test setup. The tiny-model fixtures below build their directories with model_fixtures.py."""

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

# Triton kernels run on CPU tensors through Triton's interpreter when there is no GPU.
# This must be set before any @triton.jit function is defined, so it lives here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every entry of model_fixtures.TINY_MODEL_VARIANTS, built once per session: name -> model dir."""
    # Imported here, not at the top: transformers takes seconds to import and most tests never need it.
    from model_fixtures import TINY_MODEL_VARIANTS, write_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    return {
        name: write_tiny_model(root / name, arch, legacy_rope_keys=legacy_rope_keys)
        for name, (arch, legacy_rope_keys) in TINY_MODEL_VARIANTS.items()
    }


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory for one-off tiny models: `tiny_model_dir("llama", seed=1, num_hidden_layers=3)`.
    Takes write_tiny_model's arguments after `path`; each call writes a fresh directory."""
    from model_fixtures import write_tiny_model

    def make(arch: str, seed: int = 0, **kwargs: Any) -> Path:
        return write_tiny_model(tmp_path_factory.mktemp(f"tiny_{arch}"), arch, seed, **kwargs)

    return make


@pytest.fixture(scope="session")
def quant_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny quantized qwen3 checkpoints of every format (tests/quant_fixtures.py), built once per session:
    "float" (their source), compressed-tensors presets by name ("W4A16", "FP8_BLOCK", ...), and "awq",
    "gptq4", "gptq8", "fp8_block", "fp8_tensor" repacked from them."""
    from model_fixtures import write_tiny_model
    from quant_fixtures import QUANT_SIZES, write_quant_checkpoints

    root = tmp_path_factory.mktemp("quant_models")
    return write_quant_checkpoints(write_tiny_model(root / "float", "qwen3", **QUANT_SIZES), root)
