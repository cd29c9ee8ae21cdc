"""The user-facing facade: ``LLM(model, **engine_args).generate(prompts, sampling_params)``."""

from collections.abc import Iterator
from types import TracebackType
from typing import Any

from nanovllm.config import EngineConfig
from nanovllm.engine.beam_search import beam_search
from nanovllm.engine.data_parallel import SpawnedReplicas
from nanovllm.engine.launched import LaunchedEngine
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.engine.lora_requests import LoRARequests
from nanovllm.engine.prompts import PromptsArg, SamplingParamsArg
from nanovllm.outputs import BeamSearchOutput, PrefixCacheStats, RequestOutput, StreamOutput
from nanovllm.utils.device import release_cached_gpu_memory


class LLM:
    """An offline inference engine for one model. See :class:`~nanovllm.config.EngineConfig` for the arguments."""

    def __init__(self, model: str, **engine_args: Any) -> None:
        self.config = EngineConfig.from_kwargs(model, **engine_args)
        self.engine: LLMEngine | SpawnedReplicas | LaunchedEngine | None = build_engine(self.config)

    def generate(
        self,
        prompts: PromptsArg,
        sampling_params: SamplingParamsArg = None,
        use_tqdm: bool = True,
        lora_request: LoRARequests = None,
    ) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in input order. A string or a list of token ids is one
        prompt; a list of those is several.

        ``lora_request``: one LoRARequest for every prompt, or a list aligned with them; None is the base model.
        """
        engine = self._open()
        if isinstance(engine, LLMEngine):
            return engine.generate(prompts, sampling_params, use_tqdm, lora_request)
        if lora_request is not None:
            raise ValueError("lora_request needs one engine driven from this process (data_parallel_size=1, 'mp')")
        return engine.generate(prompts, sampling_params, use_tqdm)

    def stream(
        self, prompts: PromptsArg, sampling_params: SamplingParamsArg = None, lora_request: LoRARequests = None
    ) -> Iterator[StreamOutput]:
        """Like generate, but yields each step's new tokens and text per request as they are sampled.

        A prompt's ``request_id`` is its index in ``prompts`` as a string. Breaking out of the loop
        aborts the requests still running and frees their KV cache.
        """
        return self._engine("stream").stream(prompts, sampling_params, lora_request)

    def beam_search(
        self,
        prompts: PromptsArg,
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
        engine = self._engine("beam_search")
        return beam_search(engine, prompts, beam_width, max_tokens, length_penalty, ignore_eos, lora_request)

    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Prompt tokens looked up in the prefix cache so far, and how many were found."""
        return self._engine("prefix_cache_stats").prefix_cache_stats

    def close(self) -> None:
        """Release the model and the KV cache, and stop tensor-parallel workers. Closing twice is harmless."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None
            release_cached_gpu_memory()  # the engine's tensors, freed above, back to the device

    def _open(self) -> LLMEngine | SpawnedReplicas | LaunchedEngine:
        if self.engine is None:
            raise RuntimeError("this LLM is closed")
        return self.engine

    def _engine(self, caller: str) -> LLMEngine:
        """The one engine this process drives; data parallelism and torchrun jobs offer generate() only."""
        engine = self._open()
        if not isinstance(engine, LLMEngine):
            raise ValueError(
                f"{caller}() runs on one engine driven from this process, but this LLM has data_parallel_size="
                f"{self.config.data_parallel_size} and distributed_executor_backend="
                f"{self.config.distributed_executor_backend!r}: use generate(), or data_parallel_size=1 with 'mp'"
            )
        return engine

    def __enter__(self) -> "LLM":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def build_engine(config: EngineConfig) -> LLMEngine | SpawnedReplicas | LaunchedEngine:
    """The engine the parallelism asks for: one replica driven here, replicas spawned here, or a torchrun rank."""
    if config.distributed_executor_backend == "external_launcher":
        return LaunchedEngine(config)
    if config.data_parallel_size > 1:
        return SpawnedReplicas(config)
    return LLMEngine(config)
