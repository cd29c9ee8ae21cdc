"""The user-facing facade: ``LLM(model, **engine_args).generate(prompts, sampling_params)``."""

from collections.abc import Iterator
from collections.abc import Sequence as SequenceLike
from types import TracebackType
from typing import Any

from nanovllm.config import EngineConfig
from nanovllm.engine.beam_search import beam_search
from nanovllm.engine.llm_engine import LLMEngine, Prompt
from nanovllm.engine.lora_requests import LoRARequests
from nanovllm.outputs import BeamSearchOutput, PrefixCacheStats, RequestOutput, StreamOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.device import release_cached_gpu_memory


class LLM:
    """An offline inference engine for one model. See :class:`~nanovllm.config.EngineConfig` for the arguments."""

    def __init__(self, model: str, **engine_args: Any) -> None:
        self.config = EngineConfig.from_kwargs(model, **engine_args)
        self.engine: LLMEngine | None = LLMEngine(self.config)

    def generate(
        self,
        prompts: SequenceLike[Prompt],
        sampling_params: SamplingParams | SequenceLike[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequests = None,
    ) -> list[RequestOutput]:
        """Complete every prompt (a string or a list of token ids); outputs come back in input order.

        ``lora_request``: one LoRARequest for every prompt, or a list aligned with them; None is the base model.
        """
        return self._engine().generate(prompts, sampling_params or SamplingParams(), use_tqdm, lora_request)

    def stream(
        self,
        prompts: SequenceLike[Prompt],
        sampling_params: SamplingParams | SequenceLike[SamplingParams] | None = None,
        lora_request: LoRARequests = None,
    ) -> Iterator[StreamOutput]:
        """Like generate, but yields each step's new tokens and text per request as they are sampled.

        A prompt's ``request_id`` is its index in ``prompts`` as a string. Breaking out of the loop
        aborts the requests still running and frees their KV cache.
        """
        return self._engine().stream(prompts, sampling_params or SamplingParams(), lora_request)

    def beam_search(
        self,
        prompts: SequenceLike[Prompt],
        beam_width: int,
        max_tokens: int,
        length_penalty: float = 1.0,
        ignore_eos: bool = False,
        lora_request: LoRARequests = None,
    ) -> list[BeamSearchOutput]:
        """The ``beam_width`` most likely completions of each prompt (vLLM's beam search), best score first.

        Scores are cumulative logprob / len(prompt + completion) ** length_penalty; a beam ends at EOS
        (unless ignore_eos) or after max_tokens tokens.
        """
        engine = self._engine()
        return beam_search(engine, list(prompts), beam_width, max_tokens, length_penalty, ignore_eos, lora_request)

    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Prompt tokens looked up in the prefix cache so far, and how many were found."""
        return self._engine().prefix_cache_stats

    def close(self) -> None:
        """Release the model and the KV cache, and stop tensor-parallel workers. Closing twice is harmless."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None
            release_cached_gpu_memory()  # the engine's tensors, freed above, back to the device

    def _engine(self) -> LLMEngine:
        if self.engine is None:
            raise RuntimeError("this LLM is closed")
        return self.engine

    def __enter__(self) -> "LLM":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
