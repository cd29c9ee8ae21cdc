"""Sampling through the whole engine on a tiny model: stops, min_tokens, seeds, n samples, logprobs, beam search."""

import random
from pathlib import Path

import pytest
import torch
from model_fixtures import load_hf_model

from nanovllm import LLM, SamplingParams
from nanovllm.engine.beam_search import Beam, best_beams

BLOCK_SIZE = 16
ARGS = dict(device="cpu", dtype="float32", kvcache_block_size=BLOCK_SIZE, max_model_len=256, num_kvcache_blocks=64)
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def random_prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(400) for _ in range(length)]


@pytest.fixture(scope="module")
def model_dir(tiny_models: dict[str, Path]) -> str:
    return str(tiny_models["qwen3"])


@pytest.fixture(scope="module")
def llm(model_dir: str):
    with LLM(model_dir, **ARGS) as llm:
        yield llm


def spanning_stop_string(llm: LLM, token_ids: list[int]) -> tuple[str, int]:
    """A 2-character stop string made of the last character of one token's text and the first of the next's,
    found nowhere earlier in the text; and the number of tokens up to the one that completes it."""
    tokenizer = llm.engine.tokenizer  # type: ignore[union-attr]
    texts = [tokenizer.decode(token_ids[:k], skip_special_tokens=True) for k in range(len(token_ids) + 1)]
    for k in range(2, len(token_ids)):
        before, after = texts[k], texts[k + 1]
        if len(before) >= 1 and len(after) > len(before) and texts[-1].startswith(after):
            stop = before[-1] + after[len(before)]
            if texts[-1].find(stop) == len(before) - 1 and "\ufffd" not in stop:
                return stop, k + 1
    raise AssertionError(f"no usable token boundary in {texts[-1]!r}")


def test_stop_string_across_tokens_cuts_text_and_stream(llm: LLM) -> None:
    """Guards against stop strings matched only within one token, text not cut before the match, and streamed
    deltas that emit text a later stop string cuts."""
    prompt = random_prompt(10, seed=1)
    [full] = llm.generate([prompt], GREEDY, use_tqdm=False)
    stop, num_tokens = spanning_stop_string(llm, full.token_ids)
    cut = full.text.find(stop)
    for include in (False, True):
        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop, "never-matches"])
        if include:
            params = SamplingParams(**{**params.__dict__, "include_stop_str_in_output": True})
        [out] = llm.generate([prompt], params, use_tqdm=False)
        expected_text = full.text[: cut + len(stop)] if include else full.text[:cut]
        assert (out.text, out.token_ids) == (expected_text, full.token_ids[:num_tokens]), (stop, out, full.text)
        assert (out.finish_reason, out.outputs[0].stop_reason) == ("stop", stop)
        streamed = list(llm.stream([prompt], params))
        assert "".join(o.text_delta for o in streamed) == expected_text, [o.text_delta for o in streamed]
        assert streamed[-1].finished and streamed[-1].stop_reason == stop


def test_stop_token_ids_and_min_tokens(llm: LLM) -> None:
    """Guards against stop_token_ids ignored, a missing stop_reason, and min_tokens not holding back stops."""
    prompt = random_prompt(12, seed=2)
    [full] = llm.generate([prompt], GREEDY, use_tqdm=False)
    stop_id = full.token_ids[3]
    first = full.token_ids.index(stop_id)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop_token_ids=[stop_id])
    [out] = llm.generate([prompt], params, use_tqdm=False)
    assert out.token_ids == full.token_ids[: first + 1], (out.token_ids, full.token_ids)
    assert (out.finish_reason, out.outputs[0].stop_reason) == ("stop", stop_id)
    held = SamplingParams(**{**params.__dict__, "min_tokens": first + 3})
    [out] = llm.generate([prompt], held, use_tqdm=False)
    assert stop_id not in out.token_ids[: first + 2], (out.token_ids, stop_id)


def test_seed_gives_same_tokens_whatever_the_batch(llm: LLM) -> None:
    """Guards against seeded requests whose tokens depend on batch-mates, their order or the engine's RNG state."""
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=16, ignore_eos=True)
    others = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    prompt = random_prompt(20, seed=3)
    alone = llm.generate([prompt], seeded, use_tqdm=False)[0].token_ids
    mates = [random_prompt(n, seed=n) for n in (5, 33, 18)]
    after = llm.generate([*mates, prompt], [others] * 3 + [seeded], use_tqdm=False)[-1].token_ids
    before = llm.generate([prompt, *mates[:1]], [seeded, others], use_tqdm=False)[0].token_ids
    unseeded = llm.generate([prompt], SamplingParams(**{**seeded.__dict__, "seed": None}), use_tqdm=False)[0]
    assert alone == after == before, (alone, after, before)
    assert unseeded.token_ids != alone, "an unseeded draw should differ (else the test proves nothing)"


