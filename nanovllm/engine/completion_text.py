"""One completion's text as its tokens arrive: detokenized, checked for stop strings, released in safe deltas.

A stop string can span tokens ("Hel" + "lo" matches "Hello"), so each step searches the text
from ``len(longest stop string) - 1`` characters before the new text. A streamed delta must
never contain text that a later stop string would cut, so the last ``len(longest) - 1``
characters are held back until the completion finishes:

    text:   | emitted | may still start a stop string (held back) |
                      ^ num_emitted_chars
"""

from transformers import PreTrainedTokenizerBase

from nanovllm.engine.detokenizer import IncrementalDetokenizer
from nanovllm.sampling_params import SamplingParams


class CompletionText:
    """The text of one completion, cut at the first stop string (kept when include_stop_str_in_output)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, params: SamplingParams) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer, params.skip_special_tokens)
        self.stop_strings = params.stop_strings
        self.include_stop_string = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens  # stop strings count only from this many tokens on (as vLLM)
        self.num_held_chars = max((len(s) for s in self.stop_strings), default=1) - 1
        self.text = ""  # the completion's text so far, cut at a matched stop string
        self.matched_stop: str | None = None  # the stop string that ended the completion
        self.num_emitted_chars = 0  # characters of `text` already handed out as deltas

    def push(self, new_token_ids: list[int]) -> str | None:
        """Add tokens; returns the stop string they completed, if any (the completion must then finish)."""
        if self.matched_stop is not None:
            return self.matched_stop
        if not self.stop_strings:  # nothing to search for (most requests): the text is the detokenizer's
            self.detokenizer.push(new_token_ids)
            self.text = self.detokenizer.text
            return None
        search_from = max(0, len(self.detokenizer.text) - self.num_held_chars)
        self.detokenizer.push(new_token_ids)
        return self._search(search_from)

    def finish(self) -> None:
        """The completion ended: whatever the detokenizer still held (an unfinished character) joins the text."""
        if self.matched_stop is None:
            search_from = max(0, len(self.detokenizer.text) - self.num_held_chars)
            self.detokenizer.flush()
            self._search(search_from)

    def _search(self, search_from: int) -> str | None:
        full_text = self.detokenizer.text
        if self.stop_strings and len(self.detokenizer.token_ids) >= self.min_tokens:
            matches = [(full_text.find(s, search_from), s) for s in self.stop_strings]
            found = [(idx, s) for idx, s in matches if idx >= 0]
            if found:
                idx, stop = min(found)  # the earliest match ends the text
                self.matched_stop = stop
                self.text = full_text[: idx + len(stop)] if self.include_stop_string else full_text[:idx]
                return stop
        self.text = full_text
        return None

    def take_delta(self, is_finished: bool) -> str:
        """The text not handed out yet, minus what a stop string could still cut unless the completion finished."""
        end = len(self.text) if is_finished else max(self.num_emitted_chars, len(self.text) - self.num_held_chars)
        delta = self.text[self.num_emitted_chars : end]
        self.num_emitted_chars = end
        return delta
