"""How much one API call may ask of the server: flags of `nanovllm serve`, checked once."""

from dataclasses import dataclass

# OpenAI's own limit on n (chat completions); each choice is an engine request.
DEFAULT_MAX_N = 128
# A 128k-token prompt is about 1 MB as JSON token ids or as text: 16 MiB leaves room for a batch of prompts
# while a body's JSON parsing stays within tens of milliseconds.
DEFAULT_MAX_REQUEST_BODY_BYTES = 16 << 20


@dataclass(frozen=True)
class ServerLimits:
    """Per-request limits of the HTTP server (the engine's own limits, max_model_len and the KV cache, apply too)."""

    max_n: int = DEFAULT_MAX_N  # most completions per prompt (`n`); more is a 400
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES  # largest request body; more is a 413

    def __post_init__(self) -> None:
        for name in ("max_n", "max_request_body_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ServerLimits.{name} must be a positive integer, got {value!r}")
