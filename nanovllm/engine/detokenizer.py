"""Incremental detokenization: the text each new token adds, without splitting a character.

Byte-level tokenizers can split one character over several tokens (an emoji is often three or
four byte tokens). Decoding such a partial sequence yields U+FFFD, so a delta is emitted only
once the decoded window no longer ends in it. Decoding only a short window of recent tokens,
rather than the whole completion each step, keeps the cost per token constant:

    token_ids:  | ... already emitted ... | prefix | unread |
                                          ^ prefix_offset   ^ read_offset
    delta = decode(prefix + unread) minus decode(prefix)

The prefix gives the tokenizer the context it needs (e.g. for a leading space).
"""

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase

REPLACEMENT_CHAR = "\ufffd"  # what a decoder yields for an incomplete multi-byte character


class IncrementalDetokenizer:
    """Turns one completion's growing token ids into text deltas whose concatenation is its text."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # A fast tokenizer's decode() is its Rust backend's decode plus optional space clean-up; without
        # the clean-up, calling the backend directly gives the same text in a third of the time (this
        # runs twice per completion per step).
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = None if getattr(tokenizer, "clean_up_tokenization_spaces", True) else backend
        # The backend's own incremental decoder runs the same window rule in Rust, one call per token, in
        # 40% of the time of the Python rule below (this runs for every streamed row of every step).
        self._stream = None if self._backend is None else DecodeStream(skip_special_tokens=skip_special_tokens)
        self.token_ids: list[int] = []  # the completion's tokens so far
        self.prefix_offset = 0  # start of the context window decoded with the unread tokens
        self.read_offset = 0  # tokens before this index are already part of `text`
        self.text = ""  # the text emitted so far: the concatenation of every delta

    def _decode(self, token_ids: list[int]) -> str:
        if self._backend is not None:
            return str(self._backend.decode(token_ids, skip_special_tokens=self.skip_special_tokens))
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens))

    def push(self, new_token_ids: list[int]) -> str:
        """Add tokens; return the text they complete ("" while a character is still incomplete)."""
        delta = ""
        for token_id in new_token_ids:
            self.token_ids.append(token_id)
            if self._stream is None or self._backend is None:  # no stream: the Python rule, after the loop
                continue
            try:
                chunk = self._stream.step(self._backend, token_id)
            except Exception:  # the window's text does not extend its prefix's: the Python rule takes over
                self._stream = None
                continue
            if chunk is not None:
                delta += chunk
                self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        if self._stream is None:
            delta += self._read_window()
        self.text += delta
        return delta

    def _read_window(self) -> str:
        """The text the unread tokens complete, read off a decode of the window against one of its prefix."""
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        window_text = self._decode(self.token_ids[self.prefix_offset :])
        if window_text.endswith(REPLACEMENT_CHAR) or len(window_text) <= len(prefix_text):
            return ""  # an incomplete character, or tokens with no text (skipped specials): wait
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return window_text[len(prefix_text) :]

    def flush(self) -> str:
        """At the end of the completion: whatever is still held back (a character that never completed)."""
        if self.read_offset == len(self.token_ids):
            return ""
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        delta = self._decode(self.token_ids[self.prefix_offset :])[len(prefix_text) :]
        self.prefix_offset = self.read_offset = len(self.token_ids)
        self.text += delta
        return delta
