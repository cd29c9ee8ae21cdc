"""A request as the engine tracks it: its tokens, how far its KV cache is computed, and its blocks."""

import itertools
from enum import Enum, auto

from nanovllm.sampling_params import SamplingParams

_next_seq_id = itertools.count()  # engine-independent, so ids never repeat within a process


class SequenceStatus(Enum):
    WAITING = auto()  # queued for prefill (new, mid-chunked-prefill, or preempted)
    RUNNING = auto()  # prompt fully prefilled; decoding one token per step
    FINISHED = auto()  # stopped by EOS or max_tokens; its blocks are freed


class Sequence:
    """One request: prompt plus the tokens generated so far.

    The engine computes a sequence's KV cache left to right. ``num_computed_tokens`` says how far:
    tokens before it have their K/V in the cache, tokens from it on still need a forward pass.

        token_ids:  | p0 p1 p2 p3 p4 | o0 o1 |
                                          ^ num_computed_tokens = 6 while decoding:
                                            o1 was just sampled, its K/V comes next step.
    """

    def __init__(self, request_id: int, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.request_id = request_id  # position of the request among those the engine was given
        self.seq_id = next(_next_seq_id)  # unique in this process; names the sequence to tensor-parallel workers
        self.token_ids = list(prompt_token_ids)  # prompt followed by generated tokens
        self.num_prompt_tokens = len(prompt_token_ids)  # tokens of the prompt
        self.params = params
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose K/V is in the cache
        self.num_cached_tokens = 0  # of those, tokens found in the prefix cache rather than computed
        self.block_table: list[int] = []  # cache block ids, in order of the tokens they hold
        self.block_hashes: list[int] = []  # chained hash of each full block already registered or matched
        self.finish_reason: str | None = None  # "stop" (EOS) or "length" (max_tokens)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def num_blocks_needed(self, block_size: int) -> int:
        """Blocks that hold every token of the sequence so far."""
        return (self.num_tokens + block_size - 1) // block_size

    def block_token_ids(self, block_idx: int, block_size: int) -> list[int]:
        return self.token_ids[block_idx * block_size : (block_idx + 1) * block_size]
