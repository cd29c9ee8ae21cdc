"""How to sample one request's completion: field names, defaults and ranges follow vLLM's ``SamplingParams``."""

import math
from dataclasses import dataclass

MAX_ABS_PENALTY = 2.0  # presence/frequency penalties live in [-2, 2], as in vLLM and the OpenAI API
MAX_ABS_LOGIT_BIAS = 100.0  # the OpenAI API's limit on one logit_bias value


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings for one request, validated when built (a bad value is a ValueError naming the field).

    The logits of each step go through, in order: ``logit_bias`` and ``min_tokens`` masking, the three
    penalties, ``temperature``, ``min_p``, ``top_k`` and ``top_p``, then the draw. ``temperature=0`` is
    greedy decoding: the most likely token after bias and penalties.
    """

    n: int = 1  # completions returned for the prompt; they share the prompt's KV blocks
    temperature: float = 1.0  # softmax temperature; 0 = greedy
    top_p: float = 1.0  # keep the most likely tokens whose probabilities sum to top_p, in (0, 1]; 1 = off
    top_k: int = 0  # keep the top_k most likely tokens; 0 or -1 = off
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one, in [0, 1]; 0 = off
    presence_penalty: float = 0.0  # subtracted from the logit of every token already in the output, in [-2, 2]
    frequency_penalty: float = 0.0  # times the token's count in the output, subtracted from its logit, in [-2, 2]
    repetition_penalty: float = 1.0  # > 0; divides positive, multiplies negative logits of prompt+output tokens
    seed: int | None = None  # same seed -> same tokens, whatever else runs in the batch; None = engine's stream
    stop: str | list[str] | None = None  # strings that end the completion when they appear in its text
    stop_token_ids: list[int] | None = None  # tokens that end the completion (besides EOS)
    include_stop_str_in_output: bool = False  # keep the matched stop string at the end of the text
    ignore_eos: bool = False  # keep generating after an end-of-sequence token
    max_tokens: int = 64  # most tokens to generate (nano-vllm's default)
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens were generated
    logprobs: int | None = None  # return the top-N logprobs of each generated token plus the sampled one's
    logit_bias: dict[int, float] | None = None  # token id -> value added to its logit, each in [-100, 100]
    skip_special_tokens: bool = True  # leave special tokens out of the output text

    def __post_init__(self) -> None:
        _check_int("n", self.n, minimum=1)
        _check_float("temperature", self.temperature, 0.0, math.inf, "0 = greedy")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        _check_int("top_k", self.top_k, minimum=-1)
        _check_float("min_p", self.min_p, 0.0, 1.0, "0 = off")
        _check_float("presence_penalty", self.presence_penalty, -MAX_ABS_PENALTY, MAX_ABS_PENALTY, "0 = off")
        _check_float("frequency_penalty", self.frequency_penalty, -MAX_ABS_PENALTY, MAX_ABS_PENALTY, "0 = off")
        if not (isinstance(self.repetition_penalty, int | float) and 0.0 < self.repetition_penalty < math.inf):
            raise ValueError(
                f"SamplingParams.repetition_penalty must be a number > 0 (1 = off), got {self.repetition_penalty!r}"
            )
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=None)
        _check_int("max_tokens", self.max_tokens, minimum=1)
        _check_int("min_tokens", self.min_tokens, minimum=0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"SamplingParams.min_tokens={self.min_tokens} exceeds max_tokens={self.max_tokens}; lower min_tokens"
            )
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, minimum=0)
        self._check_stop()
        self._check_logit_bias()
        if self.n > 1 and self.temperature == 0.0:
            raise ValueError(
                f"SamplingParams.n={self.n} with temperature=0 would return {self.n} identical greedy completions; "
                "set temperature > 0 or n=1"
            )

    def _check_stop(self) -> None:
        if not (self.stop is None or isinstance(self.stop, str | list)):
            raise ValueError(f"SamplingParams.stop must be a str, a list of str or None, got {self.stop!r}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"SamplingParams.stop must hold non-empty strings, got {self.stop!r}")
        if self.stop_token_ids is not None and (
            not isinstance(self.stop_token_ids, list)
            or any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in self.stop_token_ids)
        ):
            raise ValueError(
                f"SamplingParams.stop_token_ids must be a list of token ids >= 0, got {self.stop_token_ids!r}"
            )

    def _check_logit_bias(self) -> None:
        if self.logit_bias is None:
            return
        if not isinstance(self.logit_bias, dict):
            raise ValueError(f"SamplingParams.logit_bias must be a dict token id -> bias, got {self.logit_bias!r}")
        for token_id, bias in self.logit_bias.items():
            if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
                raise ValueError(f"SamplingParams.logit_bias keys must be token ids >= 0, got {token_id!r}")
            _check_float(f"logit_bias[{token_id}]", bias, -MAX_ABS_LOGIT_BIAS, MAX_ABS_LOGIT_BIAS, "0 = off")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """``stop`` as a tuple (a single string becomes a one-element tuple)."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def top_k_or_none(self) -> int | None:
        """``top_k`` when it limits anything, else None (0 and -1 both mean off)."""
        return self.top_k if self.top_k > 0 else None

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


def _check_int(name: str, value: object, minimum: int | None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum):
        limit = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise ValueError(f"SamplingParams.{name} must be {limit}, got {value!r}")


def _check_float(name: str, value: object, low: float, high: float, meaning: str) -> None:
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not is_number or not low <= float(value) <= high:  # type: ignore[arg-type]
        raise ValueError(f"SamplingParams.{name} must be in [{low}, {high}] ({meaning}), got {value!r}")
