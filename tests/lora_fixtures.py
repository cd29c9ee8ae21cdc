"""PEFT LoRA adapters of the tiny models, written by PEFT itself, and PEFT's greedy tokens as the reference.

`write_peft_adapter` wraps a tiny model with PEFT's ``get_peft_model``, draws every LoRA weight (PEFT starts B
at zero, which would make an adapter that is never applied look right) and saves the adapter directory as a
user's training run would. The reference runs PEFT's ``merge_and_unload()`` model: W + scaling * B A.
"""

import copy
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from model_fixtures import GreedyReference, greedy_reference, load_hf_model
from transformers import AutoModelForCausalLM

# Std of the drawn LoRA weights. With the tiny models' weights at std 0.2 (model_fixtures.INIT_RANGE), an
# adapter of rank 4-16 then changes most greedy tokens without drowning the base model.
LORA_INIT_STD = 0.15


@dataclass(frozen=True)
class AdapterSpec:
    rank: int  # r
    alpha: float  # lora_alpha
    target_modules: tuple[str, ...]  # PEFT module names
    use_rslora: bool = False  # scaling alpha / sqrt(r) instead of alpha / r


# The targets of three adapters (a, b, c), as each family's checkpoint names its modules: a few attention modules,
# every module, and some of both kinds. GPT-2's "c_proj" adapts its attention output and its MLP down projection,
# "attn.c_proj" the first alone.
ADAPTER_TARGETS = {
    "llama": (
        ("q_proj", "v_proj"),
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        ("k_proj", "o_proj", "up_proj", "down_proj"),
    ),
    "phi": (("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"), ("k_proj", "dense", "fc2")),
    "gpt2": (("c_attn", "attn.c_proj"), ("c_attn", "c_proj", "c_fc"), ("c_proj",)),
}


def adapter_specs(arch: str) -> dict[str, AdapterSpec]:
    """Three adapters of different ranks, scalings (one rsLoRA) and targets, named as ``arch``'s checkpoint names
    its modules (ADAPTER_TARGETS; LLaMA's names for an arch not there)."""
    a, b, c = ADAPTER_TARGETS.get(arch, ADAPTER_TARGETS["llama"])
    return {
        "a": AdapterSpec(rank=8, alpha=16, target_modules=a),
        "b": AdapterSpec(rank=16, alpha=8, target_modules=b, use_rslora=True),
        "c": AdapterSpec(rank=4, alpha=8, target_modules=c),
    }


ADAPTER_SPECS = adapter_specs("llama")  # the families that name their modules as LLaMA does


def write_peft_adapter(path: Path, model_dir: Path, spec: AdapterSpec, seed: int) -> Path:
    """Save a PEFT LoRA adapter of ``model_dir`` with random weights to ``path``; returns ``path``."""
    from peft import LoraConfig, get_peft_model  # imported here: only the LoRA tests need PEFT

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.target_modules), use_rslora=spec.use_rslora
    )
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                param.copy_(LORA_INIT_STD * torch.randn(param.shape, generator=generator))
    model.save_pretrained(path)
    return path


@lru_cache(maxsize=32)
def merged_model(model_dir: str, adapter_dir: str) -> torch.nn.Module:
    """PEFT's model with the adapter merged into (a copy of) the base model's weights, built once per pair."""
    from peft import PeftModel

    base = copy.deepcopy(load_hf_model(model_dir))
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().eval()


@lru_cache(maxsize=256)
def peft_greedy_reference(
    model_dir: str, adapter_dir: str | None, prompt_ids: tuple[int, ...], max_tokens: int
) -> GreedyReference:
    """Greedy tokens of the merged model (of the base model when ``adapter_dir`` is None)."""
    model = load_hf_model(model_dir) if adapter_dir is None else merged_model(model_dir, adapter_dir)
    return greedy_reference(model, prompt_ids, max_tokens)
