"""What crosses from the scheduler to the model runner and back: one step's batch, and what it sampled."""

from dataclasses import dataclass

from nanovllm.scheduler.sequence import Sequence


@dataclass
class ScheduledBatch:
    """What one engine step computes: the model runner's input."""

    seqs: list[Sequence]  # the sequences of this step, in batch order
    num_new_tokens: list[int]  # tokens each sequence computes this step (its query length)
    is_prefill: bool  # False: a decode step, exactly one new token per sequence

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


@dataclass(frozen=True)
class StepSamples:
    """What one step sampled, on the host, one entry per batch row."""

    token_ids: list[int]  # the sampled token of each row
    sampled_logprobs: list[float | None]  # raw logprob of each sampled token; None where logprobs were not asked
    top_logprobs: list[dict[int, float] | None]  # token id -> logprob: the row's top-N plus the sampled token
