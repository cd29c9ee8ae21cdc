"""What generate(), stream() and beam_search() accept as prompts and sampling settings, as vLLM does.

    "Hello"                  one prompt (text)
    [1, 2, 3]                one prompt (token ids)
    ["Hello", [1, 2, 3]]     two prompts
    []                       no prompt

Anything else (a numpy array, a tensor, a dict, None) is a TypeError that names the type and the fix.
"""

from collections.abc import Sequence as SequenceLike

from nanovllm.sampling_params import SamplingParams

Prompt = str | list[int]
PromptsArg = Prompt | SequenceLike[Prompt]
SamplingParamsArg = SamplingParams | SequenceLike[SamplingParams] | None


def as_prompt_list(prompts: object) -> list[Prompt]:
    """The prompts as a list: a bare string or a bare list of token ids is one prompt."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, list | tuple):
        raise TypeError(
            f"prompts must be a str, a list of token ids, or a list of those, got {type(prompts).__name__}"
            + ("; convert it with .tolist()" if hasattr(prompts, "tolist") else "")
        )
    if prompts and all(_is_token_id(token) for token in prompts):
        return [list(prompts)]
    return [_checked_prompt(index, prompt) for index, prompt in enumerate(prompts)]


def _checked_prompt(index: int, prompt: object) -> Prompt:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list | tuple) and all(_is_token_id(token) for token in prompt):
        return list(prompt)
    if isinstance(prompt, list | tuple):
        bad = next(token for token in prompt if not _is_token_id(token))
        raise TypeError(f"prompt {index}: token ids must be ints, got {bad!r} ({type(bad).__name__})")
    fix = "; convert it with .tolist()" if hasattr(prompt, "tolist") else ""
    raise TypeError(f"prompt {index} must be a str or a list of int token ids, got {type(prompt).__name__}{fix}")


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def as_params_list(sampling_params: object, num_prompts: int) -> list[SamplingParams]:
    """One SamplingParams per prompt: None means the defaults, one is shared, a list must align with the prompts."""
    if sampling_params is None:
        return [SamplingParams()] * num_prompts
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * num_prompts
    if not isinstance(sampling_params, list | tuple):
        hint = "; build one with SamplingParams(**your_dict)" if isinstance(sampling_params, dict) else ""
        raise TypeError(
            f"sampling_params must be a SamplingParams or a list of them, got {type(sampling_params).__name__}{hint}"
        )
    for index, params in enumerate(sampling_params):
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params[{index}] must be a SamplingParams, got {type(params).__name__}")
    if len(sampling_params) != num_prompts:
        raise ValueError(f"got {num_prompts} prompts but {len(sampling_params)} SamplingParams; give one or one each")
    return list(sampling_params)
