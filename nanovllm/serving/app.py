"""The FastAPI app: routes, API key, body-size cap, error handlers, metrics, all over one AsyncLLM."""

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response

from nanovllm.lora_request import LoRARequest
from nanovllm.serving.async_llm import AsyncLLM
from nanovllm.serving.errors import APIError, APIKeyMiddleware, install_error_handlers
from nanovllm.serving.limits import ServerLimits
from nanovllm.serving.metrics import ServerMetrics
from nanovllm.serving.openai_api import OpenAIServing
from nanovllm.serving.prompts import PromptTokenizer
from nanovllm.serving.protocol import ChatCompletionRequest, CompletionRequest
from nanovllm.serving.request_body import RequestBodyLimit

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def build_app(
    async_llm: AsyncLLM,
    model_name: str,
    api_key: str | None = None,
    limits: ServerLimits | None = None,
    lora_modules: Sequence[LoRARequest] = (),
) -> FastAPI:
    """An app serving `async_llm` as `model_name`, and each of `lora_modules` under its own name (a request's
    `model` picks one); /v1/ routes need `api_key` when one is given.

    The caller owns `async_llm` (its shutdown is not tied to the app's lifetime).
    """
    limits = limits or ServerLimits()
    tokenizer = async_llm.tokenizer
    prompts = None if tokenizer is None else PromptTokenizer(tokenizer, async_llm.max_model_len)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if prompts is not None:
            prompts.close()

    app = FastAPI(title="nanovllm", description="OpenAI-compatible server over a nanovllm engine", lifespan=lifespan)
    install_error_handlers(app)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.add_middleware(RequestBodyLimit, max_bytes=limits.max_request_body_bytes)  # outermost: added last
    metrics = ServerMetrics(async_llm)
    serving = OpenAIServing(async_llm, prompts, model_name, metrics, limits, lora_modules)
    created = int(time.time())

    @app.get("/health")
    async def health() -> Response:
        if not async_llm.is_running:
            raise APIError(503, "the engine has stopped; restart the server")
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=PROMETHEUS_CONTENT_TYPE)

    @app.get("/metrics/samples")
    async def latency_samples(latest: int = 0) -> dict[str, Any]:
        """Each latency histogram's count and its ``latest`` raw observations (seconds): exact percentiles."""
        return metrics.samples(latest)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "nanovllm",
            "max_model_len": async_llm.max_model_len,
        }
        adapters = [
            {**card, "id": lora.lora_name, "root": lora.lora_path, "parent": model_name} for lora in lora_modules
        ]
        return {"object": "list", "data": [card, *adapters]}

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, raw_request: Request) -> Response:
        return await serving.completions(request, raw_request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, raw_request: Request) -> Response:
        return await serving.chat_completions(request, raw_request)

    return app
