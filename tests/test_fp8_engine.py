"""The FP8 KV cache through the whole engine, on CPU: how close it stays to the float32 cache, measured as vLLM
measures it (tests/logprob_check.py), and the engine features that read or move cached blocks (prefix caching,
chunked prefill, preemption, n > 1 samples, tensor parallelism over gloo) giving the FP8 cache's own tokens.

Why some sequences may fail vLLM's check here: the tiny random models (tests/model_fixtures.py, weights drawn
wide so greedy tokens have clear winners) turn the FP8 cache's rounding (3 mantissa bits in e4m3: up to 6% of
each value) into logprob errors up to about 1 nat, as large as the spread of their top 5. Of 160 sequences
(benchmarks/kv_cache_accuracy.py: 5 architectures x 32 prompts, 16 tokens) 3 fail the top-5 check in e4m3 and
28 in e5m2 (docs/fp8_kv_cache.md). So each architecture may have MAX_NOT_CLOSE sequences fail.
"""

import random
from pathlib import Path

import pytest
from logprob_check import LogprobComparison, compare_runs

from nanovllm import LLM, SamplingParams
from nanovllm.outputs import CompletionOutput

ARCHS = ["qwen3", "qwen2", "llama", "llama2", "mistral"]  # every fixture architecture
BASE_ARGS = dict(device="cpu", dtype="float32", kvcache_block_size=16, max_model_len=128, seed=0)
NUM_LOGPROBS = 5  # the top-5 of vLLM's check_logprobs_close, as issue 25 asks
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=NUM_LOGPROBS)
# Prompt lengths: a lone token, partial blocks, one full block, several blocks (block size 16).
PROMPT_LENGTHS = (1, 7, 16, 23, 40, 57)
MAX_NOT_CLOSE = 1  # of an architecture's len(PROMPT_LENGTHS) sequences (see the module docstring)
# Few blocks force preemption, a small token budget chunks the longer prompts.
TIGHT_ARGS = dict(num_kvcache_blocks=8, max_num_batched_tokens=32, max_num_seqs=8)
SAMPLED = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=6, ignore_eos=True)  # seeded: same tokens anywhere


def prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(400) for _ in range(length)] for length in PROMPT_LENGTHS]


def follow_up_prompts() -> list[list[int]]:
    """Two prompts sharing the 40-token prompt's first 32 tokens: two cached blocks each, once that one ran."""
    shared = prompts()[4][:32]
    return [shared + [5, 6, 7], shared + [9]]


def run(llm: LLM, num_calls: int = 3) -> list[list[CompletionOutput]]:
    """Greedy completions of prompts(), then of follow_up_prompts(), then n=2 seeded samples of the first
    follow-up: the first ``num_calls`` of these three generate calls."""
    calls = [(prompts(), GREEDY), (follow_up_prompts(), GREEDY), (follow_up_prompts()[:1], SAMPLED)]
    outputs = [llm.generate(call_prompts, params, use_tqdm=False) for call_prompts, params in calls[:num_calls]]
    return [[completion for out in call for completion in out.outputs] for call in outputs]


def roomy_llm(model_dir: Path, kv_cache_dtype: str) -> LLM:
    """One process, blocks for everything, no prefix caching: no feature that moves cached blocks is used."""
    return LLM(str(model_dir), kv_cache_dtype=kv_cache_dtype, num_kvcache_blocks=64, enable_prefix_caching=False,
               **BASE_ARGS)  # fmt: skip


@pytest.fixture(scope="module")
def fp8_qwen3_run(tiny_models: dict[str, Path]) -> list[list[CompletionOutput]]:
    with roomy_llm(tiny_models["qwen3"], "fp8") as llm:
        return run(llm)


def report(comparisons: list[LogprobComparison]) -> str:
    return "; ".join(f"first difference at {c.first_difference}, close: {c.is_close}, "
                     f"largest logprob gap {c.largest_logprob_gap:.3f}" for c in comparisons)  # fmt: skip


@pytest.mark.parametrize("arch", ARCHS)
def test_fp8_cache_stays_close_to_float32_cache(
    tiny_models: dict[str, Path], fp8_qwen3_run: list[list[CompletionOutput]], arch: str
) -> None:
    """Guards against an FP8 (e4m3) cache that stores or reads K/V wrongly in any architecture (a wrong format,
    scale or rounding): vLLM's check against the float32 cache on greedy tokens. (A cache read 25% too large
    fails 4 of the 5 architectures; e5m2 is checked in the kernels, tests/test_fp8_kernels.py.)"""
    with roomy_llm(tiny_models[arch], "auto") as llm:
        reference = run(llm, num_calls=1)[0]
    if arch == "qwen3":
        tested = fp8_qwen3_run[0]
    else:
        with roomy_llm(tiny_models[arch], "fp8") as llm:
            tested = run(llm, num_calls=1)[0]
    comparisons = compare_runs(reference, tested)
    num_not_close = sum(not c.is_close for c in comparisons)
    assert num_not_close <= MAX_NOT_CLOSE, f"{arch}: {report(comparisons)}"


def test_cache_features_give_the_fp8_cache_own_tokens(
    tiny_models: dict[str, Path], fp8_qwen3_run: list[list[CompletionOutput]]
) -> None:
    """Guards against FP8 blocks that go wrong when moved or reused: preempted and recomputed, prefilled in
    chunks over a cached FP8 prefix, found in the prefix cache, shared by n > 1 samples, or split over two
    tensor-parallel ranks (each with its own FP8 cache of half the heads). They must give the tokens of one
    process with a roomy cache and no prefix caching."""
    with LLM(str(tiny_models["qwen3"]), kv_cache_dtype="fp8", tensor_parallel_size=2, **TIGHT_ARGS,
             **BASE_ARGS) as llm:  # fmt: skip
        got = [[out.token_ids for out in call] for call in run(llm)]
        assert llm.engine is not None
        num_preemptions = llm.engine.scheduler.num_preemptions
        num_hit_tokens = llm.prefix_cache_stats().num_hit_tokens
    expected = [[out.token_ids for out in call] for call in fp8_qwen3_run]
    for call, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert have == want, f"call {call}: TP=2 with tight blocks {have} != one roomy process {want}"
    assert num_preemptions > 0, "the workload must preempt"
    assert num_hit_tokens >= 2 * 2 * 16, f"the follow-ups must find two cached blocks each, found {num_hit_tokens}"
