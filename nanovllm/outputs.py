"""What ``LLM.generate`` returns for each prompt."""

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RequestOutput:
    """One prompt's completion. ``out["text"]`` and ``out["token_ids"]`` work as in nano-vllm."""

    index: int  # position of the prompt in the list given to generate()
    prompt_token_ids: list[int]  # the prompt, tokenized
    token_ids: list[int]  # the completion only, without the prompt
    text: str  # the completion, decoded without special tokens ("" with skip_tokenizer_init)
    finish_reason: str  # "stop" (an end-of-sequence token) or "length" (max_tokens reached)

    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:
            raise KeyError(f"{key!r}; RequestOutput has {sorted(self.__dataclass_fields__)}")
        return getattr(self, key)
