"""Whole-engine behaviour on a tiny random-weight model, on CPU: caching, preemption, chunking, bad input."""

import json
import random
import shutil
from pathlib import Path

import pytest

from nanovllm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
BLOCK_SIZE = 16
BASE_ARGS = dict(device="cpu", dtype="float32", kvcache_block_size=BLOCK_SIZE, max_model_len=256, seed=0)


def random_prompts(num: int, min_len: int, max_len: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(400) for _ in range(rng.randint(min_len, max_len))] for _ in range(num)]


def generate_ids(llm: LLM, prompts: list, params: SamplingParams = GREEDY) -> list[list[int]]:
    return [out.token_ids for out in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def model_dir(tiny_models: dict[str, Path]) -> str:
    return str(tiny_models["qwen3"])


@pytest.fixture(scope="module")
def reference_llm(model_dir: str):
    """An unconstrained engine: every other configuration must reproduce its greedy tokens."""
    with LLM(model_dir, num_kvcache_blocks=256, enable_prefix_caching=False, **BASE_ARGS) as llm:
        yield llm


def test_prefix_caching_same_tokens_and_counts_hits(model_dir: str, reference_llm: LLM) -> None:
    """Guards against a cached prefix whose KV is wrong or stale, and a hit counter that does not count."""
    shared = random_prompts(1, 40, 40, seed=1)[0]
    prompts = [shared + tail for tail in random_prompts(4, 3, 20, seed=2)]
    expected = generate_ids(reference_llm, prompts)
    with LLM(model_dir, num_kvcache_blocks=256, **BASE_ARGS) as llm:
        first = generate_ids(llm, prompts[:1])
        assert llm.prefix_cache_stats().num_hit_tokens == 0
        rest = generate_ids(llm, prompts[1:])
        stats = llm.prefix_cache_stats()
    assert first + rest == expected
    # The 40-token prefix fills 2 blocks; each of the 3 later prompts finds both.
    assert stats.num_hit_tokens == 3 * 2 * BLOCK_SIZE, stats


def test_fully_cached_prompt_of_whole_blocks(model_dir: str, reference_llm: LLM) -> None:
    """Guards against a zero-length query when a prompt of exactly k blocks is entirely in the cache."""
    prompt = random_prompts(1, 2 * BLOCK_SIZE, 2 * BLOCK_SIZE, seed=3)
    expected = generate_ids(reference_llm, prompt)
    with LLM(model_dir, num_kvcache_blocks=64, **BASE_ARGS) as llm:
        assert generate_ids(llm, prompt) == expected
        assert generate_ids(llm, prompt) == expected
        assert llm.prefix_cache_stats().num_hit_tokens == BLOCK_SIZE  # the last block is always recomputed


def test_identical_prompts_in_one_batch(model_dir: str, reference_llm: LLM) -> None:
    """Guards against two sequences registering or reusing each other's blocks before they are computed."""
    prompt = random_prompts(1, 37, 37, seed=4)[0]
    expected = generate_ids(reference_llm, [prompt])[0]
    with LLM(model_dir, num_kvcache_blocks=64, **BASE_ARGS) as llm:
        assert generate_ids(llm, [prompt] * 4) == [expected] * 4


def test_preemption_gives_same_tokens(model_dir: str, reference_llm: LLM) -> None:
    """Guards against preempted sequences losing or duplicating tokens when they are recomputed."""
    prompts = random_prompts(8, 10, 30, seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    expected = generate_ids(reference_llm, prompts, params)
    args = {**BASE_ARGS, "max_model_len": 64}
    for caching in (True, False):
        with LLM(model_dir, num_kvcache_blocks=6, enable_prefix_caching=caching, **args) as llm:
            assert generate_ids(llm, prompts, params) == expected
            assert llm.engine is not None and llm.engine.scheduler.num_preemptions > 0, "the test must preempt"


def test_chunked_prefill_gives_same_tokens(model_dir: str, reference_llm: LLM) -> None:
    """Guards against a prompt split over steps attending to the wrong positions or sampling mid-prompt."""
    prompts = random_prompts(4, 20, 70, seed=6)
    expected = generate_ids(reference_llm, prompts)
    with LLM(model_dir, num_kvcache_blocks=64, max_num_batched_tokens=13, max_num_seqs=4, **BASE_ARGS) as llm:
        assert generate_ids(llm, prompts) == expected


def test_outputs_in_input_order_with_mixed_prompts_and_params(model_dir: str, reference_llm: LLM) -> None:
    """Guards against outputs returned in finishing order, and per-prompt params applied to the wrong prompt."""
    prompts = random_prompts(3, 5, 30, seed=7)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (9, 2, 5)]
    outs = reference_llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.token_ids) for o in outs] == [9, 2, 5]
    assert [o.prompt_token_ids for o in outs] == prompts
    assert all(o.finish_reason == "length" for o in outs)
    assert outs[0]["token_ids"] == outs[0].token_ids and outs[0]["text"] == outs[0].text


