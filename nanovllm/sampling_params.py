"""How to sample one request's completion."""

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings for one request, validated when built.

    ``temperature=0`` means greedy decoding (always the most likely token).
    """

    temperature: float = 1.0  # softmax temperature; 0 = greedy
    max_tokens: int = 64  # most tokens to generate
    ignore_eos: bool = False  # keep generating after an end-of-sequence token

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be an integer >= 1, got {self.max_tokens!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0
