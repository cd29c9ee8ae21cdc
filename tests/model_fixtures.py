"""Tiny random-weight Hugging Face model directories of real architectures, built locally.

`write_tiny_model(path, arch)` writes what a hub checkout holds (config.json, model.safetensors,
tokenizer files), so the engine loads it exactly as it would load a real model, and transformers
can run the same weights as the reference. Nothing is downloaded.

The weights are random but not the library's defaults: the init range is wide so greedy argmax
has clear winners (float rounding between two implementations should not flip a token), and
norm weights and biases are randomized too, so an engine that skips loading them is caught.
"""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    PhiConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

# Byte-level BPE merges learned on CORPUS; 256 byte tokens + this many merges, before specials.
NUM_BPE_TOKENS = 396
EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|begin_of_text|>"
SPECIAL_TOKENS = [EOS_TOKEN, BOS_TOKEN, "<|im_start|>", "<|im_end|>"]
# Model vocab is larger than the tokenizer's (~400), as in real checkpoints (Qwen pads to 64s).
VOCAB_SIZE = 512
# Std of the normal init. HF's default 0.02 gives near-flat logits (top-2 margins down to 3e-5,
# which float rounding can flip) and some models that repeat one token forever, hiding bugs.
# With 0.2 the median greedy margin is ~0.4, the smallest seen ~5e-4, and outputs vary.
INIT_RANGE = 0.2
# Norm weights are drawn from 1 + NORM_WEIGHT_STD * N(0, 1) and biases from BIAS_STD * N(0, 1).
NORM_WEIGHT_STD = 0.3
BIAS_STD = 0.3

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. A large language model predicts the next token.",
    "An inference engine keeps a cache of keys and values so each new token reads the past once.",
    "The scheduler decides which requests run in the next step: new prompts are prefilled, then",
    "every running sequence decodes one token at a time until it stops or reaches its length limit.",
    "Blocks of sixteen tokens are handed out by the block manager; a block table maps positions to",
    "slots in the cache. When two prompts share a prefix, they can share the blocks that hold it.",
    "Once upon a time there was a small model with two layers. It could not write poems, but it",
    "was fast, and the tests that used it finished in a few seconds on a laptop without a GPU.",
    "Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris.",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 10 42 100 and 2024 appear in text, as do symbols: + - * / =.",
]

