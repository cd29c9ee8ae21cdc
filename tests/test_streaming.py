"""The request-level API: add_request / step / abort_request, LLM.stream, and incremental detokenization."""

import dataclasses
import pickle
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from nanovllm import LLM, SamplingParams, StreamOutput
from nanovllm.engine.detokenizer import IncrementalDetokenizer

ARGS = dict(device="cpu", dtype="float32", kvcache_block_size=16, max_model_len=128, num_kvcache_blocks=64)
PROMPTS = ["Hello, world!", "The scheduler decides", "Once upon a time there was", "An inference engine"]


@pytest.fixture(scope="module")
def llm(tiny_models: dict[str, Path]):
    with LLM(str(tiny_models["qwen3"]), **ARGS) as llm:
        yield llm


@pytest.mark.parametrize("clean_up_spaces", [False, True], ids=["backend-decode", "tokenizer-decode"])
def test_detokenizer_deltas_join_to_decoded_text(tiny_models: dict[str, Path], clean_up_spaces: bool) -> None:
    """Guards against a multi-byte character split over byte tokens reaching the stream as U+FFFD, on both
    decode paths (the Rust backend directly, or the tokenizer's decode when it cleans up spaces)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["qwen3"], clean_up_tokenization_spaces=clean_up_spaces)
    text = "naïve café → 😀 done"  # none of these non-ASCII characters is a single token of the tiny BPE
    token_ids = tokenizer.encode(text)
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert (detokenizer._backend is None) == clean_up_spaces
    deltas = [detokenizer.push([token_id]) for token_id in token_ids]
    deltas.append(detokenizer.flush())
    assert "".join(deltas) == text, deltas
    assert not any("\ufffd" in delta for delta in deltas), deltas
    assert len(token_ids) > len(text.encode()) // 2, "the test needs characters split over several tokens"


class RefusingStream:
    """Stands in for the backend's DecodeStream when it rejects a token (its InvalidPrefix error)."""

    def step(self, tokenizer: object, token_id: int) -> str | None:
        raise Exception("Invalid prefix encountered")


