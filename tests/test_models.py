"""Greedy decoding of every supported architecture matches transformers token for token.

Each tiny model (tests/model_fixtures.py) runs once in the engine and once in transformers, in
float32 on CPU. Prompts of 1, 7, 16 and 40 token ids plus two strings cover: a lone token, a
partial block, exactly one full block and several blocks, batched together at different lengths.
The engine is built once per model and reused by every test here, with fresh memory filled with
NaN so that reading a KV-cache slot nobody wrote fails every time instead of now and then.
"""

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from model_fixtures import (
    TINY_MODEL_VARIANTS,
    VOCAB_SIZE,
    GreedyReference,
    hf_greedy_reference,
    uninitialized_memory_as_nan,
)
from safetensors.torch import load_file
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from nanovllm import LLM, SamplingParams

MAX_TOKENS = 16
# Prompt lengths in tokens for the random-id prompts; with block size 16: one token, a partial
# block, exactly one full block (a full prefix-cache hit on rerun) and 2.5 blocks.
ID_PROMPT_LENGTHS = (1, 7, 16, 40)
PROMPT_SEED = 0
PLAIN_TEXT_PROMPT = "The scheduler decides which requests run in the next step."
CHAT_MESSAGES = [{"role": "user", "content": "Hello, world! How are you today?"}]
# Below this a top-2 logit margin could be flipped by float32 rounding differences alone.
MIN_TOP2_MARGIN = 1e-4
# Single-token prompts tried when looking for one whose greedy continuation emits EOS (qwen3 with
# seed 0 first does so at prompt 7; about 1 in 20 prompts does).
MAX_EOS_SEARCH_PROMPTS = 64
ENGINE_KWARGS: dict[str, Any] = {
    "device": "cpu",
    "dtype": "float32",
    "kvcache_block_size": 16,
    "num_kvcache_blocks": 256,
    "max_num_batched_tokens": 512,
    "max_num_seqs": 16,
    "max_model_len": 1024,
    "enable_prefix_caching": True,
    "seed": 0,
}


def random_id_prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(PROMPT_SEED)
    return [torch.randint(0, VOCAB_SIZE, (length,), generator=generator).tolist() for length in ID_PROMPT_LENGTHS]