def test_n_samples_share_prompt_blocks(llm: LLM) -> None:
    """Guards against n > 1 prefilling the prompt n times (block count) and outputs missing completions."""
    prompt = random_prompt(40, seed=4)  # 2 full blocks + 8 tokens of a third
    params = SamplingParams(n=4, temperature=1.0, max_tokens=6, ignore_eos=True, seed=5)
    engine = llm.engine
    assert engine is not None
    engine.add_request(prompt, params, "n4")
    blocks_in_use = []
    while engine.has_unfinished_requests():
        engine.step()
        blocks_in_use.append(engine.scheduler.block_manager.num_blocks - engine.scheduler.block_manager.num_free_blocks)
    # Shared: the 2 full prompt blocks; each sample owns its third block (8 prompt + 6 output tokens).
    assert max(blocks_in_use) == 2 + 4, blocks_in_use
    [out] = llm.generate([prompt], params, use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1, out.outputs
    assert (out.token_ids, out.text) == (out.outputs[0].token_ids, out.outputs[0].text)
    indices = {o.sample_index for o in llm.stream([prompt], params)}
    assert indices == {0, 1, 2, 3}


def test_logprobs_match_transformers(llm: LLM, model_dir: str) -> None:
    """Guards against logprobs from transformed logits, a missing sampled entry, or a wrong cumulative sum."""
    prompt = random_prompt(9, seed=6)
    params = SamplingParams(temperature=0.8, max_tokens=5, ignore_eos=True, logprobs=3, repetition_penalty=1.3)
    [out] = llm.generate([prompt], params, use_tqdm=False)
    completion = out.outputs[0]
    assert completion.logprobs is not None and completion.cumulative_logprob is not None
    model = load_hf_model(model_dir)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + completion.token_ids])).logits[0]  # [len, vocab]
    reference = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)  # [5, vocab]
    total = 0.0
    for step, (token_id, entries) in enumerate(zip(completion.token_ids, completion.logprobs, strict=True)):
        top = reference[step].topk(3)
        expected = {int(i): float(v) for i, v in zip(top.indices, top.values, strict=True)}
        expected[token_id] = float(reference[step, token_id])
        assert entries == pytest.approx(expected, abs=1e-4), (step, entries, expected)
        total += expected[token_id]
    assert completion.cumulative_logprob == pytest.approx(total, abs=1e-3)


def reference_beam_search(model_dir: str, prompt: list[int], beam_width: int, max_tokens: int) -> list[Beam]:
    """Beam search written out with transformers: every beam's full sequence re-run at every step."""
    model = load_hf_model(model_dir)
    live, completed = [Beam([], 0.0)], []
    for _ in range(max_tokens):
        candidates = []
        for beam in live:
            with torch.inference_mode():
                logits = model(torch.tensor([prompt + beam.token_ids])).logits[0, -1]
            top = torch.log_softmax(logits, -1).topk(2 * beam_width)
            for token_id, logprob in zip(top.indices.tolist(), top.values.tolist(), strict=True):
                candidates.append(Beam(beam.token_ids + [token_id], beam.cumulative_logprob + logprob))
        live = best_beams(candidates, len(prompt), beam_width, 1.0)
    return best_beams(completed + live, len(prompt), beam_width, 1.0)


@pytest.mark.parametrize("beam_width", [1, 3])
def test_beam_search_equals_reference(llm: LLM, model_dir: str, beam_width: int) -> None:
    """Guards against beams pruned on the wrong score, candidates lost between steps, or wrong cumulative logprobs."""
    prompt = random_prompt(7, seed=7)
    [result] = llm.beam_search([prompt], beam_width=beam_width, max_tokens=4, ignore_eos=True)
    expected = reference_beam_search(model_dir, prompt, beam_width, 4)
    assert [s.token_ids for s in result.sequences] == [b.token_ids for b in expected]
    got = [s.cumulative_logprob for s in result.sequences]
    assert got == pytest.approx([b.cumulative_logprob for b in expected], abs=1e-3)
    if beam_width == 1:
        assert result.sequences[0].token_ids == llm.generate([prompt], GREEDY, use_tqdm=False)[0].token_ids[:4]


def test_completion_text_multibyte_stop_string(model_dir: str) -> None:
    """Guards against U+FFFD in deltas when byte tokens split a character, and against a stop string made of
    split characters being missed or leaking into the stream before the cut."""
    from transformers import AutoTokenizer

    from nanovllm.engine.completion_text import CompletionText

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    source = "naïve café → 😀 done"
    token_ids = tokenizer.encode(source)
    assert len(token_ids) > len(source.encode()) // 2, "the test needs characters split over several tokens"
    text = CompletionText(tokenizer, SamplingParams(stop="→ 😀"))
    deltas = []
    for token_id in token_ids:
        stop = text.push([token_id])
        deltas.append(text.take_delta(is_finished=stop is not None))
        if stop is not None:
            break
    assert stop == "→ 😀" and text.text == "naïve café ", text.text
    assert "".join(deltas) == "naïve café " and not any("\ufffd" in d for d in deltas), deltas
