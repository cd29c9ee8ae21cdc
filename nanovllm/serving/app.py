"""The FastAPI app: routes, API key, error handlers, metrics, all over one AsyncLLM."""

import copy
import time
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request, Response

from nanovllm.lora_request import LoRARequest
from nanovllm.serving.async_llm import AsyncLLM
from nanovllm.serving.errors import APIError, APIKeyMiddleware, install_error_handlers
from nanovllm.serving.metrics import ServerMetrics
from nanovllm.serving.openai_api import OpenAIServing
from nanovllm.serving.protocol import ChatCompletionRequest, CompletionRequest

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def build_app(
    async_llm: AsyncLLM, model_name: str, api_key: str | None = None, lora_modules: Sequence[LoRARequest] = ()
) -> FastAPI:
    """An app serving `async_llm` as `model_name`, and each of `lora_modules` under its own name (a request's
    `model` picks one); /v1/ routes need `api_key` when one is given.

    The caller owns `async_llm` (its shutdown is not tied to the app's lifetime).
    """
    app = FastAPI(title="nanovllm", description="OpenAI-compatible server over a nanovllm engine")
    install_error_handlers(app)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    metrics = ServerMetrics(async_llm)
    tokenizer = copy.deepcopy(async_llm.tokenizer)  # fast tokenizers must not be shared across threads
    serving = OpenAIServing(async_llm, tokenizer, model_name, metrics, lora_modules)
    created = int(time.time())

    @app.get("/health")
    async def health() -> Response:
        if not async_llm.is_running:
            raise APIError(503, "the engine has stopped; restart the server")
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=PROMETHEUS_CONTENT_TYPE)

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
