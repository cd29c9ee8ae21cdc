"""vLLM's way of comparing two engines' greedy outputs when their numerics differ (``check_logprobs_close``).

Follow each sequence's greedy tokens in both runs; where they first differ, each run's token must be among the
other's top logprobs at that position, and the comparison of that sequence stops there (after it, the two
runs continue from different text). Used by the FP8 KV-cache tests and by benchmarks/kv_cache_accuracy.py.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from nanovllm.outputs import CompletionOutput


@dataclass(frozen=True)
class LogprobComparison:
    """One sequence of a reference run against the same sequence of a tested run."""

    first_difference: int | None  # index of the first generated token that differs; None = all equal
    is_close: bool  # True when equal, or when at the first difference each token is in the other's top logprobs
    largest_logprob_gap: float  # largest |logprob difference| of a token both runs rank, up to the first difference


def compare_logprobs(reference: CompletionOutput, tested: CompletionOutput) -> LogprobComparison:
    """vLLM's check on one sequence; both runs asked for the same number of top logprobs (SamplingParams.logprobs)."""
    if reference.logprobs is None or tested.logprobs is None:
        raise ValueError("both runs need logprobs: set SamplingParams(logprobs=N)")
    num_tokens = min(len(reference.token_ids), len(tested.token_ids))
    first = next((i for i in range(num_tokens) if reference.token_ids[i] != tested.token_ids[i]), None)
    last = num_tokens - 1 if first is None else first
    gap = 0.0
    for ref_top, test_top in zip(reference.logprobs[: last + 1], tested.logprobs[: last + 1], strict=True):
        gap = max([gap, *(abs(ref_top[t] - test_top[t]) for t in ref_top.keys() & test_top.keys())])
    if first is None:
        return LogprobComparison(None, True, gap)
    is_close = (
        reference.token_ids[first] in tested.logprobs[first] and tested.token_ids[first] in reference.logprobs[first]
    )
    return LogprobComparison(first, is_close, gap)


def compare_runs(reference: Sequence[CompletionOutput], tested: Sequence[CompletionOutput]) -> list[LogprobComparison]:
    return [compare_logprobs(ref, got) for ref, got in zip(reference, tested, strict=True)]
