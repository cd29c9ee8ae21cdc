"""The request bodies of the OpenAI API that the server accepts, as pydantic models.

Sampling fields are all optional (None = not given) so that only what a client sent reaches
SamplingParams (see params.py). Fields beyond OpenAI's are vLLM's extensions; any other extra
field is kept (``extra="allow"``) and passed on when SamplingParams has a field of that name.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict


class StreamOptions(BaseModel):
    include_usage: bool = False  # send a last chunk with the usage counts (and no choices)


class SamplingRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="allow")

    model: str  # must be the served model's name
    stream: bool = False  # answer as Server-Sent Events, one chunk per engine step
    stream_options: StreamOptions | None = None
    n: int = 1  # completions per prompt
    user: str | None = None  # accepted and ignored
    # OpenAI sampling fields
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]  # one prompt or several, as text or token ids
    logprobs: int | None = None  # not supported: refused when given
    echo: bool = False  # not supported: refused when True
    suffix: str | None = None  # not supported: refused when given


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. "name"; the chat template may use them

    role: str
    content: str | list[TextPart] | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None  # not supported: refused when True
    top_logprobs: int | None = None  # not supported: refused when given
    add_generation_prompt: bool = True  # end the prompt with the assistant turn's header
