"""A request as the engine tracks it: its tokens, how far its KV cache is computed, and its blocks."""

import itertools
from enum import Enum, auto

from nanovllm.lora_request import LoRARequest
from nanovllm.sampling_params import SamplingParams

_SEQ_IDS = itertools.count()  # a process-wide unique id per Sequence, for per-sequence device state


class SequenceStatus(Enum):
    WAITING = auto()  # queued for prefill (new, mid-chunked-prefill, or preempted)
    RUNNING = auto()  # prompt fully prefilled; decoding one token per step
    FINISHED = auto()  # stopped by EOS or max_tokens, or aborted; its blocks are freed


# The member is_finished compares with: read from the class it costs more than the rest of that check (Python 3.11
# looks Enum members up through a descriptor), and the check runs several times per row of every step.
_FINISHED = SequenceStatus.FINISHED


class Sequence:
    """One request: prompt plus the tokens generated so far.

    The engine computes a sequence's KV cache left to right. ``num_computed_tokens`` says how far:
    tokens before it have their K/V in the cache, tokens from it on still need a forward pass.

        token_ids:  | p0 p1 p2 p3 p4 | o0 o1 |
                                          ^ num_computed_tokens = 6 while decoding:
                                            o1 was just sampled, its K/V comes next step.

    When the engine schedules a step while the one before still runs, the token that step samples is
    on the device only: ``num_pending_tokens`` counts it (0 or 1) after ``token_ids``, whose values the
    host has. The sequence is then ``num_tokens`` = len(token_ids) + num_pending_tokens long.
    """

    # Fixed attributes: the scheduler reads several of them for every row of every step, and slots make
    # those reads faster (and a misspelt assignment an error).
    __slots__ = (
        "seq_id", "sample_index", "token_ids", "num_pending_tokens", "num_prompt_tokens", "params", "status",
        "num_computed_tokens", "num_cached_tokens", "block_table", "block_hashes", "finish_reason", "stop_reason",
        "cumulative_logprob", "output_logprobs", "lora_request",
    )  # fmt: skip

    def __init__(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        sample_index: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> None:
        self.seq_id = next(_SEQ_IDS)  # unique in this process: keys the engine's requests, device state, TP copies
        self.sample_index = sample_index  # which of the request's n completions this is
        self.token_ids = list(prompt_token_ids)  # prompt followed by the generated tokens the host has
        self.num_pending_tokens = 0  # tokens sampled after token_ids whose values are still on the device
        self.num_prompt_tokens = len(prompt_token_ids)  # tokens of the prompt
        self.params = params
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose K/V is in the cache
        self.num_cached_tokens = 0  # of those, tokens found in the prefix cache rather than computed
        self.block_table: list[int] = []  # cache block ids, in order of the tokens they hold
        self.block_hashes: list[int] = []  # chained hash of each full block already registered or matched
        self.finish_reason: str | None = None  # "stop" (EOS), "length" (max_tokens) or "abort"
        self.stop_reason: int | str | None = None  # the stop token id or stop string that ended it; None for EOS
        self.cumulative_logprob = 0.0  # sum of the sampled tokens' logprobs (kept when logprobs were asked)
        self.output_logprobs: list[dict[int, float]] = []  # per output token: top-N + sampled, when asked
        self.lora_request = lora_request  # the LoRA adapter it runs with; None = the base model

    def __len__(self) -> int:
        return self.num_tokens

    @property
    def num_tokens(self) -> int:
        """Prompt and generated tokens, pending ones included."""
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens, pending ones included."""
        return self.num_tokens - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        """The generated tokens the host has."""
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is _FINISHED

    def record_logprobs(self, logprob: float | None, top_logprobs: dict[int, float] | None) -> None:
        """Add the newest token's logprobs (when they were asked for)."""
        if logprob is not None and top_logprobs is not None:
            self.cumulative_logprob += logprob
            self.output_logprobs.append(top_logprobs)

    def num_blocks_needed(self, block_size: int) -> int:
        """Blocks that hold every token of the sequence so far."""
        return (self.num_tokens + block_size - 1) // block_size

    def block_token_ids(self, block_idx: int, block_size: int) -> list[int]:
        return self.token_ids[block_idx * block_size : (block_idx + 1) * block_size]
