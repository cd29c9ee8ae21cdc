"""What the engine hands back: a whole completion per prompt, or what one step added to a request."""

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RequestOutput:
    """One prompt's completion. ``out["text"]`` and ``out["token_ids"]`` work as in nano-vllm."""

    index: int  # position of the prompt in the list given to generate()
    request_id: str  # the engine's id for the request
    prompt_token_ids: list[int]  # the prompt, tokenized
    token_ids: list[int]  # the completion only, without the prompt
    text: str  # the completion, decoded without special tokens ("" with skip_tokenizer_init)
    finish_reason: str  # "stop" (an end-of-sequence token) or "length" (max_tokens reached)

    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:
            raise KeyError(f"{key!r}; RequestOutput has {sorted(self.__dataclass_fields__)}")
        return getattr(self, key)


@dataclass(frozen=True)
class StreamOutput:
    """What one engine step added to one request; a stream's deltas concatenate to its completion."""

    request_id: str  # the id add_request returned (LLM.stream: the prompt's index, as a string)
    new_token_ids: list[int]  # tokens sampled this step
    text_delta: str  # text those tokens completed; a split multi-byte character waits for its last token
    finished: bool  # no more outputs follow for this request
    finish_reason: str | None  # "stop", "length" or "abort" once finished, else None
