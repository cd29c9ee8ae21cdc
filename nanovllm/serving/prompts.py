"""Prompt text to token ids for the server, off the event loop.

Tokenizing a long prompt, or rendering a chat template, holds a CPU for as long as the text is long: on
the event loop it would hold every other request and every stream with it. Here it runs in a small thread
pool, each thread with its own copy of the tokenizer (a fast tokenizer must not be used by two threads at
once; its Rust core lets go of the GIL while it works). Two cheap checks come first, on the event loop:

- text that is not valid Unicode (a lone surrogate such as "\\ud800", which JSON can carry) is a 400 that
  names its field: no tokenizer can encode it (``check_encodable``, for every string of a request);
- a text whose character count alone proves it longer than max_model_len is a 400 without being tokenized
  (``token_bounds.max_chars_per_token``).
"""

import asyncio
import copy
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pydantic import BaseModel
from transformers import PreTrainedTokenizerBase

from nanovllm.serving.errors import APIError
from nanovllm.serving.token_bounds import max_chars_per_token

NUM_TOKENIZER_THREADS = 2  # one long prompt being tokenized leaves a thread for the short ones
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # OpenAI's error code for a prompt over the context
T = TypeVar("T")


def check_encodable(value: Any, field: str) -> None:
    """A 400 naming the field if a string anywhere in ``value`` (a request, or lists, dicts and models in it) is not
    valid Unicode. Lists of token ids are skipped whole."""
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                message = (
                    f"{field} holds text that is not valid Unicode: {value[e.start]!r} at character {e.start} "
                    "(a lone UTF-16 surrogate); send valid text"
                )
                raise APIError(400, message, param=field) from None
    elif isinstance(value, BaseModel):
        for name, item in value:
            check_encodable(item, f"{field}.{name}" if field else name)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_encodable(key, field)
            check_encodable(item, f"{field}.{key}")
    elif isinstance(value, list) and value and not isinstance(value[0], int):
        for idx, item in enumerate(value):
            check_encodable(item, f"{field}.{idx}")


class PromptTokenizer:
    """Encodes prompts and renders chat templates in a thread pool; refuses what can never fit first."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_model_len: int) -> None:
        self.max_model_len = max_model_len  # longest prompt + completion the engine takes, in tokens
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.max_chars_per_token = max_chars_per_token(tokenizer)  # None: no length check before tokenizing
        copies: queue.SimpleQueue[PreTrainedTokenizerBase] = queue.SimpleQueue()
        for _ in range(NUM_TOKENIZER_THREADS):
            copies.put(copy.deepcopy(tokenizer))
        self._local = threading.local()  # .tokenizer: the copy of the pool thread that reads it
        self._pool = ThreadPoolExecutor(
            NUM_TOKENIZER_THREADS, "nanovllm-tokenize", initializer=self._take_copy, initargs=(copies,)
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def encode(self, text: str, field: str) -> list[int]:
        """Token ids of a completion prompt (special tokens such as BOS added); a 400 naming ``field`` on failure."""
        self.check_length(text, field)
        return await self._in_pool(self._encode, text, field, True)

    async def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[int]:
        """Token ids of the chat template rendered over ``messages``."""
        return await self._in_pool(self._render_and_encode, messages, add_generation_prompt)

    def check_length(self, text: str, field: str) -> None:
        """A 400 when ``text`` is provably at least max_model_len tokens, which leaves no room to generate."""
        if self.max_chars_per_token is None:
            return
        min_tokens = -(-len(text) // self.max_chars_per_token)
        if min_tokens >= self.max_model_len:
            message = (
                f"{field} has {len(text)} characters, so at least {min_tokens} tokens (no token of this model "
                f"stands for more than {self.max_chars_per_token} characters), which leaves no room to generate "
                f"within max_model_len={self.max_model_len}; shorten it"
            )
            raise APIError(400, message, param=field, code=CONTEXT_LENGTH_EXCEEDED)

    async def _in_pool(self, work: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, work, *args)

    def _take_copy(self, copies: "queue.SimpleQueue[PreTrainedTokenizerBase]") -> None:
        self._local.tokenizer = copies.get()

    def _encode(self, text: str, field: str, add_special_tokens: bool) -> list[int]:
        try:
            return list(self._local.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        except Exception as e:
            raise APIError(400, f"{field} could not be tokenized ({type(e).__name__}: {e})", param=field) from e

    def _render_and_encode(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[int]:
        try:
            rendered = self._local.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:  # jinja errors, including the template's own raise_exception
            raise APIError(400, f"the chat template could not render these messages: {e}", "messages") from e
        self.check_length(str(rendered), "messages")
        return self._encode(str(rendered), "messages", False)  # the template wrote any special tokens itself
