"""Serving: the engine loop behind asyncio callers, and the OpenAI-compatible HTTP server over it."""
