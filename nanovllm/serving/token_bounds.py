"""A bound that proves a text too long for the model from its length in characters, without tokenizing it.

If no token stands for more than K characters of input, a text of C characters is at least C / K tokens.
Tokenizing a megabyte prompt takes seconds; counting its characters does not. The bound holds only when
each step of the tokenizer keeps the text's characters or shrinks them by a known factor, so it is read
off the tokenizer's own description (tokenizer.json) and given only where every step is one of these:

- normalizer: none, Unicode normalization (NFC and NFKC compose at most COMPOSED_MAX_CODE_POINTS code points
  into one), lowercasing, prepending, or replacing a fixed string by a non-empty one; not stripping or
  removing characters (accents, control characters), which can shrink a text without limit.
- pre-tokenizer: splitting that keeps every character (byte-level, metaspace, digits, punctuation, a split
  not set to remove its matches); not whitespace splitting, which drops the spaces.
- model: BPE that cannot fuse a run of unknown characters into one token (byte-level vocabularies never
  meet one; SentencePiece's byte fallback spells them in bytes).

Then K = the longest token in the vocabulary (special tokens included; a byte-level vocabulary spells a byte
as one character, and a byte is at most one character of text) times the normalizer's shrink factor.
"""

import json
from typing import Any

from transformers import PreTrainedTokenizerBase

COMPOSED_MAX_CODE_POINTS = 4  # the longest canonical decomposition in Unicode (U+1F82) has 4 code points
SAME_LENGTH_NORMALIZERS = frozenset({"NFD", "NFKD", "Lowercase", "Prepend"})  # never shorten the text
COMPOSING_NORMALIZERS = frozenset({"NFC", "NFKC"})
CHARACTER_KEEPING_PRE_TOKENIZERS = frozenset({"ByteLevel", "Metaspace", "Digits", "UnicodeScripts"})
REMOVING_BEHAVIOR = "Removed"  # a Split or Punctuation pre-tokenizer with this behavior drops what it matches


def max_chars_per_token(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The most characters of input text that one token can stand for; None where the tokenizer gives no bound."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None  # a slow (Python) tokenizer: no description to read
    spec = json.loads(backend.to_str())
    shrink = normalizer_shrink(spec.get("normalizer"))
    if shrink is None or not keeps_characters(spec.get("pre_tokenizer")) or not is_bounded_model(spec["model"]):
        return None
    longest = max((len(token) for token in tokenizer.get_vocab()), default=0)
    return longest * shrink if longest else None


def normalizer_shrink(spec: dict[str, Any] | None) -> int | None:
    """By how much the normalizer can shorten a text at most (1: never); None when without limit or unknown."""
    if spec is None or spec["type"] in SAME_LENGTH_NORMALIZERS:
        return 1
    if spec["type"] in COMPOSING_NORMALIZERS:
        return COMPOSED_MAX_CODE_POINTS
    if spec["type"] == "Replace":
        pattern, content = spec.get("pattern", {}).get("String"), spec.get("content", "")
        return -(-len(pattern) // len(content)) if pattern and content else None
    if spec["type"] == "Sequence":
        factor = 1
        for step in spec["normalizers"]:
            step_factor = normalizer_shrink(step)
            if step_factor is None:
                return None
            factor *= step_factor
        return factor
    return None


def keeps_characters(spec: dict[str, Any] | None) -> bool:
    """Whether the pre-tokenizer passes every character on to the model."""
    if spec is None or spec["type"] in CHARACTER_KEEPING_PRE_TOKENIZERS:
        return True
    if spec["type"] in ("Split", "Punctuation"):
        return spec.get("behavior") != REMOVING_BEHAVIOR
    if spec["type"] == "Sequence":
        return all(keeps_characters(step) for step in spec["pretokenizers"])
    return False


def is_bounded_model(spec: dict[str, Any]) -> bool:
    """Whether every token the model emits is one vocabulary entry's worth of text (no fused unknown runs)."""
    if spec.get("type") != "BPE":
        return False
    return bool(spec.get("byte_fallback")) or not spec.get("fuse_unk") or spec.get("unk_token") is None
