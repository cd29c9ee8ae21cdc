"""Which LoRA adapter serves a request: vLLM's ``LoRARequest``, naming a PEFT adapter directory."""

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """A PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) to run a request with.

    ``lora_int_id`` identifies the adapter in the engine: its GPU slot, its CPU cache entry and its prefix-cache
    blocks are keyed by it, so one id must always name the same directory.
    """

    lora_name: str  # a name for messages and the server's `model` field
    lora_int_id: int  # >= 1, unique per adapter directory
    lora_path: str  # the adapter directory

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"LoRARequest.lora_name must be a non-empty string, got {self.lora_name!r}")
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(
                f"LoRARequest.lora_int_id must be an integer >= 1 (0 is the base model), got {self.lora_int_id!r}"
            )
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError(f"LoRARequest.lora_path must be an adapter directory, got {self.lora_path!r}")
