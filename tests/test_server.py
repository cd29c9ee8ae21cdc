"""The OpenAI-compatible server on a tiny model over loopback: the official client, streaming, load, bad input."""

import asyncio
import contextlib
import dataclasses
import gc
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nanovllm import LLM, SamplingParams
from nanovllm.outputs import StreamOutput
from nanovllm.serving.async_llm import AsyncLLM, EngineError, RequestStream
from nanovllm.serving.gc_freeze import startup_objects_frozen

uvicorn = pytest.importorskip("uvicorn")
from nanovllm.serving.app import build_app  # noqa: E402  (needs the serve extra, checked just above)
from nanovllm.serving.errors import APIError  # noqa: E402
from nanovllm.serving.openai_api import sse  # noqa: E402
from nanovllm.serving.params import one_choice, to_sampling_params  # noqa: E402
from nanovllm.serving.protocol import CompletionRequest  # noqa: E402
from nanovllm.serving.server import engine_args_from, make_parser  # noqa: E402

MODEL_NAME = "tiny-qwen3"
API_KEY = "test-key"
ENGINE_ARGS = dict(
    device="cpu", dtype="float32", kvcache_block_size=16, max_model_len=256, num_kvcache_blocks=96, seed=0
)
PROMPTS = ["The quick brown fox", "Once upon a time", "Hello, world! How are", "The scheduler decides which"]
SERVER_START_TIMEOUT_S = 60.0
ABORT_TIMEOUT_S = 10.0
SLOW_STEP_S = 0.02  # added to every engine step by the `slow_engine` fixture


@dataclass
class Server:
    base_url: str  # "http://127.0.0.1:PORT"
    async_llm: AsyncLLM  # the engine behind it, for the engine-error test
    reference: LLM  # an offline engine with the same arguments: what the server must reproduce

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=API_KEY, max_retries=0)

    def expected_text(self, prompt: str, max_tokens: int) -> str:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        return self.reference.generate([prompt], params, use_tqdm=False)[0].text

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics by name (labels dropped: the last sample of a name wins)."""
        text = httpx.get(f"{self.base_url}/metrics").text
        return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


@contextlib.contextmanager
def uvicorn_in_thread(app: Any) -> Iterator[str]:
    """``app`` served by uvicorn in a thread, on a loopback port the OS picked; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv_server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uv_server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not uv_server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert uv_server.started, f"uvicorn did not start within {SERVER_START_TIMEOUT_S} s"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv_server.should_exit = True
        thread.join(SERVER_START_TIMEOUT_S)
        sock.close()


@pytest.fixture(scope="module")
def server(tiny_models: dict[str, Path]) -> Iterator[Server]:
    """One server, the engine in a thread, for the whole module."""
    model_dir = str(tiny_models["qwen3"])
    async_llm = AsyncLLM.from_engine_args(model_dir, **ENGINE_ARGS)
    try:
        app = build_app(async_llm, MODEL_NAME, api_key=API_KEY)
        with uvicorn_in_thread(app) as base_url, LLM(model_dir, **ENGINE_ARGS) as reference:
            yield Server(base_url, async_llm, reference)
    finally:
        async_llm.shutdown()