def test_seeded_sampling_is_reproducible(model_dir: str) -> None:
    """Guards against an unseeded sampler: the same engine seed must give the same samples."""
    prompts = random_prompts(3, 5, 20, seed=8)
    params = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    runs = []
    for _ in range(2):
        with LLM(model_dir, num_kvcache_blocks=64, **BASE_ARGS) as llm:
            runs.append(generate_ids(llm, prompts, params))
    assert runs[0] == runs[1]
    assert runs[0] != generate_ids_greedy(model_dir, prompts), "temperature 1 should not equal greedy here"


def generate_ids_greedy(model_dir: str, prompts: list) -> list[list[int]]:
    with LLM(model_dir, num_kvcache_blocks=64, **BASE_ARGS) as llm:
        return generate_ids(llm, prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))


@pytest.mark.parametrize(
    ("prompts", "params", "error", "match"),
    [
        ([[1] * 250], SamplingParams(max_tokens=10), ValueError, "max_model_len"),
        ([[]], None, ValueError, "empty"),
        ([[1, 2], [3]], [SamplingParams()], ValueError, "3 prompts but 1"),
        ([[1, 10**6]], None, ValueError, "token ids outside"),
        ([3.5], None, TypeError, "str or a list of int"),
    ],
)
def test_bad_requests_fail_clearly_and_engine_still_works(
    reference_llm: LLM, prompts: list, params, error: type, match: str
) -> None:
    """Guards against a bad request crashing deep inside the engine or leaving work queued behind it."""
    with pytest.raises(error, match=match):
        reference_llm.generate([[5, 6, 7], *prompts], params, use_tqdm=False)
    assert reference_llm.engine is not None and not reference_llm.engine.scheduler.has_unfinished()
    assert len(generate_ids(reference_llm, [[5, 6, 7]])[0]) == GREEDY.max_tokens


def test_bad_sampling_params() -> None:
    """Guards against nonsense sampling settings being accepted and failing later."""
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-0.5)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_bad_engine_arguments(model_dir: str, tmp_path: Path) -> None:
    """Guards against silently ignored engine arguments and unhelpful errors for bad model dirs."""
    with pytest.raises(TypeError, match="valid ones are: .*max_num_seqs"):
        LLM(model_dir, max_num_seq=4)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="kvcache_block_size"):
        LLM(model_dir, kvcache_block_size=24)
    with pytest.raises(ValueError, match="does not divide the model's num_attention_heads"):
        LLM(model_dir, tensor_parallel_size=3)
    unknown = tmp_path / "unknown_arch"
    shutil.copytree(model_dir, unknown)
    config = json.loads((unknown / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]  # a family nanovllm does not run
    (unknown / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not supported; supported: .*Qwen3ForCausalLM"):
        LLM(str(unknown), **BASE_ARGS)
    with pytest.raises(ValueError, match="less than one sequence of max_model_len"):
        LLM(model_dir, num_kvcache_blocks=2, **BASE_ARGS)


def test_closed_llm_and_string_prompts(model_dir: str) -> None:
    """Guards against using a closed engine silently, and against text that is not the decoded tokens."""
    llm = LLM(model_dir, num_kvcache_blocks=64, **BASE_ARGS)
    out = llm.generate(["Hello world"], GREEDY, use_tqdm=False)[0]
    assert llm.engine is not None
    assert out.text == llm.engine.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    llm.close()
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate(["Hello"], use_tqdm=False)


def test_skip_tokenizer_init_takes_token_ids_only(model_dir: str) -> None:
    """Guards against string prompts being accepted (or crashing) when no tokenizer is loaded."""
    with LLM(model_dir, num_kvcache_blocks=64, skip_tokenizer_init=True, **BASE_ARGS) as llm:
        out = llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0]
        assert out.text == "" and len(out.token_ids) == GREEDY.max_tokens
        with pytest.raises(ValueError, match="skip_tokenizer_init"):
            llm.generate(["text"], use_tqdm=False)


def test_unwritten_cache_slots_never_leak_into_attention(model_dir: str, reference_llm: LLM) -> None:
    """Guards against attention reading never-written cache slots: a NaN there must not reach any output."""
    prompts = random_prompts(4, 3, 40, seed=9)
    expected = generate_ids(reference_llm, prompts)
    with LLM(model_dir, num_kvcache_blocks=64, **BASE_ARGS) as llm:
        assert llm.engine is not None
        llm.engine.runner.kv_cache.fill_(float("nan"))
        assert generate_ids(llm, prompts) == expected
