"""A request's sampling fields -> SamplingParams, by name, for whatever fields SamplingParams has.

Only fields the client sent are passed on. A field SamplingParams lacks is refused with a 400
naming it, unless its value means "off" (NEUTRAL_VALUES), which many clients send by default.
"""

import dataclasses
from typing import Any

from nanovllm.sampling_params import SamplingParams
from nanovllm.serving.errors import APIError
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
}


def sampling_fields(request: SamplingRequest) -> dict[str, Any]:
    """Every sampling field the client gave (declared or extra), by name."""
    given = dict(request.model_extra or {})
    given.update(
        {name: getattr(request, name) for name in request.model_fields_set if name in type(request).model_fields}
    )
    return {name: value for name, value in given.items() if name not in SERVER_FIELDS and value is not None}


def check_unsupported(request: SamplingRequest) -> None:
    """Refuse API features the server does not implement, naming the field."""
    for name in ("logprobs", "top_logprobs", "suffix", "echo"):
        value = getattr(request, name, None)
        if value is not None and value is not False:
            raise APIError(400, f"'{name}' is not supported by this server (got {value!r}); leave it out", param=name)
    if request.n < 1:
        raise APIError(400, f"n must be >= 1, got {request.n}", param="n")


def to_sampling_params(request: SamplingRequest, default_max_tokens: int, seed_offset: int = 0) -> SamplingParams:
    """SamplingParams of one choice; with a seed and n > 1, choice i uses seed + i so the choices differ."""
    fields = sampling_fields(request)
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        fields.setdefault("max_tokens", request.max_completion_tokens)
    fields.setdefault("max_tokens", default_max_tokens)
    if isinstance(fields.get("stop"), str):
        fields["stop"] = [fields["stop"]]
    if fields.get("logit_bias"):
        fields["logit_bias"] = _token_id_keys(fields["logit_bias"])
    if "seed" in fields:
        fields["seed"] += seed_offset
    known = {field.name for field in dataclasses.fields(SamplingParams)}
    for name in sorted(set(fields) - known):
        if fields[name] in NEUTRAL_VALUES.get(name, ()):
            del fields[name]
        else:
            raise APIError(
                400,
                f"'{name}' is not supported by this server's sampler (got {fields[name]!r}); supported sampling "
                f"fields: {', '.join(sorted(known))}",
                param=name,
            )
    try:
        return SamplingParams(**fields)
    except (ValueError, TypeError) as e:
        raise APIError(400, str(e)) from e


def _token_id_keys(logit_bias: dict[str, float]) -> dict[int, float]:
    """OpenAI sends logit_bias keyed by token ids as JSON strings; SamplingParams keys them by int."""
    try:
        return {int(token_id): bias for token_id, bias in logit_bias.items()}
    except ValueError as e:
        raise APIError(400, f"logit_bias keys must be token ids, got {sorted(logit_bias)[:5]}", "logit_bias") from e