def text_prompts(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    chat_prompt = tokenizer.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
    return [PLAIN_TEXT_PROMPT, chat_prompt]


def greedy_params() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


@dataclass
class EngineRun:
    """One model's engine outputs, shared by the tests below."""

    name: str  # key of TINY_MODEL_VARIANTS
    model_dir: Path
    tokenizer: PreTrainedTokenizerBase
    id_prompts: list[list[int]]  # random id prompts, then the text prompts' token ids
    texts: list[str]  # the text prompts, as strings
    id_outputs: list[Any]  # generate(id_prompts), one batch
    text_outputs: list[Any]  # generate(texts); their blocks may already be cached from id_outputs
    rerun_outputs: list[Any]  # generate(id_prompts) again: every full prompt block is a cache hit


@pytest.fixture(scope="module", params=list(TINY_MODEL_VARIANTS))
def engine_run(request: pytest.FixtureRequest, tiny_models: dict[str, Path]) -> EngineRun:
    name = request.param
    model_dir = tiny_models[name]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = text_prompts(tokenizer)
    id_prompts = random_id_prompts() + [tokenizer.encode(text) for text in texts]
    with uninitialized_memory_as_nan(), LLM(str(model_dir), **ENGINE_KWARGS) as llm:
        id_outputs = llm.generate(id_prompts, greedy_params(), use_tqdm=False)
        text_outputs = llm.generate(texts, greedy_params(), use_tqdm=False)
        rerun_outputs = llm.generate(id_prompts, greedy_params(), use_tqdm=False)
    return EngineRun(name, model_dir, tokenizer, id_prompts, texts, id_outputs, text_outputs, rerun_outputs)


def references(model_dir: Path, prompts: Sequence[Sequence[int]]) -> list[GreedyReference]:
    return [hf_greedy_reference(str(model_dir), tuple(prompt), MAX_TOKENS) for prompt in prompts]


def mismatch_report(
    name: str, prompts: Sequence[Sequence[int]], got: Sequence[Sequence[int]], expected: Sequence[GreedyReference]
) -> str:
    """One paragraph per differing prompt: where the tokens first diverge and both token lists."""
    lines = []
    for prompt_idx, (prompt, got_ids, reference) in enumerate(zip(prompts, got, expected, strict=True)):
        got_ids, want_ids = list(got_ids), reference.token_ids
        if got_ids == want_ids:
            continue
        num_common = min(len(got_ids), len(want_ids))
        first_diff_idx = next((idx for idx in range(num_common) if got_ids[idx] != want_ids[idx]), num_common)
        margin = reference.top2_margins[first_diff_idx] if first_diff_idx < len(reference.top2_margins) else None
        lines.append(
            f"{name}: prompt {prompt_idx} ({len(prompt)} tokens) first differs at generated index {first_diff_idx}"
            f" (transformers top-2 margin there: {margin})\n"
            f"  engine:       {got_ids}\n  transformers: {want_ids}"
        )
    return "\n".join(lines)


def test_greedy_matches_transformers(engine_run: EngineRun) -> None:
    """Guards against any numerical bug in the forward pass (weight loading, tied embeddings, biases,
    q/k norm, head_dim, GQA, rope theta and scaling, either config.json spelling), in prefill or
    decode, and against batching bugs that mix sequences of different lengths (such as attention
    reading never-written cache slots past a shorter sequence's end: all-zero output from NaN)."""
    got = [output.token_ids for output in engine_run.id_outputs]
    report = mismatch_report(
        engine_run.name, engine_run.id_prompts, got, references(engine_run.model_dir, engine_run.id_prompts)
    )
    assert not report, "engine greedy tokens differ from transformers:\n" + report


def test_text_prompts_match_transformers(engine_run: EngineRun) -> None:
    """Guards against string prompts being tokenized differently from the model's own tokenizer
    (added BOS, special tokens split into bytes), and against wrong outputs after a prompt's
    blocks were filled by an earlier request (prefix cache)."""
    expected_prompt_ids = [engine_run.tokenizer.encode(text) for text in engine_run.texts]
    got_prompt_ids = [output.prompt_token_ids for output in engine_run.text_outputs]
    assert got_prompt_ids == expected_prompt_ids, (
        f"{engine_run.name}: prompt_token_ids {got_prompt_ids} != tokenizer.encode {expected_prompt_ids}"
    )
    got = [output.token_ids for output in engine_run.text_outputs]
    report = mismatch_report(
        engine_run.name, expected_prompt_ids, got, references(engine_run.model_dir, expected_prompt_ids)
    )
    assert not report, "engine greedy tokens for string prompts differ from transformers:\n" + report


def test_rerun_with_cached_prefix_matches(engine_run: EngineRun) -> None:
    """Guards against prefix-cache hits corrupting output: a cached block whose KV is wrong or
    stale, or a prompt that is entirely cached (the 16-token one) producing no logits to sample."""
    got = [output.token_ids for output in engine_run.rerun_outputs]
    report = mismatch_report(
        engine_run.name, engine_run.id_prompts, got, references(engine_run.model_dir, engine_run.id_prompts)
    )
    assert not report, "second run of the same prompts (prefix cache warm) differs from transformers:\n" + report


def test_outputs_report_prompt_and_finish_reason(engine_run: EngineRun) -> None:
    """Guards against outputs returned out of input order, truncated or padded prompt ids, and
    ignore_eos runs stopping early or reporting the wrong finish reason."""
    for prompt_idx, (prompt, output) in enumerate(zip(engine_run.id_prompts, engine_run.id_outputs, strict=True)):
        assert list(output.prompt_token_ids) == prompt, (
            f"{engine_run.name} prompt {prompt_idx}: prompt_token_ids {output.prompt_token_ids} != {prompt}"
        )
    for output in engine_run.id_outputs + engine_run.text_outputs + engine_run.rerun_outputs:
        assert len(output.token_ids) == MAX_TOKENS and output.finish_reason == "length", (
            f"{engine_run.name}: {len(output.token_ids)} tokens, finish_reason {output.finish_reason!r};"
            f" want {MAX_TOKENS}, 'length'"
        )


def test_text_is_decoded_token_ids(engine_run: EngineRun) -> None:
    """Guards against `text` decoded with special tokens kept, from the wrong ids (prompt included,
    last token dropped) or with incremental-detokenization glitches at byte-level merges."""
    for output in engine_run.id_outputs + engine_run.text_outputs:
        expected = engine_run.tokenizer.decode(output.token_ids, skip_special_tokens=True)
        assert output.text == expected, f"{engine_run.name}: text {output.text!r} != decode(token_ids) {expected!r}"


def test_outputs_support_dict_access(engine_run: EngineRun) -> None:
    """Guards against the documented `output["token_ids"]` / `output["text"]` access breaking."""
    output = engine_run.id_outputs[0]
    assert output["token_ids"] == output.token_ids and output["text"] == output.text, (
        f"{engine_run.name}: dict access {output['token_ids']!r}, {output['text']!r}"
        f" != attributes {output.token_ids!r}, {output.text!r}"
    )


# The tests below check the fixture itself (no engine): if one fails, an engine mismatch above
# may be the fixture's fault, or the comparison may have stopped being able to catch bugs.


@pytest.mark.parametrize("name", list(TINY_MODEL_VARIANTS))
def test_fixture_config_and_tokenizer_agree(tiny_models: dict[str, Path], name: str) -> None:
    """Guards against a fixture whose config.json names other special ids than its tokenizer, or
    whose tokenizer does not round-trip text or render its chat template."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_models[name])
    config = json.loads((tiny_models[name] / "config.json").read_text())
    ids = {
        "eos": (config["eos_token_id"], tokenizer.eos_token_id),
        "bos": (config["bos_token_id"], tokenizer.bos_token_id),
    }
    assert all(a == b for a, b in ids.values()), f"{name}: (config, tokenizer) ids {ids}"
    assert len(tokenizer) <= config["vocab_size"], (
        f"{name}: tokenizer has {len(tokenizer)} > vocab {config['vocab_size']}"
    )
    for text in text_prompts(tokenizer):
        assert tokenizer.decode(tokenizer.encode(text)) == text, f"{name}: {text!r} does not round-trip"
    chat_ids = tokenizer.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True, return_dict=False)
    im_start_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert chat_ids[0] == im_start_id, (
        f"{name}: chat prompt ids {chat_ids} should start with <|im_start|>={im_start_id}"
    )


@pytest.mark.parametrize("name", [name for name, (_, legacy) in TINY_MODEL_VARIANTS.items() if legacy])
def test_fixture_legacy_rope_keys_hold_same_model(tiny_models: dict[str, Path], name: str) -> None:
    """Guards against the legacy config.json rewrite changing the model, which would make the
    engine's legacy-key test compare against a different model than the one it means."""
    arch, _ = TINY_MODEL_VARIANTS[name]
    legacy_config = json.loads((tiny_models[name] / "config.json").read_text())
    assert "rope_parameters" not in legacy_config and "rope_theta" in legacy_config, f"{name}: {legacy_config}"
    prompts = random_id_prompts()
    legacy_ids = [ref.token_ids for ref in references(tiny_models[name], prompts)]
    base_ids = [ref.token_ids for ref in references(tiny_models[arch], prompts)]
    assert legacy_ids == base_ids, f"{name}: transformers gives {legacy_ids} but {arch} gives {base_ids}"


@pytest.mark.parametrize("name", list(TINY_MODEL_VARIANTS))
def test_fixture_greedy_reference_is_decisive_and_varied(tiny_models: dict[str, Path], name: str) -> None:
    """Guards against flaky comparisons (a near-tied argmax that float rounding can flip) and
    toothless ones (a model that emits one token whatever the context, which hides most bugs)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_models[name])
    prompts = random_id_prompts() + [tokenizer.encode(text) for text in text_prompts(tokenizer)]
    refs = references(tiny_models[name], prompts)
    min_margin = min(min(ref.top2_margins) for ref in refs)
    assert min_margin > MIN_TOP2_MARGIN, f"{name}: smallest top-2 margin {min_margin:.2e} <= {MIN_TOP2_MARGIN}"
    continuations = {tuple(ref.token_ids) for ref in refs}
    num_distinct_ids = len({token_id for ref in refs for token_id in ref.token_ids})
    assert len(continuations) == len(prompts) and num_distinct_ids >= 2 * MAX_TOKENS, (
        f"{name}: {len(continuations)} distinct continuations of {len(prompts)} prompts,"
        f" {num_distinct_ids} distinct token ids: {[ref.token_ids for ref in refs]}"
    )


@pytest.mark.parametrize(
    ("arch", "config_overrides"),
    [
        ("llama", {"rope_scaling": None}),  # llama3 scaling off
        ("qwen3", {"rope_theta": 10_000.0}),  # the default theta instead of Qwen's 1e6
        ("qwen3", {"rms_norm_eps": 1e-2}),
    ],
)
def test_fixture_config_fields_change_output(
    tiny_models: dict[str, Path], tiny_model_dir: Callable[..., Path], arch: str, config_overrides: dict[str, Any]
) -> None:
    """Guards against prompts too short for a config field to matter: an engine that ignored rope
    scaling, rope_theta or rms_norm_eps would then still match transformers."""
    changed_dir = tiny_model_dir(arch, **config_overrides)
    prompts = random_id_prompts()
    base_ids = [ref.token_ids for ref in references(tiny_models[arch], prompts)]
    changed_ids = [ref.token_ids for ref in references(changed_dir, prompts)]
    assert base_ids != changed_ids, f"{arch} with {config_overrides} gives the same tokens {base_ids}"


@pytest.mark.parametrize("name", list(TINY_MODEL_VARIANTS))
def test_fixture_norms_and_biases_are_randomized(tiny_models: dict[str, Path], name: str) -> None:
    """Guards against norm weights left at 1 and biases at 0, which an engine that never loads
    them would reproduce by accident."""
    tensors = load_file(tiny_models[name] / "model.safetensors")
    trivial = [
        key
        for key, tensor in tensors.items()
        if (key.endswith(".bias") and not tensor.any()) or ("norm" in key and bool((tensor == 1).all()))
    ]
    assert not trivial, f"{name}: tensors still at their default init: {trivial}"


def first_prompt_reaching_eos(model_dir: Path, eos_token_id: int) -> tuple[list[int], int]:
    """The first single-token prompt whose greedy continuation emits EOS before its last step,
    and the index of that EOS in the continuation."""
    for token_id in range(MAX_EOS_SEARCH_PROMPTS):
        generated_ids = hf_greedy_reference(str(model_dir), (token_id,), MAX_TOKENS).token_ids
        if eos_token_id in generated_ids[:-1]:
            return [token_id], generated_ids.index(eos_token_id)
    raise AssertionError(f"no prompt [0..{MAX_EOS_SEARCH_PROMPTS}) reaches EOS {eos_token_id}; change the fixture seed")


def test_greedy_runs_through_and_stops_at_eos(tiny_models: dict[str, Path]) -> None:
    """Guards against ignore_eos=True masking EOS out of the logits or stopping at it anyway, and
    against ignore_eos=False running past EOS or reporting the wrong finish reason."""
    model_dir = tiny_models["qwen3"]
    eos_token_id = AutoTokenizer.from_pretrained(model_dir).eos_token_id
    prompt, eos_idx = first_prompt_reaching_eos(model_dir, eos_token_id)
    want_ids = hf_greedy_reference(str(model_dir), tuple(prompt), MAX_TOKENS).token_ids
    stop_at_eos = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=False)
    with uninitialized_memory_as_nan(), LLM(str(model_dir), **ENGINE_KWARGS) as llm:
        [through] = llm.generate([prompt], greedy_params(), use_tqdm=False)
        [stopped] = llm.generate([prompt], stop_at_eos, use_tqdm=False)
    assert through.token_ids == want_ids, f"ignore_eos=True: engine {through.token_ids} != transformers {want_ids}"
    # vLLM keeps the EOS as the last completion token; leaving it out is accepted too.
    allowed = (want_ids[: eos_idx + 1], want_ids[:eos_idx])
    assert stopped.token_ids in allowed and stopped.finish_reason == "stop", (
        f"ignore_eos=False: got {stopped.token_ids} ({stopped.finish_reason!r}), want one of {allowed} ('stop')"
    )
