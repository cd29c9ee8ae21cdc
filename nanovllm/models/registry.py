"""config.json's ``architectures`` name -> the model class that implements it."""

from nanovllm.kernels.backends import Kernels
from nanovllm.models.arch import ModelArch
from nanovllm.models.llama import LlamaForCausalLM
from nanovllm.models.quant_config import QuantConfig
from nanovllm.models.qwen2 import Qwen2ForCausalLM
from nanovllm.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,  # Mistral is LLaMA's layout; sliding window checked by the engine
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def build_model(arch: ModelArch, kernels: Kernels, quant: QuantConfig | None = None) -> LlamaForCausalLM:
    """The model of config.json's architecture; its linear layers quantized as ``quant`` says (None: not)."""
    model_cls = MODEL_REGISTRY.get(arch.architecture)
    if model_cls is None:
        raise ValueError(
            f"architecture {arch.architecture!r} from config.json is not supported; "
            f"supported: {', '.join(sorted(MODEL_REGISTRY))}"
        )
    return model_cls(arch, kernels, quant.linear_quantization(kernels.quantized_gemm) if quant else None)
