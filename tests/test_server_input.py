"""What a hostile or careless client sends the server (issue #24), through HTTP on a live server: each is a 4xx
with OpenAI's error body naming the field, the keep-alive connection survives, and the engine goes on serving."""

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from nanovllm import SamplingParams
from nanovllm.serving.async_llm import AsyncLLM
from tests.test_server import ENGINE_ARGS, uvicorn_in_thread

pytest.importorskip("uvicorn")
from nanovllm.serving.app import build_app  # noqa: E402  (needs the serve extra, checked just above)
from nanovllm.serving.limits import ServerLimits  # noqa: E402
from nanovllm.serving.token_bounds import max_chars_per_token, normalizer_shrink  # noqa: E402

MODEL_NAME = "tiny"
LIMITS = ServerLimits(max_n=16, max_request_body_bytes=256 << 10)
GOOD: dict[str, Any] = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 3}
CHAT: dict[str, Any] = {"model": MODEL_NAME, "max_tokens": 3}
BLOCKED_TOKENIZER_TIMEOUT_S = 10.0  # how long a tokenizer call held by a test waits to be let go
RESPONSIVE_TIMEOUT_S = 3.0  # /health must answer within this while a prompt is being tokenized


@pytest.fixture(scope="module")
def base_url(tiny_models: dict[str, Path]) -> Iterator[str]:
    """A server with small limits (n <= 16, bodies <= 256 KiB); the engine (96 blocks x 16 = 1,536 tokens of KV
    cache, max_model_len 256) in a thread."""
    async_llm = AsyncLLM.from_engine_args(str(tiny_models["qwen3"]), **ENGINE_ARGS)
    try:
        with uvicorn_in_thread(build_app(async_llm, MODEL_NAME, limits=LIMITS)) as url:
            yield url
    finally:
        async_llm.shutdown()


@pytest.fixture
def client(base_url: str) -> Iterator[httpx.Client]:
    """One keep-alive connection; on exit, a good request on it must still be answered on the same connection."""
    with httpx.Client(base_url=base_url, timeout=30) as http:
        first = http.post("/v1/completions", json=GOOD)
        first_address = client_address(first)
        yield http
        last = http.post("/v1/completions", json=GOOD)
        assert first.status_code == last.status_code == 200, (first.text, last.text)
        assert client_address(last) == first_address, "the server dropped the keep-alive connection"


def client_address(response: httpx.Response) -> Any:
    """The client's end of the connection that carried ``response`` (read while the connection is open)."""
    return response.extensions["network_stream"].get_extra_info("client_addr")


def post_raw(http: httpx.Client, path: str, body: dict[str, Any]) -> httpx.Response:
    """``body`` as JSON with non-ASCII characters escaped, so a lone surrogate travels as JSON carries it."""
    return http.post(path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})


def assert_error(response: httpx.Response, status: int, param: str | None, *words: str) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["param"] == param and all(word in error["message"] for word in words), (param, words, error)
    return dict(error)


UNENCODABLE = [
    ("/v1/completions", {**GOOD, "prompt": "a\ud800b"}, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": ["fine", "\udfff"]}, "prompt.1"),
    ("/v1/completions", {**GOOD, "stop": ["\ud800"]}, "stop.0"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "hi \ud800"}]}, "messages.0.content"),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
        "messages.0.content.0.text",
    ),
]


@pytest.mark.parametrize("path,body,param", UNENCODABLE, ids=[case[2] for case in UNENCODABLE])
def test_text_no_tokenizer_can_encode_is_a_400_naming_the_field(
    client: httpx.Client, path: str, body: dict[str, Any], param: str
) -> None:
    """Guards against a lone surrogate being a 500 (the tokenizer's TypeError) or a dropped connection (an error
    message quoting it, which could not be written as UTF-8)."""
    assert_error(post_raw(client, path, body), 400, param, "not valid Unicode")


@dataclass
class HeldTokenizer:
    started: threading.Event  # set once a call with "HOLD" in its text began
    release: threading.Event  # lets the held calls go on


