"""What the engine hands back: a whole completion per prompt, or what one step added to a request."""

from dataclasses import dataclass
from typing import Any

TokenLogprobs = dict[int, float]  # token id -> logprob from the raw logits: the top-N plus the sampled token


@dataclass(frozen=True)
class CompletionOutput:
    """One of a request's n completions (vLLM's CompletionOutput)."""

    index: int  # which of the n completions, 0..n-1
    text: str  # the completion's text, cut before a matched stop string unless include_stop_str_in_output
    token_ids: list[int]  # the completion's tokens (a stop string's tokens stay here even when cut from text)
    cumulative_logprob: float | None  # sum of the sampled tokens' logprobs; None unless logprobs was set
    logprobs: list[TokenLogprobs] | None  # per generated token; None unless logprobs was set
    finish_reason: str  # "stop" (EOS, stop token or stop string), "length" or "abort"
    stop_reason: int | str | None  # the stop token id or stop string that ended it; None for EOS or length


@dataclass(frozen=True)
class RequestOutput:
    """One prompt's completions. ``token_ids``, ``text`` and ``finish_reason`` are the first completion's,
    and ``out["text"]`` and ``out["token_ids"]`` work as in nano-vllm."""

    index: int  # position of the prompt in the list given to generate()
    request_id: str  # the engine's id for the request
    prompt_token_ids: list[int]  # the prompt, tokenized
    outputs: list[CompletionOutput]  # all n completions, by index

    @property
    def token_ids(self) -> list[int]:
        """The first completion's tokens, without the prompt."""
        return self.outputs[0].token_ids

    @property
    def text(self) -> str:
        """The first completion, decoded without special tokens ("" with skip_tokenizer_init)."""
        return self.outputs[0].text

    @property
    def finish_reason(self) -> str:
        """The first completion's: "stop" (EOS, stop token or stop string), "length" or "abort"."""
        return self.outputs[0].finish_reason

    def __getitem__(self, key: str) -> Any:
        keys = [*self.__dataclass_fields__, "token_ids", "text", "finish_reason"]
        if key not in keys:
            raise KeyError(f"{key!r}; RequestOutput has {sorted(keys)}")
        return getattr(self, key)


@dataclass(slots=True)  # not frozen: one is built per row of every step, and frozen construction costs 4x
class StreamOutput:
    """What one engine step added to one request; a stream's deltas concatenate to its completion."""

    request_id: str  # the id add_request returned (LLM.stream: the prompt's index, as a string)
    new_token_ids: list[int]  # tokens sampled this step
    text_delta: str  # text those tokens completed; a split multi-byte character waits for its last token
    finished: bool  # no more outputs follow for this request
    finish_reason: str | None  # "stop", "length" or "abort" once finished, else None
    sample_index: int = 0  # which of the request's n completions these tokens extend (finished is per completion)
    logprobs: list[TokenLogprobs] | None = None  # per new token, when the request asked for logprobs
    stop_reason: int | str | None = None  # once finished: the stop token id or stop string; None for EOS or length

    def __reduce__(self) -> tuple[type["StreamOutput"], tuple[Any, ...]]:
        """Pickle as the constructor's arguments: the engine process sends one per row of every step, and
        this takes 40% of the time of the default (the slots' names and values, object by object)."""
        return StreamOutput, (
            self.request_id, self.new_token_ids, self.text_delta, self.finished, self.finish_reason,
            self.sample_index, self.logprobs, self.stop_reason,
        )  # fmt: skip


@dataclass(frozen=True)
class BeamSearchSequence:
    """One finished beam (vLLM's BeamSearchSequence, with the completion apart from the prompt)."""

    token_ids: list[int]  # the completion's tokens, without the prompt
    cumulative_logprob: float  # sum of the tokens' logprobs under the model
    score: float  # cumulative_logprob / len(prompt + completion) ** length_penalty (EOS not counted)
    text: str  # the completion, decoded ("" with skip_tokenizer_init)
    finish_reason: str  # "stop" (ended by EOS) or "length" (max_tokens reached)


@dataclass(frozen=True)
class BeamSearchOutput:
    """The best beams of one prompt, best score first."""

    sequences: list[BeamSearchSequence]


@dataclass
class PrefixCacheStats:
    """Prompt tokens looked up in the prefix cache so far, and how many were found (kept by the block manager)."""

    num_queried_tokens: int = 0  # prompt tokens looked up in the prefix cache
    num_hit_tokens: int = 0  # of those, tokens whose KV was found cached

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0