# Config fields shared by every architecture. Head counts are divisible by 2 so tensor-parallel
# tests can split heads over two ranks; head_dim is hidden_size / num_attention_heads = 16 unless set.
TINY_SIZES = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "vocab_size": VOCAB_SIZE,
    "initializer_range": INIT_RANGE,
}
# Architecture name -> (config class, its own config fields). rope_theta values mostly differ from
# the 10000 default so an engine that fails to read them is caught.
ARCH_CONFIGS: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    # Qwen3: head_dim set explicitly and != hidden_size / num_heads; q/k RMSNorm; no biases.
    "qwen3": (Qwen3Config, {"head_dim": 32, "rope_theta": 1_000_000.0, "tie_word_embeddings": False}),
    # Qwen2: q/k/v projections have biases; embeddings tied (Qwen2.5 small models).
    "qwen2": (Qwen2Config, {"rope_theta": 100_000.0, "tie_word_embeddings": True}),
    # LLaMA 3.2 style: llama3 rope scaling, tied embeddings. With original_max_position_embeddings
    # 64 and head_dim 16, all but the two fastest rotary frequencies are scaled or smoothed.
    "llama": (
        LlamaConfig,
        {
            "rope_theta": 500_000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "tie_word_embeddings": True,
        },
    ),
    # LLaMA 2 style: plain rope, untied embeddings.
    "llama2": (LlamaConfig, {"rope_theta": 10_000.0, "tie_word_embeddings": False}),
    # Mistral: every layer attends through a window shorter than the longer prompts and their completions.
    "mistral": (MistralConfig, {"rope_theta": 1_000_000.0, "sliding_window": 24, "tie_word_embeddings": False}),
    # Qwen3-MoE: 8 experts, top-2, weights not renormalised; layer 0 keeps the dense MLP (mlp_only_layers), so
    # both kinds of layer run, and an expert's width (moe_intermediate_size) differs from the dense one's.
    "qwen3_moe": (
        Qwen3MoeConfig,
        {
            "head_dim": 32,
            "rope_theta": 1_000_000.0,
            "tie_word_embeddings": False,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "norm_topk_prob": False,
            "mlp_only_layers": [0],
        },
    ),
    # Mixtral: every layer sparse, 4 experts of intermediate_size, top-2, weights renormalised.
    "mixtral": (
        MixtralConfig,
        {"rope_theta": 1_000_000.0, "sliding_window": None, "num_local_experts": 4, "num_experts_per_tok": 2},
    ),
}
# Families tested with one workload each by tests/test_families.py (not the whole of tests/test_models.py, to
# keep CI short). Config values differ from the defaults wherever an engine could ignore them unseen.
FAMILY_CONFIGS: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    # Gemma 3: layer 0 slides over 16 keys with rotary base 500, layer 1 is global with base 50000 and linear
    # scaling; q.k scaled by query_pre_attn_scalar (not head_dim); final logits soft-capped.
    "gemma3": (
        Gemma3TextConfig,
        {
            "head_dim": 16,
            "sliding_window": 16,
            "sliding_window_pattern": 2,
            "rope_local_base_freq": 500.0,
            "rope_theta": 50_000.0,
            "rope_scaling": {"rope_type": "linear", "factor": 2.0},
            "query_pre_attn_scalar": 24,
            "final_logit_softcapping": 15.0,
            "tie_word_embeddings": True,
        },
    ),
    # Phi-3: fused qkv and gate_up tensors, a window, rotary over 12 of 16 dimensions (Phi-4-mini's 0.75) with
    # LongRoPE; sequences stay below original_max_position_embeddings, where transformers uses the short factors.
    "phi3": (
        Phi3Config,
        {
            "rope_theta": 20_000.0,
            "partial_rotary_factor": 0.75,
            "sliding_window": 24,
            "original_max_position_embeddings": 128,
            "rope_scaling": {
                "rope_type": "longrope",
                "short_factor": [1.0, 1.3, 1.7, 2.2, 3.0, 4.5],
                "long_factor": [1.5, 2.5, 4.0, 6.0, 9.0, 14.0],
            },
            "tie_word_embeddings": False,
        },
    ),
    # phi-2: LayerNorm, attention and MLP in parallel, rotary over half of each head, exact GELU (phi-2's own
    # config says gelu_new, which GPT-2 below covers), biases everywhere including the LM head.
    "phi": (PhiConfig, {"partial_rotary_factor": 0.5, "rope_theta": 30_000.0, "hidden_act": "gelu"}),
    # GPT-2: learned positions, Conv1D weights, tied head; each layer's scores divided by its number too.
    "gpt2": (GPT2Config, {"n_inner": 128, "activation_function": "gelu_new", "scale_attn_by_inverse_layer_idx": True}),
}

# Model directories the `tiny_models` fixture builds: name -> (arch, legacy_rope_keys).
# The legacy variants hold the same weights as their base arch, with config.json in pre-5 form.
TINY_MODEL_VARIANTS: dict[str, tuple[str, bool]] = {
    **{arch: (arch, False) for arch in ARCH_CONFIGS},
    "llama_legacy_rope": ("llama", True),
    "qwen3_legacy_rope": ("qwen3", True),
}


