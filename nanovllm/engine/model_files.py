"""What the engine reads from the model directory besides the weights: the tokenizer, the end-of-sequence
ids, and how long a sequence may be."""

import json
import os

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from nanovllm.config import EngineConfig
from nanovllm.models.arch import ModelArch

TOKENIZER_PROBE = "Hello"  # text every real tokenizer turns into at least one token
# The files a Hugging Face tokenizer is built from (fast, SentencePiece, byte-level BPE, WordPiece).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer_config.json",
)


def effective_max_model_len(config: EngineConfig, arch: ModelArch) -> int:
    """config.max_model_len clamped to the model's limit (every attention backend masks sliding windows)."""
    return min(config.max_model_len, arch.max_position_embeddings)


def load_tokenizer(model_dir: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer; an error naming the files it looked for when there is none, or it is empty."""
    fix = "copy the model's tokenizer files there, or pass skip_tokenizer_init=True and give prompts as token ids"
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load a tokenizer from {model_dir} ({e}); {fix}") from e
    # Without tokenizer files, transformers may build an empty tokenizer that turns every text into no tokens.
    if not tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False):
        present = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(model_dir, name))]
        raise ValueError(
            f"the tokenizer in {model_dir} is empty: it turns {TOKENIZER_PROBE!r} into no tokens. The directory has "
            f"{present or 'none'} of the tokenizer files {list(TOKENIZER_FILES)}; {fix}"
        )
    return tokenizer


def read_eos_token_ids(model_dir: str, arch: ModelArch, tokenizer: PreTrainedTokenizerBase | None) -> set[int]:
    """Every end-of-sequence id named by config.json, generation_config.json and the tokenizer."""
    eos_ids = set(arch.eos_token_ids)
    path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        eos_ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    return eos_ids
