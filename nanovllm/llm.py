"""The user-facing facade: ``LLM(model, **engine_args).generate(prompts, sampling_params)``."""

from collections.abc import Sequence as SequenceLike
from types import TracebackType
from typing import Any

from nanovllm.config import EngineConfig
from nanovllm.engine.block_manager import PrefixCacheStats
from nanovllm.engine.llm_engine import LLMEngine, Prompt
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams


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
    ) -> list[RequestOutput]:
        """Complete every prompt (a string or a list of token ids); outputs come back in input order."""
        return self._engine().generate(prompts, sampling_params or SamplingParams(), use_tqdm)

    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Prompt tokens looked up in the prefix cache so far, and how many were found."""
        return self._engine().prefix_cache_stats

    def close(self) -> None:
        """Release the model and the KV cache, and stop tensor-parallel workers. Closing twice is harmless."""
        if self.engine is not None:
            self.engine.close()
        self.engine = None

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
