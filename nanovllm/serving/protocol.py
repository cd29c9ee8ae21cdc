"""The request bodies of the OpenAI API that the server accepts, as pydantic models.

Sampling fields are all optional (None = not given) so that only what a client sent reaches
SamplingParams (see params.py). Fields beyond OpenAI's are vLLM's extensions; any other extra
field is kept (``extra="allow"``) and passed on when SamplingParams has a field of that name.

Scalars are strict: pydantic's default would read ``"max_tokens": true`` as 1, ``"stream": "yes"`` as
true and ``"temperature": "0.5"`` as 0.5. A JSON integer is still a valid float.
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, StrictBool, StrictFloat, StrictInt

# OpenAI's chat roles ("function" is its deprecated form of "tool", not accepted).
ChatRole = Literal["system", "developer", "user", "assistant", "tool"]
PROMPT_SHAPES = "a string, a list of token ids (integers, not booleans), or a non-empty list of strings or of id lists"


def is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_token_ids(value: object) -> bool:
    return isinstance(value, list) and all(is_token_id(item) for item in value)


def _check_prompt(value: Any) -> Any:
    """One of PROMPT_SHAPES; otherwise a ValueError that names the first item out of shape."""
    if isinstance(value, str) or (isinstance(value, list) and value and _is_token_ids(value)):
        return value
    if not isinstance(value, list) or not value:
        raise ValueError(f"must be {PROMPT_SHAPES}, got {str(value)[:40]}")
    is_like_first = (lambda item: isinstance(item, str)) if isinstance(value[0], str) else _is_token_ids
    for idx, item in enumerate(value):
        if not is_like_first(item):
            raise ValueError(f"prompt[{idx}] is {str(item)[:40]}; the prompt must be {PROMPT_SHAPES}")
    return value


class StreamOptions(BaseModel):
    include_usage: StrictBool = False  # send a last chunk with the usage counts (and no choices)


class SamplingRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="allow")

    model: str  # must be the served model's name
    stream: StrictBool = False  # answer as Server-Sent Events, one chunk per engine step
    stream_options: StreamOptions | None = None
    n: StrictInt = 1  # completions per prompt
    user: str | None = None  # accepted and ignored
    # OpenAI sampling fields
    max_tokens: StrictInt | None = None
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    logit_bias: dict[str, StrictFloat] | None = None
    # vLLM's extensions
    top_k: StrictInt | None = None
    min_p: StrictFloat | None = None
    repetition_penalty: StrictFloat | None = None
    min_tokens: StrictInt | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: StrictBool | None = None
    skip_special_tokens: StrictBool | None = None
    include_stop_str_in_output: StrictBool | None = None


class CompletionRequest(SamplingRequest):
    # One prompt or several, as text or token ids (checked by _check_prompt before the types are applied).
    prompt: Annotated[str | list[int] | list[str] | list[list[int]], BeforeValidator(_check_prompt)]
    logprobs: StrictInt | None = None  # not supported: refused when given
    echo: StrictBool = False  # not supported: refused when True
    suffix: str | None = None  # not supported: refused when given


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. "name"; the chat template may use them

    role: ChatRole
    content: str | list[TextPart]  # required, and not null: the server supports no tool calls


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = None  # OpenAI's newer name for max_tokens
    logprobs: StrictBool | None = None  # not supported: refused when True
    top_logprobs: StrictInt | None = None  # not supported: refused when given (0 = off)
    add_generation_prompt: StrictBool = True  # end the prompt with the assistant turn's header