@pytest.fixture
def held_tokenizer(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldTokenizer]:
    """The server's tokenizer class, patched: encoding text with "HOLD" in it, or rendering a chat about it, waits
    until ``release`` is set (for BLOCKED_TOKENIZER_TIMEOUT_S at most)."""
    from transformers import PreTrainedTokenizerFast

    started, release = threading.Event(), threading.Event()

    def held(method: Any) -> Any:
        def wait_then_run(self: Any, text: Any, *args: Any, **kwargs: Any) -> Any:
            if "HOLD" in str(text):
                started.set()
                release.wait(BLOCKED_TOKENIZER_TIMEOUT_S)
            return method(self, text, *args, **kwargs)

        return wait_then_run

    for name in ("encode", "apply_chat_template"):
        monkeypatch.setattr(PreTrainedTokenizerFast, name, held(getattr(PreTrainedTokenizerFast, name)))
    yield HeldTokenizer(started, release)
    release.set()


@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/completions", {**GOOD, "prompt": "HOLD on"}),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "HOLD on"}]}),
    ],
    ids=["completion", "chat"],
)
def test_tokenizing_leaves_the_event_loop_free(
    base_url: str, held_tokenizer: HeldTokenizer, path: str, body: dict[str, Any]
) -> None:
    """Guards against prompts tokenized (or chat templates rendered) on the event loop, where one long prompt
    holds /health and every stream until it is done."""
    answer: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: answer.append(httpx.post(f"{base_url}{path}", json=body, timeout=30)))
    sender.start()
    assert held_tokenizer.started.wait(BLOCKED_TOKENIZER_TIMEOUT_S), "the held prompt was never tokenized"
    try:
        health = httpx.get(f"{base_url}/health", timeout=RESPONSIVE_TIMEOUT_S)
        stream = httpx.post(f"{base_url}/v1/completions", json={**GOOD, "stream": True}, timeout=RESPONSIVE_TIMEOUT_S)
    finally:
        held_tokenizer.release.set()
    sender.join(30)
    assert health.status_code == 200 and stream.status_code == 200 and "[DONE]" in stream.text, stream.text
    assert answer and answer[0].status_code == 200, answer