@lru_cache(maxsize=1)
def _train_tokenizer() -> Tokenizer:
    """Train the byte-level BPE once per process (~0.1 s); the result is deterministic."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=NUM_BPE_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    # Added after training so the special ids sit at the end of the vocab, as in Qwen and LLaMA 3.
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh transformers tokenizer wrapping the shared trained BPE (no BOS added on encode)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(),
        eos_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=SPECIAL_TOKENS[2:],
        chat_template=CHAT_TEMPLATE,
    )


def make_config(arch: str, tokenizer: PreTrainedTokenizerFast, **config_overrides: Any) -> PretrainedConfig:
    """The transformers config object for `arch` at tiny size, with the tokenizer's special ids."""
    configs = {**ARCH_CONFIGS, **FAMILY_CONFIGS}
    if arch not in configs:
        raise ValueError(f"arch={arch!r} is not one of {sorted(configs)}")
    config_cls, arch_fields = configs[arch]
    # Only the sizes the family's config has a field for (GPT-2 has no num_key_value_heads).
    known = set(getattr(config_cls, "__dataclass_fields__", {})) | set(config_cls.attribute_map)
    sizes = {key: value for key, value in TINY_SIZES.items() if key in known}
    fields = {**sizes, **arch_fields, **config_overrides}
    return config_cls(
        **fields,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _randomize_norms_and_biases(model: torch.nn.Module) -> None:
    """HF inits norm weights to 1 and biases to 0, which an engine that never loads them matches."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(BIAS_STD * torch.randn_like(param))
            elif "norm" in name:
                param.copy_(1.0 + NORM_WEIGHT_STD * torch.randn_like(param))


def _rewrite_rope_keys_legacy(config_path: Path) -> None:
    """Rewrite config.json from transformers 5's `rope_parameters` to the pre-5 form that most
    hub checkpoints still carry: top-level `rope_theta`, `rope_scaling` (null when plain rope),
    and no `head_dim` when it is just hidden_size // num_attention_heads."""
    config = json.loads(config_path.read_text())
    rope_parameters = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope_parameters.pop("rope_theta")
    is_plain_rope = rope_parameters.get("rope_type", "default") == "default" and len(rope_parameters) <= 1
    config["rope_scaling"] = None if is_plain_rope else rope_parameters
    if config.get("head_dim") == config["hidden_size"] // config["num_attention_heads"]:
        del config["head_dim"]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _name_tokenizer_class(tokenizer_config_path: Path) -> None:
    """transformers 5 writes its own "TokenizersBackend", which transformers 4 cannot load; hub
    checkpoints with a tokenizer.json only (LLaMA 3) say "PreTrainedTokenizerFast", which both load."""
    tokenizer_config = json.loads(tokenizer_config_path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config_path.write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")


def write_tiny_model(
    path: Path, arch: str, seed: int = 0, *, legacy_rope_keys: bool = False, **config_overrides: Any
) -> Path:
    """Write a tiny random-weight model of `arch` (a key of ARCH_CONFIGS or FAMILY_CONFIGS) to `path`; return it.

    The same (arch, seed, config_overrides) always gives the same weights, so a `legacy_rope_keys`
    directory holds the same model as the default one with only config.json spelled differently.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    config = make_config(arch, tokenizer, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize_norms_and_biases(model)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    _name_tokenizer_class(path / "tokenizer_config.json")
    if legacy_rope_keys:
        _rewrite_rope_keys_legacy(path / "config.json")
    return path


@dataclass(frozen=True)
class GreedyReference:
    """What transformers generates greedily for one prompt."""

    token_ids: list[int]  # generated tokens, prompt excluded; EOS does not stop generation
    top2_margins: list[float]  # per step, logit of the argmax minus the runner-up (a near-tie is < 1e-4)


@lru_cache(maxsize=16)
def load_hf_model(model_dir: str) -> torch.nn.Module:
    """The transformers model in float32, loaded once per directory per process."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@lru_cache(maxsize=256)
def hf_greedy_reference(model_dir: str, prompt_ids: tuple[int, ...], max_tokens: int) -> GreedyReference:
    """Greedy decoding with transformers, one prompt at a time (no padding), EOS not stopping.

    Every step re-runs the whole sequence without a KV cache: slower than `generate` but obviously
    correct, and free of generation-config defaults (EOS, repetition penalty) that could leak in.
    """
    return greedy_reference(load_hf_model(model_dir), prompt_ids, max_tokens)


def greedy_reference(model: torch.nn.Module, prompt_ids: tuple[int, ...], max_tokens: int) -> GreedyReference:
    """hf_greedy_reference's loop on a transformers model already loaded (e.g. one with an adapter merged in)."""
    token_ids = list(prompt_ids)
    top2_margins: list[float] = []
    with torch.inference_mode():
        for _ in range(max_tokens):
            logits = model(torch.tensor([token_ids])).logits[0, -1]  # [vocab_size]
            top2 = logits.topk(2).values
            top2_margins.append(float(top2[0] - top2[1]))
            token_ids.append(int(logits.argmax()))
    return GreedyReference(token_ids=token_ids[len(prompt_ids) :], top2_margins=top2_margins)


@contextmanager
def uninitialized_memory_as_nan() -> Iterator[None]:
    """Inside, torch.empty and friends return NaN-filled float (and max-int integer) tensors.

    An engine that reads KV-cache slots or buffer entries it never wrote usually gets away with it
    on CPU, where fresh memory is often zero, and fails only now and then; with this it fails every
    time. Uses PyTorch's deterministic mode (warn-only, so no op refuses to run), restored after.
    """
    was_enabled = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_enabled, warn_only=was_warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = was_filling


if __name__ == "__main__":  # python tests/model_fixtures.py DIR [ARCH]: a tiny model to try example.py or the server
    import sys

    if len(sys.argv) not in (2, 3) or (len(sys.argv) == 3 and sys.argv[2] not in ARCH_CONFIGS):
        raise SystemExit(f"usage: python tests/model_fixtures.py DIR [{'|'.join(ARCH_CONFIGS)}]")
    print(write_tiny_model(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) == 3 else "qwen3"))
