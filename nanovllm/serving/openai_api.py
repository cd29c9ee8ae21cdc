"""/v1/completions and /v1/chat/completions: request -> token-id prompts -> engine requests -> response.

Each choice (every prompt times ``n``) is one engine request; a RequestStream carries them together.
Streaming answers are Server-Sent Events in OpenAI's chunk format, one chunk per engine step and
choice, closed by ``data: [DONE]``. A client that goes away aborts its requests, freeing their KV blocks.
"""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from nanovllm.lora_request import LoRARequest
from nanovllm.sampling_params import SamplingParams
from nanovllm.serving.async_llm import AsyncLLM, EngineError, RequestStream
from nanovllm.serving.errors import APIError, error_body, quoted
from nanovllm.serving.limits import ServerLimits
from nanovllm.serving.metrics import ChoiceTimer, ServerMetrics
from nanovllm.serving.params import check_fits_kv_cache, check_n, check_unsupported, one_choice, to_sampling_params
from nanovllm.serving.prompts import CONTEXT_LENGTH_EXCEEDED, PromptTokenizer, check_encodable
from nanovllm.serving.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest, is_token_id
from nanovllm.serving.request_body import body_received_s

SSE_DONE = "data: [DONE]\n\n"
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still connected
CLIENT_CLOSED_STATUS = 499  # nginx's "client closed request": nobody reads it, the log does


# Characters that JSON leaves raw but that Python's str.splitlines (and so line readers built on it, such
# as httpx's aiter_lines) treats as line ends: escaped, so one event stays on one line for every client.
_LINE_BREAKS_JSON_KEEPS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(payload: dict[str, Any]) -> str:
    """One Server-Sent Event: a single ``data:`` line of JSON."""
    text = json.dumps(payload, ensure_ascii=False)
    if "\x85" in text or "\u2028" in text or "\u2029" in text:  # rare; three scans cost less than translate()
        text = text.translate(_LINE_BREAKS_JSON_KEEPS)
    return f"data: {text}\n\n"


@dataclass
class Choice:
    """What one choice has produced so far."""

    text_parts: list[str] = field(default_factory=list)  # text deltas in order
    num_tokens: int = 0  # tokens generated
    finish_reason: str | None = None  # "stop" or "length" once finished


@dataclass(frozen=True)
class Arrival:
    """When an API call reached the server (time.perf_counter()), where its latency and stage metrics start."""

    received_s: float  # its whole body had arrived: its latency starts here
    handler_s: float  # its handler began, the body parsed and validated


@dataclass(frozen=True)
class Job:
    """One API call turned into engine requests."""

    response_id: str  # "cmpl-..." or "chatcmpl-..."
    is_chat: bool  # chat.completion objects rather than text_completion
    arrival: Arrival  # when the call came
    prompt_token_ids: list[list[int]]  # each distinct prompt, tokenized
    choice_prompt_idx: list[int]  # for each choice, the index of its prompt
    params: list[SamplingParams]  # for each choice
    model: str  # the name the client asked for (the base model's or an adapter's), echoed in responses
    lora_request: LoRARequest | None  # the adapter that name picks; None = the base model
    created: int = field(default_factory=lambda: int(time.time()))  # Unix seconds, as OpenAI's "created"
    tokenized_s: float = field(default_factory=time.perf_counter)  # its prompts were token ids (jobs are made then)

    def usage(self, choices: list[Choice]) -> dict[str, int]:
        num_prompt_tokens = sum(len(ids) for ids in self.prompt_token_ids)
        num_completion_tokens = sum(choice.num_tokens for choice in choices)
        return {
            "prompt_tokens": num_prompt_tokens,
            "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens,
        }


