"""A request's sampling fields -> SamplingParams, by name, for whatever fields SamplingParams has.

Only fields the client sent are passed on. A field SamplingParams lacks is refused with a 400
naming it, unless its value means "off" (NEUTRAL_VALUES), which many clients send by default.
"""

import dataclasses
import re
from typing import Any

from nanovllm.sampling_params import SamplingParams
from nanovllm.serving.errors import APIError, quoted
from nanovllm.serving.protocol import ChatCompletionRequest, SamplingRequest

# Request fields the server itself handles; they never reach SamplingParams.
SERVER_FIELDS = frozenset(
    {"model", "prompt", "messages", "stream", "stream_options", "n", "user", "echo", "suffix", "max_completion_tokens"}
    | {"logprobs", "top_logprobs", "add_generation_prompt"}
)
# Values that leave sampling unchanged: sending them to an engine without the feature is harmless.
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "top_p": (1.0,),
    "top_k": (-1, 0),
    "min_p": (0.0,),
    "presence_penalty": (0.0,),
    "frequency_penalty": (0.0,),
    "repetition_penalty": (1.0,),
    "min_tokens": (0,),
    "logit_bias": ({},),
    "stop": ([], ""),
    "stop_token_ids": ([],),
    "skip_special_tokens": (True,),
    "include_stop_str_in_output": (False,),
    # vLLM's fields of features this server lacks (README: an "off" value is accepted)
    "best_of": (1,),
    "use_beam_search": (False,),
    "length_penalty": (1.0,),
}
# The "off" values of the API features check_unsupported refuses (None, not given, always passes).
UNSUPPORTED_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "logprobs": (False,),  # chat's boolean; the completions API's integer has no "off" but null
    "top_logprobs": (0,),
    "suffix": ("",),
    "echo": (False,),
}


def sampling_fields(request: SamplingRequest) -> dict[str, Any]:
    """Every sampling field the client gave (declared or extra), by name."""
    given = dict(request.model_extra or {})
    given.update(
        {name: getattr(request, name) for name in request.model_fields_set if name in type(request).model_fields}
    )
    return {name: value for name, value in given.items() if name not in SERVER_FIELDS and value is not None}


def check_unsupported(request: SamplingRequest) -> None:
    """Refuse API features the server does not implement, naming the field; their "off" values pass."""
    for name in ("logprobs", "top_logprobs", "suffix", "echo"):
        value = getattr(request, name, None)
        if value is not None and not is_neutral(value, UNSUPPORTED_OFF_VALUES[name]):
            raise APIError(400, f"'{name}' is not supported by this server (got {quoted(value)}); leave it out", name)


def check_n(request: SamplingRequest, max_n: int) -> None:
    if not 1 <= request.n <= max_n:
        message = f"n must be in [1, {max_n}] (this server's --max-n), got {request.n}; set n within it"
        raise APIError(400, message, param="n")


def check_fits_kv_cache(num_prompt_tokens: int, n: int, max_tokens: int, num_kvcache_tokens: int) -> None:
    """A 400 when a prompt's n completions could never be in the KV cache at once (their prompt shared once)."""
    num_tokens = num_prompt_tokens + n * max_tokens
    if n > 1 and num_tokens > num_kvcache_tokens:
        message = (
            f"n={n} completions of up to max_tokens={max_tokens} tokens after a {num_prompt_tokens}-token prompt "
            f"need {num_tokens} tokens of KV cache at once, but it holds {num_kvcache_tokens}; lower n or max_tokens"
        )
        raise APIError(400, message, param="n")


def to_sampling_params(request: SamplingRequest, default_max_tokens: int) -> SamplingParams:
    """The SamplingParams of the request's prompt, with its ``n``: the library's rules (n > 1 needs
    temperature > 0, as vLLM's) apply. The server runs each choice as a request of its own (``one_choice``)."""
    fields = sampling_fields(request)
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        fields.setdefault("max_tokens", request.max_completion_tokens)
    fields.setdefault("max_tokens", default_max_tokens)
    if isinstance(fields.get("stop"), str):
        fields["stop"] = [fields["stop"]]
    if fields.get("logit_bias"):
        fields["logit_bias"] = _token_id_keys(fields["logit_bias"])
    known = {field.name for field in dataclasses.fields(SamplingParams)}
    for name in sorted(set(fields) - known):
        if is_neutral(fields[name], NEUTRAL_VALUES.get(name, ())):
            del fields[name]
        else:
            raise APIError(
                400,
                f"'{name}' is not supported by this server's sampler (got {quoted(fields[name])}); supported sampling "
                f"fields: {', '.join(sorted(known))}",
                param=name,
            )
    try:
        return SamplingParams(**fields, n=request.n)
    except (ValueError, TypeError) as e:
        raise APIError(400, str(e), param=_field_named(str(e))) from e


def one_choice(params: SamplingParams, choice_idx: int) -> SamplingParams:
    """Choice ``choice_idx`` of a prompt as a request of its own (n = 1); with a seed, choice i uses seed + i so
    that the choices differ."""
    seed = None if params.seed is None else params.seed + choice_idx
    return dataclasses.replace(params, n=1, seed=seed)


def is_neutral(value: Any, neutral_values: tuple[Any, ...]) -> bool:
    """Whether ``value`` is one of ``neutral_values``, a boolean only equal to a boolean (True == 1 in Python)."""
    return any(isinstance(value, bool) == isinstance(neutral, bool) and value == neutral for neutral in neutral_values)


def _field_named(message: str) -> str | None:
    """The field a SamplingParams error names ("SamplingParams.top_p must be ..." -> "top_p")."""
    match = re.search(r"SamplingParams\.(\w+)", message)
    return match.group(1) if match else None


def _token_id_keys(logit_bias: dict[str, float]) -> dict[int, float]:
    """OpenAI sends logit_bias keyed by token ids as JSON strings; SamplingParams keys them by int."""
    try:
        return {int(token_id): bias for token_id, bias in logit_bias.items()}
    except ValueError as e:
        raise APIError(400, f"logit_bias keys must be token ids, got {sorted(logit_bias)[:5]}", "logit_bias") from e