@pytest.mark.parametrize("refuse_after", [None, 0, 7], ids=["rust-stream", "python-rule", "switch-midway"])
def test_detokenizer_random_ids_and_a_cut_character(tiny_models: dict[str, Path], refuse_after: int | None) -> None:
    """Guards the backend's incremental decoder and the Python rule it falls back to: on random ids (byte
    tokens, special tokens) and on a completion cut inside a character, the deltas and the final flush
    join to the decode of all the ids, also when the decoder refuses a token midway."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["qwen3"], clean_up_tokenization_spaces=False)
    rng = random.Random(0)
    emoji = tokenizer.encode("😀")
    for token_ids in ([rng.randrange(len(tokenizer)) for _ in range(300)], tokenizer.encode("ab") + emoji[:-1]):
        detokenizer = IncrementalDetokenizer(tokenizer)
        deltas = []
        for i, token_id in enumerate(token_ids):
            if i == refuse_after:
                detokenizer._stream = RefusingStream()  # type: ignore[assignment]
            deltas.append(detokenizer.push([token_id]))
        deltas.append(detokenizer.flush())
        assert "".join(deltas) == tokenizer.decode(token_ids, skip_special_tokens=True), deltas
    assert len(emoji) > 2, "the test needs a character split over several tokens"


def test_stream_output_pickles_every_field() -> None:
    """Guards StreamOutput.__reduce__ (the engine process pickles one per row of every step) against a
    field added to the class but not to its pickled arguments."""
    out = StreamOutput("req-1", [1, 2], "ab", True, "stop", 3, [{1: -0.5}, {2: -0.25}], "END")
    assert pickle.loads(pickle.dumps(out)) == out
    assert len(out.__reduce__()[1]) == len(dataclasses.fields(StreamOutput))


def test_stream_matches_generate(llm: LLM) -> None:
    """Guards against streamed tokens or text that differ from what generate returns for the same request."""
    params = SamplingParams(temperature=0.0, max_tokens=20)
    expected = llm.generate(PROMPTS, params, use_tqdm=False)
    token_ids: dict[str, list[int]] = {str(i): [] for i in range(len(PROMPTS))}
    texts = dict.fromkeys(token_ids, "")
    finish_reasons: dict[str, str | None] = {}
    for out in llm.stream(PROMPTS, params):
        assert out.request_id not in finish_reasons, f"output after the request finished: {out}"
        token_ids[out.request_id] += out.new_token_ids
        texts[out.request_id] += out.text_delta
        if out.finished:
            finish_reasons[out.request_id] = out.finish_reason
    for i, exp in enumerate(expected):
        assert token_ids[str(i)] == exp.token_ids
        assert texts[str(i)] == exp.text, (texts[str(i)], exp.text)
        assert finish_reasons[str(i)] == exp.finish_reason


def test_requests_added_while_others_run(llm: LLM) -> None:
    """Guards against a request that joins a running batch getting different tokens than it gets alone."""
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    alone = [out.token_ids for out in llm.generate(PROMPTS[:2], params, use_tqdm=False)]
    engine = llm.engine
    assert engine is not None
    first = engine.add_request(PROMPTS[0], params)
    collected: dict[str, list[int]] = {first: []}
    for _ in range(3):
        for out in engine.step():
            collected[out.request_id] += out.new_token_ids
    second = engine.add_request(PROMPTS[1], params, request_id="late")
    collected[second] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            collected[out.request_id] += out.new_token_ids
    assert [collected[first], collected["late"]] == alone


def test_abort_frees_blocks_and_bad_calls_raise(llm: LLM) -> None:
    """Guards against an aborted request keeping its KV blocks, and against id reuse or generate mid-run."""
    engine = llm.engine
    assert engine is not None
    block_manager = engine.scheduler.block_manager
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    request_id = engine.add_request(PROMPTS[2] * 3, params, request_id="r1")
    with pytest.raises(ValueError, match="already running"):
        engine.add_request(PROMPTS[0], params, request_id="r1")
    engine.step()
    assert engine.stats().kv_cache_usage > 0
    with pytest.raises(RuntimeError, match="idle engine"):
        llm.generate(PROMPTS[:1], params, use_tqdm=False)
    assert engine.abort_request(request_id)
    assert not engine.abort_request(request_id), "a second abort must report that nothing was running"
    assert block_manager.num_free_blocks == block_manager.num_blocks
    assert engine.stats().kv_cache_usage == 0.0
    assert not engine.has_unfinished_requests()


def test_leaving_a_stream_early_aborts_its_requests(llm: LLM) -> None:
    """Guards against a consumer that stops iterating leaving requests (and their blocks) in the engine."""
    engine = llm.engine
    assert engine is not None
    stream = llm.stream(PROMPTS, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    for _ in stream:
        break
    stream.close()  # what a for loop's break does once the generator is collected
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.block_manager.num_free_blocks == engine.scheduler.block_manager.num_blocks


def test_generate_after_an_abandoned_stream_steps_quietly(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against requests that needed per-row work (text to follow, n > 1) outliving their abort and
    sending every later generate() through the slow per-row loop."""
    engine = llm.engine
    assert engine is not None
    stream = llm.stream(PROMPTS, SamplingParams(temperature=0.8, max_tokens=40, n=2, stop=["zz"]))
    for _ in stream:
        break
    stream.close()
    per_row_steps = []
    real_follow = engine._follow
    monkeypatch.setattr(engine, "_follow", lambda *args: per_row_steps.append(1) or real_follow(*args))
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert [len(out.token_ids) for out in outputs] == [8] * len(PROMPTS) and not per_row_steps


def test_stream_checks_input_when_called(llm: LLM) -> None:
    """Guards against bad input surfacing only on the first iteration, or after some requests were queued."""
    with pytest.raises(ValueError, match="prompt 1"):
        llm.stream(["fine", []], SamplingParams())
    assert llm.engine is not None and not llm.engine.has_unfinished_requests()
