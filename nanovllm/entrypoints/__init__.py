"""The OpenAI-compatible HTTP server: request models, errors, metrics, handlers and the app (see nanovllm.serve)."""