def test_completion_matches_offline_generate(server: Server) -> None:
    """Guards against the server's text differing from LLM.generate, or vLLM's extra fields being dropped."""
    client = server.client()
    expected = server.expected_text(PROMPTS[0], 12)
    extra = {"ignore_eos": True}
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0, extra_body=extra)
    assert out.choices[0].text == expected, (out.choices[0].text, expected)
    assert out.choices[0].finish_reason == "length"
    num_prompt_tokens = len(server.reference.engine.tokenizer.encode(PROMPTS[0]))  # type: ignore[union-attr]
    assert out.usage is not None and (out.usage.prompt_tokens, out.usage.completion_tokens) == (num_prompt_tokens, 12)

    chunks = list(
        client.completions.create(
            model=MODEL_NAME,
            prompt=PROMPTS[0],
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra,
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected, (text, expected)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12, chunks[-1]


def test_n_choices_and_batched_prompts(server: Server) -> None:
    """Guards against choices of one call mixed up, misnumbered or miscounted when each is its own request
    (choice i of a seeded call samples with seed + i, as the offline engine does given that seed)."""
    seed, max_tokens = 7, 6
    expected = [
        [
            server.reference.generate(
                [prompt], SamplingParams(temperature=0.8, seed=seed + i, max_tokens=max_tokens, ignore_eos=True),
                use_tqdm=False,
            )[0].text
            for i in range(2)
        ]
        for prompt in PROMPTS[:2]
    ]  # fmt: skip
    out = server.client().completions.create(
        model=MODEL_NAME, prompt=PROMPTS[:2], n=2, max_tokens=max_tokens, temperature=0.8, seed=seed,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    texts = [choice.text for choice in sorted(out.choices, key=lambda choice: choice.index)]
    assert texts == [*expected[0], *expected[1]], (texts, expected)
    assert out.usage is not None and out.usage.completion_tokens == 4 * max_tokens, out.usage


def test_chat_matches_offline_generate(server: Server) -> None:
    """Guards against a chat prompt rendered differently from the tokenizer's template, or a bad chunk format."""
    client = server.client()
    messages = [{"role": "user", "content": "Hello, how are you today?"}]
    tokenizer = server.reference.engine.tokenizer  # type: ignore[union-attr]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = server.expected_text(prompt, 10)
    extra = {"ignore_eos": True}
    out = client.chat.completions.create(
        model=MODEL_NAME,
        messages=messages,
        max_tokens=10,
        temperature=0,
        extra_body=extra,  # type: ignore[arg-type]
    )
    assert out.choices[0].message.content == expected, (out.choices[0].message.content, expected)
    assert out.choices[0].message.role == "assistant"

    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        extra_body=extra,  # type: ignore[arg-type]
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == expected, (text, expected)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_concurrent_streams_all_correct(server: Server) -> None:
    """Guards against outputs routed to the wrong stream, or lost, when 32 requests share the engine."""
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(32)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    expected = [out.text for out in server.reference.generate(prompts, params, use_tqdm=False)]
    client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0)

    async def one(prompt: str) -> str:
        stream = await client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=8, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        return "".join([chunk.choices[0].text async for chunk in stream])

    async def run_all() -> list[str]:
        return await asyncio.gather(*(one(p) for p in prompts))

    texts = asyncio.run(run_all())
    mismatched = [(i, texts[i], expected[i]) for i in range(len(prompts)) if texts[i] != expected[i]]
    assert not mismatched, mismatched


@pytest.fixture
def slow_engine(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every engine step takes SLOW_STEP_S longer, so a 200-token request cannot finish before its client leaves."""
    engine = server.async_llm.engine
    real_step = engine.step

    def slow_step() -> Any:
        time.sleep(SLOW_STEP_S)
        return real_step()

    monkeypatch.setattr(engine, "step", slow_step)


def wait_for_abort(server: Server, num_aborted_before: float) -> dict[str, float]:
    """/metrics once the engine has aborted one more request (or after ABORT_TIMEOUT_S)."""
    deadline = time.monotonic() + ABORT_TIMEOUT_S
    metrics = server.metrics()
    while metrics["nanovllm:num_aborted_requests_total"] == num_aborted_before and time.monotonic() < deadline:
        time.sleep(0.05)
        metrics = server.metrics()
    return metrics


LONG_BODY = {"model": MODEL_NAME, "prompt": PROMPTS[1], "max_tokens": 200, "ignore_eos": True}
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_disconnect_mid_stream_frees_blocks(server: Server, slow_engine: None) -> None:
    """Guards against a streaming request whose client went away running on and holding its KV blocks."""
    aborted_before = server.metrics()["nanovllm:num_aborted_requests_total"]
    body = {**LONG_BODY, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, headers=AUTH) as response:
        first_data = next(line for line in response.iter_lines() if line.startswith("data: "))
        assert json.loads(first_data[len("data: ") :])["choices"], first_data
    metrics = wait_for_abort(server, aborted_before)
    assert metrics["nanovllm:num_aborted_requests_total"] == aborted_before + 1, metrics
    assert metrics["nanovllm:num_requests_running"] == 0, metrics
    assert metrics["nanovllm:kv_cache_usage_perc"] == 0.0, metrics
    assert server.client().completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=2).choices


def test_disconnect_before_full_response_frees_blocks(server: Server, slow_engine: None) -> None:
    """Guards against a non-streaming request running to the end after its client timed out and left."""
    aborted_before = server.metrics()["nanovllm:num_aborted_requests_total"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/completions", json=LONG_BODY, headers=AUTH, timeout=0.3)
    metrics = wait_for_abort(server, aborted_before)
    assert metrics["nanovllm:num_aborted_requests_total"] == aborted_before + 1, metrics
    assert metrics["nanovllm:kv_cache_usage_perc"] == 0.0, metrics


GOOD_BODY: dict[str, Any] = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4}
BAD_REQUESTS = [
    # (case, path, body or raw bytes, headers, expected status, expected error param)
    ("malformed JSON", "/v1/completions", b'{"model": "tiny-qwen3", "prompt": ', None, 400, None),
    ("missing field", "/v1/completions", {"model": MODEL_NAME}, None, 400, "prompt"),
    ("unknown model", "/v1/completions", {**GOOD_BODY, "model": "gpt-4"}, None, 404, "model"),
    ("over-length prompt", "/v1/completions", {**GOOD_BODY, "prompt": "word " * 300}, None, 400, None),
    (
        "over-length chat",
        "/v1/chat/completions",
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": "a " * 300}]},
        None,
        400,
        "messages",
    ),  # noqa: E501
    ("negative temperature", "/v1/completions", {**GOOD_BODY, "temperature": -1}, None, 400, "temperature"),
    ("max_tokens 0", "/v1/completions", {**GOOD_BODY, "max_tokens": 0}, None, 400, "max_tokens"),
    ("temperature not a number", "/v1/completions", {**GOOD_BODY, "temperature": "hot"}, None, 400, "temperature"),
    ("token id out of vocab", "/v1/completions", {**GOOD_BODY, "prompt": [1, 99999]}, None, 400, None),
    ("logprobs", "/v1/completions", {**GOOD_BODY, "logprobs": 2}, None, 400, "logprobs"),
    ("unknown sampling field", "/v1/completions", {**GOOD_BODY, "made_up_knob": 3}, None, 400, "made_up_knob"),
    ("n = 0", "/v1/completions", {**GOOD_BODY, "n": 0}, None, 400, "n"),
    ("chat without messages", "/v1/chat/completions", {"model": MODEL_NAME, "messages": "hi"}, None, 400, "messages"),
    ("missing API key", "/v1/completions", GOOD_BODY, {}, 401, None),
    ("wrong API key", "/v1/completions", GOOD_BODY, {"Authorization": "Bearer nope"}, 401, None),
    ("wrong API key, models", "/v1/models", None, {"Authorization": "Bearer nope"}, 401, None),
]


@pytest.mark.parametrize("case,path,body,headers,status,param", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_gets_4xx_and_server_keeps_serving(
    server: Server, case: str, path: str, body: Any, headers: dict[str, str] | None, status: int, param: str | None
) -> None:
    """Guards against bad input crashing a handler or the engine thread instead of getting an OpenAI error."""
    headers = AUTH if headers is None else headers
    url = f"{server.base_url}{path}"
    if body is None:
        response = httpx.get(url, headers=headers)
    elif isinstance(body, bytes):
        response = httpx.post(url, content=body, headers={**headers, "Content-Type": "application/json"})
    else:
        response = httpx.post(url, json=body, headers=headers)
    assert response.status_code == status, (case, response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert error["param"] == param, error
    good = httpx.post(f"{server.base_url}/v1/completions", json=GOOD_BODY, headers=AUTH)
    assert good.status_code == 200, good.text


def test_startup_objects_frozen_then_released() -> None:
    """Guards the server's shield against full garbage collections (150+ ms stalls): what is alive on entry
    is frozen, and everything is unfrozen on exit, so the interpreter's last collection can free it."""
    built_at_startup = [object() for _ in range(1000)]
    with startup_objects_frozen():
        assert gc.get_freeze_count() >= len(built_at_startup)
    assert gc.get_freeze_count() == 0


def test_serve_flags() -> None:
    """Guards the command line: server flags stay out of the engine's arguments, engine flags get in."""
    args = make_parser().parse_args(["--model", "M", "--max-model-len", "8", "--no-enforce-eager"])
    engine_args = engine_args_from(args)
    assert args.engine_process and "engine_process" not in engine_args and "model" not in engine_args
    assert engine_args["max_model_len"] == 8 and engine_args["enforce_eager"] is False
    assert not make_parser().parse_args(["--model", "M", "--no-engine-process"]).engine_process


def test_sampling_fields_passed_by_name() -> None:
    """Guards against a client's sampling field being dropped silently, or a neutral default refused."""
    fields = {"model": MODEL_NAME, "prompt": "x", "temperature": 0.5, "ignore_eos": True, "top_p": 1.0, "n": 3}
    params = to_sampling_params(CompletionRequest(**fields), default_max_tokens=16)
    assert (params.temperature, params.ignore_eos, params.max_tokens, params.n) == (0.5, True, 16, 3), params
    seeded = CompletionRequest(**fields, seed=7)
    if "seed" in {f.name for f in dataclasses.fields(SamplingParams)}:
        assert one_choice(to_sampling_params(seeded, 16), 2).seed == 9  # type: ignore[attr-defined]
    with pytest.raises(APIError, match="made_up_knob") as error:
        to_sampling_params(CompletionRequest(**fields, made_up_knob=1), default_max_tokens=16)
    assert error.value.status_code == 400 and error.value.param == "made_up_knob", error.value


def test_engine_error_fails_request_not_server(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against an exception in an engine step killing the engine thread or hanging its requests."""
    engine = server.async_llm.engine
    real_step = engine.step

    def failing_step() -> Any:
        monkeypatch.setattr(engine, "step", real_step)  # fail once only
        raise RuntimeError("injected failure")

    monkeypatch.setattr(engine, "step", failing_step)
    with pytest.raises(openai.InternalServerError, match="injected failure"):
        server.client().completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=4)
    assert server.async_llm.is_running
    assert server.client().completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=4).choices
    assert server.metrics()["nanovllm:kv_cache_usage_perc"] == 0.0


def test_models_health_and_metrics(server: Server) -> None:
    """Guards against /metrics output that Prometheus cannot parse, or missing the issue's metrics."""
    assert [m.id for m in server.client().models.list()] == [MODEL_NAME]
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    server.client().completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=3)
    metrics = server.metrics()
    for name in (
        "nanovllm:num_requests_running",
        "nanovllm:num_requests_waiting",
        "nanovllm:kv_cache_usage_perc",
        "nanovllm:prefix_cache_hit_rate",
        "nanovllm:prefix_cache_queries_total",
        "nanovllm:prefix_cache_hits_total",
        "nanovllm:prompt_tokens_total",
        "nanovllm:generation_tokens_total",
        "nanovllm:time_to_first_token_seconds_count",
        "nanovllm:engine_time_to_first_token_seconds_count",
        "nanovllm:inter_token_latency_seconds_count",
        "nanovllm:e2e_request_latency_seconds_count",
    ):
        assert name in metrics, (name, sorted(metrics))
    assert metrics["nanovllm:generation_tokens_total"] >= 3 and metrics["nanovllm:prompt_tokens_total"] > 0, metrics
    assert metrics["nanovllm:time_to_first_token_seconds_count"] >= 1, metrics
    # The engine thread's view of first tokens: every request that got one, seen when the step produced it.
    assert metrics["nanovllm:engine_time_to_first_token_seconds_count"] >= 1, metrics
    assert metrics["nanovllm:engine_time_to_first_token_seconds_sum"] > 0, metrics


def test_sse_event_is_one_line_for_line_splitting_clients() -> None:
    """Guards against a completion whose text holds U+0085, U+2028 or U+2029 breaking a stream for clients
    that split lines as str.splitlines does (httpx's aiter_lines): JSON leaves those characters raw."""
    text = "a\x85b\u2028c\u2029d é"
    event = sse({"text": text})
    assert [line for line in event.splitlines() if line] == [event.strip()]
    assert json.loads(event.strip().removeprefix("data: "))["text"] == text


def test_request_stream_take_ready_keeps_order_and_errors() -> None:
    """Guards the server's coalesced writes: take_ready() hands over what is queued, in order, without
    losing an output or swallowing an engine error that follows it."""

    def output(request_id: str, token: int, finished: bool = False) -> StreamOutput:
        return StreamOutput(request_id, [token], str(token), finished, "length" if finished else None)

    async def run() -> tuple[list[tuple[int, int]], list[tuple[int, int]], str]:
        stream = RequestStream(None, ["a", "b"])  # no owner: nothing here aborts
        assert stream.take_ready() == []
        for item in (output("a", 1), output("b", 2), output("a", 3, finished=True)):
            stream.put(item)
        first = await anext(stream)
        ready = [(idx, out.new_token_ids[0]) for idx, out in [first, *stream.take_ready()]]
        stream.put(output("b", 4))
        stream.put(EngineError("the engine step failed"))
        before_error = [(idx, out.new_token_ids[0]) for idx, out in stream.take_ready()]
        with pytest.raises(EngineError) as raised:
            await anext(stream)
        assert stream.is_finished and [item async for item in stream] == []
        return ready, before_error, str(raised.value)

    ready, before_error, error = asyncio.run(run())
    assert ready == [(0, 1), (1, 2), (0, 3)]
    assert before_error == [(1, 4)]
    assert error == "the engine step failed"


async def stream_text(stream: RequestStream) -> tuple[str, str | None]:
    parts, finish_reason = [], None
    async for _, out in stream:
        parts.append(out.text_delta)
        finish_reason = out.finish_reason
    return "".join(parts), finish_reason


async def wait_until(condition: Any, timeout_s: float = ABORT_TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return bool(condition())


def test_engine_process_serves_like_the_engine_thread(server: Server) -> None:
    """Guards the server's engine process: what crosses the pipes (outputs, errors, stats, aborts) must
    give the same completions as the offline engine and leave no KV block held."""
    model_dir = str(server.reference.engine.config.model)
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    first_token_s: list[float] = []

    async def run(llm: AsyncLLM) -> tuple[list[tuple[str, str | None]], str, float, float]:
        llm.first_token_observers.append(lambda times, _: first_token_s.append(times.first_token_s - times.submitted_s))
        streams = [await llm.add_requests([prompt], [greedy]) for prompt in PROMPTS[:3]]
        results = await asyncio.gather(*(stream_text(stream) for stream in streams))
        with pytest.raises(ValueError) as bad:
            await llm.add_requests([[10**9]], [greedy])  # a token id outside the vocabulary
        stream = await llm.add_requests([PROMPTS[1]], [long])
        await anext(stream)
        usage_while_running = llm.stats().kv_cache_usage
        stream.abort()
        assert await wait_until(lambda: llm.num_aborted_requests == 1 and llm.stats().kv_cache_usage == 0.0)
        return results, str(bad.value), usage_while_running, llm.stats().kv_cache_usage

    llm = AsyncLLM.from_engine_args(model_dir, engine_process=True, **ENGINE_ARGS)
    try:
        assert llm.engine is None and llm.max_model_len == ENGINE_ARGS["max_model_len"]
        results, bad_request, usage_while_running, usage_after = asyncio.run(run(llm))
    finally:
        llm.shutdown()
    expected = [server.expected_text(prompt, greedy.max_tokens) for prompt in PROMPTS[:3]]
    assert results == [(text, "length") for text in expected]
    assert "outside" in bad_request, bad_request
    assert usage_while_running > 0 and usage_after == 0.0
    assert len(first_token_s) == 4 and all(seconds > 0 for seconds in first_token_s), first_token_s
    assert not llm.is_running


def test_engine_process_death_fails_its_requests(server: Server) -> None:
    """Guards against a crashed engine process leaving streams waiting forever and the server saying healthy."""
    model_dir = str(server.reference.engine.config.model)
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def run(llm: AsyncLLM) -> str:
        stream = await llm.add_requests([PROMPTS[0]], [long])
        await anext(stream)
        llm._runner._process.kill()
        with pytest.raises(EngineError) as error:
            await asyncio.wait_for(stream_text(stream), ABORT_TIMEOUT_S)
        with pytest.raises(EngineError):
            await llm.add_requests([PROMPTS[0]], [long])
        return str(error.value)

    llm = AsyncLLM.from_engine_args(model_dir, engine_process=True, **ENGINE_ARGS)
    try:
        message = asyncio.run(run(llm))
    finally:
        llm.shutdown()
    assert "the engine process exited" in message, message
    assert not llm.is_running


def test_engine_process_start_failure_raises_here(tmp_path: Path) -> None:
    """Guards against an engine that cannot be built leaving the server waiting instead of saying why."""
    with pytest.raises(Exception, match="config.json") as error:
        AsyncLLM.from_engine_args(str(tmp_path), engine_process=True, **ENGINE_ARGS)
    assert not isinstance(error.value, EngineError)


def test_engine_process_behind_http(server: Server) -> None:
    """Guards `nanovllm serve` (the engine in its own process, the default) end to end: the app's own
    tokenizer (the engine's is in the other process), streamed chunks through the pipes and SSE, and chat,
    against the engine-thread server."""
    model_dir = str(server.reference.engine.config.model)
    async_llm = AsyncLLM.from_engine_args(model_dir, engine_process=True, **ENGINE_ARGS)
    chat_body: dict[str, Any] = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 6}
    try:
        with uvicorn_in_thread(build_app(async_llm, MODEL_NAME)) as base_url:
            client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
            chunks = client.completions.create(
                model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=12, temperature=0, stream=True,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
            chat = client.chat.completions.create(model=MODEL_NAME, temperature=0, **chat_body)
    finally:
        async_llm.shutdown()
    assert text == server.expected_text(PROMPTS[2], 12), text
    in_thread = server.client().chat.completions.create(model=MODEL_NAME, temperature=0, **chat_body)
    assert chat.choices[0].message.content == in_thread.choices[0].message.content, (chat, in_thread)
    assert chat.usage == in_thread.usage, (chat.usage, in_thread.usage)