class OpenAIServing:
    """The two generation endpoints over one AsyncLLM."""

    def __init__(
        self,
        async_llm: AsyncLLM,
        prompts: PromptTokenizer | None,
        model_name: str,
        metrics: ServerMetrics,
        limits: ServerLimits,
        lora_modules: Sequence[LoRARequest] = (),
    ) -> None:
        self.async_llm = async_llm
        self.prompts = prompts  # tokenizes off the event loop; None without a tokenizer (skip_tokenizer_init)
        self.model_name = model_name
        self.metrics = metrics
        self.limits = limits
        self.lora_modules = {lora.lora_name: lora for lora in lora_modules}  # adapters a request's `model` may name

    async def completions(self, request: CompletionRequest, raw_request: Request) -> Response:
        handler_s = time.perf_counter()
        self._check_common(request)
        prompts = await self._completion_prompts(request.prompt)
        job = self._make_job(request, prompts, Arrival(body_received_s(raw_request, handler_s), handler_s), False)
        return await self._run(job, request, raw_request)

    async def chat_completions(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        handler_s = time.perf_counter()
        self._check_common(request)
        prompt = await self._chat_prompt(request)
        job = self._make_job(request, [prompt], Arrival(body_received_s(raw_request, handler_s), handler_s), True)
        return await self._run(job, request, raw_request)

    def _check_common(self, request: SamplingRequest) -> None:
        if request.model != self.model_name and request.model not in self.lora_modules:
            served = ", ".join(repr(name) for name in [self.model_name, *self.lora_modules])
            message = f"model {quoted(request.model)} is not served here; this server serves {served}"
            raise APIError(404, message, param="model", code="model_not_found")
        check_unsupported(request)
        check_n(request, self.limits.max_n)
        check_encodable(request, "")

    async def _encode(self, text: str, field: str) -> list[int]:
        if self.prompts is None:
            raise APIError(400, "this server runs without a tokenizer (skip_tokenizer_init); send token ids", field)
        return await self.prompts.encode(text, field)

    async def _completion_prompts(self, prompt: str | list[int] | list[str] | list[list[int]]) -> list[list[int]]:
        """Each prompt as token ids (the shapes were checked by CompletionRequest)."""
        if isinstance(prompt, str):
            return [await self._encode(prompt, "prompt")]
        items: list[Any] = list(prompt)
        if is_token_id(items[0]):
            return [items]
        prompts = []
        for idx, item in enumerate(items):
            prompts.append(await self._encode(item, f"prompt.{idx}") if isinstance(item, str) else item)
        return prompts

    async def _chat_prompt(self, request: ChatCompletionRequest) -> list[int]:
        if self.prompts is None or not self.prompts.has_chat_template:
            raise APIError(400, "the model's tokenizer has no chat template; use /v1/completions", "messages")
        messages = []
        for message in request.messages:
            content = message.content
            text = "\n".join(part.text for part in content) if isinstance(content, list) else content
            messages.append({**message.model_dump(exclude_none=True), "content": text})
        return await self.prompts.encode_chat(messages, request.add_generation_prompt)

    def _make_job(self, request: SamplingRequest, prompts: list[list[int]], arrival: Arrival, is_chat: bool) -> Job:
        choice_prompt_idx: list[int] = []
        params: list[SamplingParams] = []
        for prompt_idx, prompt_ids in enumerate(prompts):
            default_max_tokens = COMPLETION_DEFAULT_MAX_TOKENS
            if is_chat:
                default_max_tokens = self.async_llm.max_model_len - len(prompt_ids)
                if default_max_tokens < 1:
                    message = (
                        f"the prompt has {len(prompt_ids)} tokens, which leaves no room to generate within "
                        f"max_model_len={self.async_llm.max_model_len}; shorten the messages"
                    )
                    raise APIError(400, message, "messages", CONTEXT_LENGTH_EXCEEDED)
            prompt_params = to_sampling_params(request, default_max_tokens)
            check_fits_kv_cache(len(prompt_ids), request.n, prompt_params.max_tokens, self.async_llm.num_kvcache_tokens)
            for choice_idx in range(request.n):
                choice_prompt_idx.append(prompt_idx)
                params.append(one_choice(prompt_params, choice_idx))
        response_id = f"{'chatcmpl' if is_chat else 'cmpl'}-{uuid.uuid4().hex}"
        lora_request = self.lora_modules.get(request.model)
        return Job(response_id, is_chat, arrival, prompts, choice_prompt_idx, params, request.model, lora_request)

    async def _submit(self, job: Job) -> RequestStream:
        prompts = [job.prompt_token_ids[idx] for idx in job.choice_prompt_idx]
        lora_requests = None if job.lora_request is None else [job.lora_request] * len(prompts)
        try:
            stream = await self.async_llm.add_requests(prompts, job.params, lora_requests)
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e)) from e
        except EngineError as e:
            raise APIError(503, str(e)) from e
        self.metrics.prompt_tokens.inc(sum(len(ids) for ids in job.prompt_token_ids))
        self.metrics.observe("request_parse_time_seconds", job.arrival.handler_s - job.arrival.received_s)
        self.metrics.observe("request_tokenize_time_seconds", job.tokenized_s - job.arrival.handler_s)
        if job.lora_request is not None:
            self.metrics.lora_requests.labels(lora_name=job.lora_request.lora_name).inc(len(prompts))
        return stream

    async def _run(self, job: Job, request: SamplingRequest, raw_request: Request) -> Response:
        stream = await self._submit(job)
        timers = [ChoiceTimer(self.metrics, job.arrival.received_s) for _ in job.params]
        if request.stream:
            include_usage = request.stream_options is not None and request.stream_options.include_usage
            events = self._stream_events(job, stream, timers, include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        collect = asyncio.ensure_future(self._collect(stream, timers))
        try:
            while not collect.done():
                await asyncio.wait({collect}, timeout=DISCONNECT_POLL_S)
                if not collect.done() and await raw_request.is_disconnected():
                    collect.cancel()
                    return Response(status_code=CLIENT_CLOSED_STATUS)
            choices = collect.result()
        except EngineError as e:
            raise APIError(500, str(e)) from e
        finally:
            collect.cancel()  # a no-op once done; otherwise (handler cancelled) it would wait forever
            stream.abort()
        return JSONResponse(self._full_response(job, choices))

    async def _collect(self, stream: RequestStream, timers: list[ChoiceTimer]) -> list[Choice]:
        choices = [Choice() for _ in timers]
        async for idx, out in stream:
            timers[idx].record(out, stream.first_output_s)
            choices[idx].text_parts.append(out.text_delta)
            choices[idx].num_tokens += len(out.new_token_ids)
            choices[idx].finish_reason = out.finish_reason
        return choices

    async def _stream_events(
        self, job: Job, stream: RequestStream, timers: list[ChoiceTimer], include_usage: bool
    ) -> AsyncIterator[str]:
        choices = [Choice() for _ in timers]
        try:
            if job.is_chat:  # OpenAI opens each choice with the role and empty content
                role_delta = {"role": "assistant", "content": ""}
                yield sse(
                    self._chunk(job, [self._choice_delta(job, idx, role_delta, None) for idx in range(len(choices))])
                )
            async for first in stream:
                # Outputs that queued up while this stream waited for the event loop go out in one write:
                # still one chunk per step and choice, but one socket send (the loop's costliest part).
                events = []
                for idx, out in [first, *stream.take_ready()]:
                    timers[idx].record(out, stream.first_output_s)
                    choices[idx].num_tokens += len(out.new_token_ids)
                    text = {"content": out.text_delta} if job.is_chat else out.text_delta
                    events.append(sse(self._chunk(job, [self._choice_delta(job, idx, text, out.finish_reason)])))
                yield "".join(events)
            if include_usage:
                yield sse({**self._chunk(job, []), "usage": job.usage(choices)})
            yield SSE_DONE
        except EngineError as e:
            yield sse(error_body(500, str(e)))
            yield SSE_DONE
        finally:
            stream.abort()  # the client went away (or the engine failed): free the KV blocks now

    def _chunk(self, job: Job, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return self._envelope(job, "chat.completion.chunk" if job.is_chat else "text_completion", choices)

    def _envelope(self, job: Job, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        """The fields every response and stream chunk of one request shares, around its choices."""
        return {
            "id": job.response_id,
            "object": kind,
            "created": job.created,
            "model": job.model,
            "choices": choices,
        }

    @staticmethod
    def _choice_delta(job: Job, idx: int, delta: Any, finish_reason: str | None) -> dict[str, Any]:
        key = "delta" if job.is_chat else "text"
        return {"index": idx, key: delta, "logprobs": None, "finish_reason": finish_reason}

    def _full_response(self, job: Job, choices: list[Choice]) -> dict[str, Any]:
        bodies = []
        for idx, choice in enumerate(choices):
            text = "".join(choice.text_parts)
            body: dict[str, Any] = {"index": idx, "logprobs": None, "finish_reason": choice.finish_reason}
            if job.is_chat:
                body["message"] = {"role": "assistant", "content": text}
            else:
                body["text"] = text
            bodies.append(body)
        kind = "chat.completion" if job.is_chat else "text_completion"
        return {**self._envelope(job, kind, bodies), "usage": job.usage(choices)}
