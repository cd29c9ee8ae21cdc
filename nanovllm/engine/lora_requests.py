"""Requests' LoRA adapters as the engine takes them: one for every prompt or one each, each checked on arrival."""

from collections.abc import Sequence as SequenceLike

from nanovllm.lora.adapter import load_adapter
from nanovllm.lora.manager import LoRAManager
from nanovllm.lora_request import LoRARequest
from nanovllm.models.registry import load_model_arch

LoRARequests = LoRARequest | SequenceLike[LoRARequest | None] | None  # one for every prompt (None: base), or one each


def lora_requests_per_prompt(lora_request: LoRARequests, num_prompts: int) -> list[LoRARequest | None]:
    """The adapter of each prompt: ``lora_request`` for all of them, or its entries when it is a list."""
    if lora_request is None or isinstance(lora_request, LoRARequest):
        return [lora_request] * num_prompts
    if len(lora_request) != num_prompts:
        raise ValueError(
            f"got {num_prompts} prompts but {len(lora_request)} lora_requests; give one, None, or one per prompt"
        )
    return list(lora_request)


def check_lora_request(manager: LoRAManager | None, lora_request: LoRARequest | None) -> None:
    """A request's adapter must be a LoRARequest, for an engine built with enable_lora (its runner's ``manager``),
    naming a readable PEFT directory that fits the model and max_lora_rank (read now, into the host cache)."""
    if lora_request is None:
        return
    if not isinstance(lora_request, LoRARequest):
        raise TypeError(f"lora_request must be a LoRARequest or None, got {type(lora_request).__name__}")
    if manager is None:
        raise ValueError(
            f"lora_request {lora_request.lora_name!r} was given but the engine runs without LoRA; build it with "
            "enable_lora=True"
        )
    manager.check(lora_request)


def check_adapters(model_dir: str, max_lora_rank: int, lora_requests: SequenceLike[LoRARequest]) -> None:
    """Read and check adapters against a model without an engine (the server does, before it starts one)."""
    if lora_requests:
        arch = load_model_arch(model_dir)
        for lora_request in lora_requests:
            load_adapter(lora_request, arch, max_lora_rank)
