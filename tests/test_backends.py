"""Attention backend selection, and the Triton backend inside the whole engine (CPU: Triton's interpreter)."""

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.kernels.backends import resolve_backend_name


@pytest.mark.parametrize(
    ("name", "device", "block_size", "has_flash", "expected"),
    [
        ("auto", "cpu", 256, True, "torch"),
        ("auto", "cuda", 256, True, "flash_attn"),
        ("auto", "cuda", 256, False, "triton"),
        ("auto", "cuda", 16, True, "triton"),  # flash-attn cannot page in blocks of 16
        ("torch", "cuda", 16, True, "torch"),
        ("triton", "cuda", 16, True, "triton"),
        ("flash_attn", "cuda", 512, True, "flash_attn"),
    ],
)
def test_backend_choice(name: str, device: str, block_size: int, has_flash: bool, expected: str) -> None:
    """Guards against "auto" picking a backend that cannot run, or an explicit choice being overridden."""
    assert resolve_backend_name(name, device, block_size, has_flash) == expected


@pytest.mark.parametrize(
    ("name", "device", "block_size", "has_flash", "match"),
    [
        ("flash_attn", "cuda", 256, False, "not installed"),
        ("flash_attn", "cuda", 16, True, "multiple of 256"),
        ("flash_attn", "cpu", 256, True, "needs a CUDA device"),
    ],
)
def test_backend_choice_errors(name: str, device: str, block_size: int, has_flash: bool, match: str) -> None:
    """Guards against silently falling back to another backend when the one asked for cannot run."""
    with pytest.raises(ValueError, match=match):
        resolve_backend_name(name, device, block_size, has_flash)


def test_triton_needs_cuda_or_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against Triton kernels being launched on CPU tensors without the interpreter."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_backend_name("triton", "cpu", 16, False)


# Triton's norm + rotary kernel with and without q/k norm; Gemma 3's (1 + w) RMSNorms and GeGLU in Triton too.
@pytest.mark.parametrize("arch", ["qwen3", "llama", "gemma3"])
@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors through Triton's interpreter (GPU: test_families.py)"
)
def test_triton_backend_matches_torch_in_the_engine(tiny_model_dir: Callable[..., Path], arch: str) -> None:
    """Guards against wiring mistakes between the engine and the Triton kernels (prefill, prefix hits, decode,
    the gated activation)."""
    args = dict(device="cpu", dtype="float32", kvcache_block_size=16, num_kvcache_blocks=32, max_model_len=128)
    prompts = [[7] * 20 + [3, 4], [7] * 20 + [5], [9, 8, 7]]  # the second finds the first's block cached
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=3)
    results, logprobs = {}, {}
    model_dir = tiny_model_dir(arch)
    for backend in ("torch", "triton"):
        with LLM(str(model_dir), attention_backend=backend, **args) as llm:
            first = llm.generate(prompts[:1], params, use_tqdm=False)
            rest = llm.generate(prompts[1:], params, use_tqdm=False)
            results[backend] = [out.token_ids for out in first + rest]
            logprobs[backend] = [
                value for out in first + rest for top in out.outputs[0].logprobs for value in top.values()
            ]
            assert llm.prefix_cache_stats().num_hit_tokens == 16
    assert results["triton"] == results["torch"]
    # Logprobs too: a small error (say, q and k norm weights swapped) can leave greedy tokens unchanged.
    assert max(abs(a - b) for a, b in zip(logprobs["triton"], logprobs["torch"], strict=True)) < 1e-4
