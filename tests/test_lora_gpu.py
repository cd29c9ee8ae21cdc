"""LoRA on the GPU fast path: the Triton shrink/expand kernels compiled, and decode graphs captured with adapter
slots as inputs. Skipped without CUDA; run on the GPU machine (the kernels' CPU checks are test_lora_kernels.py)."""

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lora_fixtures import adapter_specs, peft_greedy_reference, write_peft_adapter

from nanovllm import LLM, LoRARequest, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MAX_TOKENS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
ARGS = dict(device="cuda", attention_backend="triton", kvcache_block_size=16, num_kvcache_blocks=256, max_model_len=256)
LORA_ARGS = dict(enable_lora=True, max_loras=2, max_lora_rank=16, max_num_seqs=24, **ARGS)


# qwen3 (gate/up, q/k/v fused by us), GPT-2 (q/k/v fused in the checkpoint's c_attn, fc1/fc2), Phi (dense, fc1/fc2).
GPU_ARCHS = ["qwen3", "gpt2", "phi"]


def make_workload(model_dir: Path, arch: str, root: Path) -> tuple[list, list]:
    """21 prompts spread over three adapters and the base model (more adapters than the 2 slots): decode batches
    of sizes between the graph buckets, with adapters swapped in and out."""
    loras: list[LoRARequest | None] = [None]
    for lora_id, (name, spec) in enumerate(adapter_specs(arch).items(), start=1):
        loras.append(LoRARequest(name, lora_id, str(write_peft_adapter(root / name, model_dir, spec, seed=lora_id))))
    rng = random.Random(0)
    prompts = [[rng.randrange(400) for _ in range(rng.randint(1, 60))] for _ in range(21)]
    return prompts, [loras[i % len(loras)] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def workload(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[list, list]:
    return make_workload(tiny_models["qwen3"], "qwen3", tmp_path_factory.mktemp("gpu_adapters"))


def greedy_tokens(model_dir: Path, workload: tuple[list, list], **args: object) -> list[list[int]]:
    prompts, loras = workload
    with LLM(str(model_dir), **{**LORA_ARGS, **args}) as llm:
        assert llm.engine is not None
        assert (llm.engine.runner.decode_graphs is not None) == (not args.get("enforce_eager")), "graphs as asked"
        return [out.token_ids for out in llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=loras)]


@pytest.mark.parametrize("arch", GPU_ARCHS)
def test_lora_graphs_and_kernels_match_peft_in_float32(
    tiny_models: dict[str, Path], tiny_model_dir: Callable[..., Path], tmp_path: Path, arch: str
) -> None:
    """Guards against the compiled kernels computing another function than on CPU, and against decode graphs
    replaying stale adapter slots (lanes of a bigger batch, an adapter since evicted)."""
    model_dir = tiny_models[arch] if arch in tiny_models else tiny_model_dir(arch)
    workload = make_workload(model_dir, arch, tmp_path)
    prompts, loras = workload
    expected = [
        peft_greedy_reference(str(model_dir), None if lora is None else lora.lora_path, tuple(p), MAX_TOKENS).token_ids
        for p, lora in zip(prompts, loras, strict=True)
    ]
    graphs = greedy_tokens(model_dir, workload, dtype="float32")
    eager = greedy_tokens(model_dir, workload, dtype="float32", enforce_eager=True)
    assert eager == expected, f"{arch}: eager Triton LoRA differs from PEFT"
    assert graphs == expected, f"{arch}: decode graphs with LoRA differ from PEFT"


def test_lora_graphs_equal_eager_in_bfloat16(tiny_models: dict[str, Path], workload: tuple) -> None:
    """Guards against the 16-bit kernels (tensor-core dots) behaving differently when captured in a graph."""
    graphs = greedy_tokens(tiny_models["qwen3"], workload, dtype="bfloat16")
    eager = greedy_tokens(tiny_models["qwen3"], workload, dtype="bfloat16", enforce_eager=True)
    assert graphs == eager
