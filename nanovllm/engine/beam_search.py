"""Beam search over the engine, as vLLM's ``LLM.beam_search`` does it: one generate() call per step.

Each step asks every live beam for one greedy token with its top ``2 * beam_width`` logprobs;
those are the candidate extensions. A candidate ending in EOS is complete; of the others, the
``beam_width`` best by score live on. Steps re-send each beam as a prompt, and the prefix cache
finds its earlier blocks, so only the newest tokens are recomputed.

    score = cumulative_logprob / len(prompt + completion) ** length_penalty    (EOS not counted)
"""

from dataclasses import dataclass

from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.engine.lora_requests import LoRARequests, lora_requests_per_prompt
from nanovllm.engine.prompts import PromptsArg, as_prompt_list
from nanovllm.outputs import BeamSearchOutput, BeamSearchSequence
from nanovllm.sampling_params import SamplingParams


@dataclass(frozen=True)
class Beam:
    token_ids: list[int]  # the completion so far
    cumulative_logprob: float  # sum of its tokens' logprobs
    is_eos: bool = False  # it ended with an end-of-sequence token


def beam_score(beam: Beam, num_prompt_tokens: int, length_penalty: float) -> float:
    length = num_prompt_tokens + len(beam.token_ids) - (1 if beam.is_eos else 0)
    return beam.cumulative_logprob / max(length, 1) ** length_penalty


def beam_search(
    engine: LLMEngine,
    prompts: PromptsArg,
    beam_width: int,
    max_tokens: int,
    length_penalty: float = 1.0,
    ignore_eos: bool = False,
    lora_request: LoRARequests = None,
) -> list[BeamSearchOutput]:
    """The ``beam_width`` best completions of each prompt (each with its LoRA adapter, if any), best first."""
    if not isinstance(beam_width, int) or beam_width < 1:
        raise ValueError(f"beam_width must be an integer >= 1, got {beam_width!r}")
    prompt_list = as_prompt_list(prompts)
    lora_requests = lora_requests_per_prompt(lora_request, len(prompt_list))
    prompt_params = SamplingParams(max_tokens=max_tokens)
    pairs = zip(prompt_list, lora_requests, strict=True)
    prompt_ids = [engine.make_sequence(prompt, prompt_params, lora).token_ids for prompt, lora in pairs]
    live: list[list[Beam]] = [[Beam([], 0.0)] for _ in prompt_list]
    completed: list[list[Beam]] = [[] for _ in prompt_list]
    step_params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=2 * beam_width, ignore_eos=True)
    for _ in range(max_tokens):
        flat = [(p, beam) for p, beams in enumerate(live) for beam in beams]
        if not flat:
            break
        beam_prompts = [prompt_ids[p] + beam.token_ids for p, beam in flat]
        beam_loras = [lora_requests[p] for p, _ in flat]
        outputs = engine.generate(beam_prompts, step_params, use_tqdm=False, lora_request=beam_loras)
        candidates: list[list[Beam]] = [[] for _ in prompt_list]
        for (p, beam), out in zip(flat, outputs, strict=True):
            step_logprobs = out.outputs[0].logprobs
            assert step_logprobs is not None, "the step asked for logprobs"
            for token_id, logprob in step_logprobs[0].items():
                is_eos = not ignore_eos and token_id in engine.scheduler.eos_token_ids
                new = Beam(beam.token_ids + [token_id], beam.cumulative_logprob + logprob, is_eos)
                (completed[p] if is_eos else candidates[p]).append(new)
        live = [best_beams(beams, len(prompt_ids[p]), beam_width, length_penalty) for p, beams in enumerate(candidates)]
    final = [
        best_beams(completed[p] + live[p], len(ids), beam_width, length_penalty) for p, ids in enumerate(prompt_ids)
    ]
    return [_to_output(engine, beams, len(ids), length_penalty) for beams, ids in zip(final, prompt_ids, strict=True)]


def best_beams(beams: list[Beam], num_prompt_tokens: int, beam_width: int, length_penalty: float) -> list[Beam]:
    """The beam_width best beams by score, best first."""
    return sorted(beams, key=lambda b: beam_score(b, num_prompt_tokens, length_penalty), reverse=True)[:beam_width]


def _to_output(engine: LLMEngine, beams: list[Beam], num_prompt_tokens: int, length_penalty: float) -> BeamSearchOutput:
    sequences = []
    for beam in beams:
        tokenizer = engine.tokenizer
        text = "" if tokenizer is None else str(tokenizer.decode(beam.token_ids, skip_special_tokens=True))
        score = beam_score(beam, num_prompt_tokens, length_penalty)
        reason = "stop" if beam.is_eos else "length"
        sequences.append(BeamSearchSequence(beam.token_ids, beam.cumulative_logprob, score, text, reason))
    return BeamSearchOutput(sequences)