def test_prompt_too_long_by_its_characters_is_refused_untokenized(
    client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against tokenizing megabytes to find a prompt over max_model_len (seconds of CPU per request) when its
    character count already proves it: no token of the tiny tokenizer stands for more than 17 characters."""
    from transformers import PreTrainedTokenizerFast

    real_encode = PreTrainedTokenizerFast.encode
    longest_encoded = [0]

    def counting_encode(self: Any, text: Any, *args: Any, **kwargs: Any) -> Any:
        longest_encoded[0] = max(longest_encoded[0], len(str(text)))
        return real_encode(self, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerFast, "encode", counting_encode)
    long_text = "word " * 40_000  # 200,000 characters: at least 11,765 tokens
    error = assert_error(client.post("/v1/completions", json={**GOOD, "prompt": long_text}), 400, "prompt", "200000")
    chat = {**CHAT, "messages": [{"role": "user", "content": long_text}]}
    assert_error(client.post("/v1/chat/completions", json=chat), 400, "messages", "characters")
    assert error["code"] == "context_length_exceeded", error
    assert longest_encoded[0] < 1000, f"a {longest_encoded[0]}-character text was tokenized"


def test_body_over_the_limit_is_a_413(client: httpx.Client) -> None:
    """Guards against a body of any size being read and parsed: over --max-request-body-bytes it is a 413 with
    OpenAI's error body, whether its length is declared or it comes in chunks."""
    big = json.dumps({**GOOD, "prompt": "x" * LIMITS.max_request_body_bytes}).encode()
    declared = client.post("/v1/completions", content=big, headers={"Content-Type": "application/json"})
    assert_error(declared, 413, None, "--max-request-body-bytes")
    chunked = client.post("/v1/completions", content=iter([big[: len(big) // 2], big[len(big) // 2 :]]))
    assert_error(chunked, 413, None, str(LIMITS.max_request_body_bytes))


def test_n_is_bounded_and_checked_against_the_kv_cache(client: httpx.Client) -> None:
    """Guards against one request asking for any number of completions (n=100,000 held the engine for 20 s):
    n over --max-n is a 400, and so are n completions that could never be in the KV cache at once."""
    sampled = {**GOOD, "temperature": 0.8}
    assert_error(client.post("/v1/completions", json={**sampled, "n": 100_000}), 400, "n", "[1, 16]", "--max-n")
    # 8 x 200 tokens = 1,600 > the 1,536 tokens the cache holds.
    assert_error(client.post("/v1/completions", json={**sampled, "n": 8, "max_tokens": 200}), 400, "n", "KV cache")
    assert len(client.post("/v1/completions", json={**sampled, "n": 16}).json()["choices"]) == 16


LAX_VALUES = [  # (field, value, the param the error names)
    ("max_tokens", True, "max_tokens"),
    ("stream", "yes", "stream"),
    ("n", True, "n"),
    ("temperature", "0.5", "temperature"),
    ("temperature", True, "temperature"),
    ("ignore_eos", "true", "ignore_eos"),
    ("stop_token_ids", [True], "stop_token_ids.0"),
    ("logit_bias", {"5": True}, "logit_bias.5"),
    ("prompt", [True, False], "prompt"),
    ("prompt", [[1, 2], [3, False]], "prompt"),
    ("prompt", [], "prompt"),
]


@pytest.mark.parametrize("name,value,param", LAX_VALUES, ids=[f"{case[0]}={case[1]!r}" for case in LAX_VALUES])
def test_values_of_the_wrong_type_are_refused(client: httpx.Client, name: str, value: Any, param: str) -> None:
    """Guards against pydantic's lax coercion: `max_tokens: true` read as 1, `stream: "yes"` as true, boolean
    token ids as 0 and 1."""
    assert_error(client.post("/v1/completions", json={**GOOD, name: value}), 400, param)


BAD_MESSAGES = [
    ([{"role": "user"}], "messages.0.content", "required"),
    ([{"role": "user", "content": None}], "messages.0.content", "string"),
    ([{"role": "wizard", "content": "hi"}], "messages.0.role", "'user'"),
    ([{"content": "hi"}], "messages.0.role", "required"),
]


@pytest.mark.parametrize("messages,param,word", BAD_MESSAGES, ids=[case[1] + ":" + case[2] for case in BAD_MESSAGES])
def test_chat_messages_need_a_known_role_and_content(
    client: httpx.Client, messages: list[dict[str, Any]], param: str, word: str
) -> None:
    """Guards against a message without content, with null content or an unknown role being answered (a 200)."""
    assert_error(client.post("/v1/chat/completions", json={**CHAT, "messages": messages}), 400, param, word)


def test_off_values_of_missing_features_pass_and_others_are_refused(client: httpx.Client) -> None:
    """Guards README's promise that an "off" value of a field the server lacks is accepted (`best_of: 1` was a
    400), while a value that asks for the feature, or a boolean posing as 1, is still refused."""
    for off in ({"best_of": 1}, {"use_beam_search": False}, {"echo": False}, {"length_penalty": 1.0}):
        response = client.post("/v1/completions", json={**GOOD, **off})
        assert response.status_code == 200, (off, response.text)
    chat_off = {"logprobs": False, "top_logprobs": 0, "messages": [{"role": "user", "content": "hi"}]}
    assert client.post("/v1/chat/completions", json={**CHAT, **chat_off}).status_code == 200
    for on, param in (({"best_of": 2}, "best_of"), ({"best_of": True}, "best_of"), ({"echo": True}, "echo")):
        assert_error(client.post("/v1/completions", json={**GOOD, **on}), 400, param)


def test_n_above_one_with_greedy_sampling_is_refused_as_by_the_library(client: httpx.Client) -> None:
    """Guards against the server answering n identical greedy choices where the library (and vLLM: "n must be 1
    when using greedy sampling") refuses: the same rule, the same message, as a 400 naming n."""
    with pytest.raises(ValueError) as library:
        SamplingParams(n=2, temperature=0.0)
    error = assert_error(client.post("/v1/completions", json={**GOOD, "n": 2, "temperature": 0}), 400, "n")
    assert error["message"] == str(library.value), (error, library.value)
    assert client.post("/v1/completions", json={**GOOD, "n": 2}).status_code == 200  # the default temperature is 1


def test_the_length_bound_holds_and_is_given_only_where_it_is_proven(tiny_models: dict[str, Path]) -> None:
    """Guards the character-count check against refusing a prompt that fits: every text of the tiny tokenizer
    has at least len / bound tokens, and steps that can shrink text without limit give no bound."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models["qwen3"]))
    bound = max_chars_per_token(tokenizer)
    assert bound == len("<|begin_of_text|>"), bound
    for text in ("<|begin_of_text|>" * 50, "a" * 3000, "The quick brown fox " * 40, "é\u0301 \u4e2d\n" * 99):
        assert len(tokenizer.encode(text)) * bound >= len(text), text[:20]
    assert normalizer_shrink({"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]}) == 4
    assert normalizer_shrink({"type": "Strip", "strip_left": True, "strip_right": True}) is None
    assert normalizer_shrink({"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}) == 1
    assert normalizer_shrink({"type": "Replace", "pattern": {"String": "ab"}, "content": ""}) is None
