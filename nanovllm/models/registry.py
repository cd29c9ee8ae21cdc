"""config.json's ``architectures`` name -> the model class that implements it.

Adding a family is one model file and one line here (docs/adding_a_model.md).
"""

import os
from typing import Any

from nanovllm.kernels.backends import Kernels
from nanovllm.models.arch import ModelArch, read_config_json
from nanovllm.models.gemma3 import Gemma3ForCausalLM
from nanovllm.models.gpt2 import GPT2LMHeadModel
from nanovllm.models.llama import LlamaForCausalLM
from nanovllm.models.mixtral import MixtralForCausalLM
from nanovllm.models.phi import PhiForCausalLM
from nanovllm.models.phi3 import Phi3ForCausalLM
from nanovllm.models.quant_config import QuantConfig
from nanovllm.models.qwen2 import Qwen2ForCausalLM
from nanovllm.models.qwen3 import Qwen3ForCausalLM
from nanovllm.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[LlamaForCausalLM]] = {
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,  # Mistral is LLaMA's layout; its sliding window is config.json's
    "MixtralForCausalLM": MixtralForCausalLM,
    "PhiForCausalLM": PhiForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}


def model_class(config: dict[str, Any]) -> type[LlamaForCausalLM]:
    """The class of config.json's architecture; an error naming it (and its model_type) and the supported ones."""
    architectures = config.get("architectures") or [None]
    model_cls = MODEL_REGISTRY.get(architectures[0])
    if model_cls is None:
        raise ValueError(
            f"architecture {architectures[0]!r} (model_type {config.get('model_type')!r}) from config.json is not "
            f"supported; supported: {', '.join(sorted(MODEL_REGISTRY))}"
        )
    return model_cls


def load_model_arch(model_dir: str) -> ModelArch:
    """The model's shape from its config.json, read the way its family spells it; every unsupported
    architecture, activation, rope type or option is refused here, before any weight loads."""
    config = read_config_json(model_dir)
    try:
        return model_class(config).read_arch(config)
    except KeyError as e:
        raise ValueError(f"{os.path.join(model_dir, 'config.json')} lacks the field {e}, which the model needs") from e


def build_model(arch: ModelArch, kernels: Kernels, quant: QuantConfig | None = None) -> LlamaForCausalLM:
    """The model of config.json's architecture; its linear layers quantized as ``quant`` says (None: not)."""
    model_cls = model_class({"architectures": [arch.architecture]})
    return model_cls(arch, kernels, quant.linear_quantization(kernels.quantized_gemm) if quant else None)
