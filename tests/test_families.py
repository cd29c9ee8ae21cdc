"""The model families beyond LLaMA's (Gemma 3, Phi-3, Phi, GPT-2) and Mistral's sliding window, against
transformers on the same random weights (tests/model_fixtures.py), in float32 on CPU.

Each family runs one workload in one engine under pressure: a KV cache too small for the crowded batch
(preemption), a token budget smaller than the longer prompts (chunked prefill), and prompts that share an
earlier prompt's first blocks (prefix-cache hits); the windowed families' prompts and completions run past
their windows. Every greedy token must equal transformers'. Then: tensor parallelism for one family, the
config errors raised before any weight loads, and the pieces transformers' own forward does not reach
(LongRoPE past its original length, GPT-2 checkpoints as the hub stores them).
"""

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from model_fixtures import hf_greedy_reference
from safetensors.torch import load_file, save_file
from test_tp import BASE_ARGS, TIGHT_ARGS, assert_no_tensor_parallel_left, workload

from nanovllm import LLM, SamplingParams

FAMILIES = ["gemma3", "phi3", "phi", "gpt2", "mistral"]
WINDOWED = {"gemma3": 16, "phi3": 24, "mistral": 24}  # family -> its fixture's sliding_window
MAX_TOKENS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
MIN_TOP2_MARGIN = 1e-4  # as tests/test_models.py: below this float rounding alone could flip a token
NO_WINDOW = 1024  # a window no test sequence reaches: the same model attending to everything


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """These models are tiny: one thread runs them faster than two, which wait on each other every op."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


@pytest.fixture(scope="module")
def family_dirs(tiny_model_dir: Callable[..., Path]) -> dict[str, Path]:
    return {family: tiny_model_dir(family) for family in FAMILIES}


def reference_ids(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    """transformers' greedy tokens; fails (as a fixture fault) on a near-tie that rounding could flip."""
    refs = [hf_greedy_reference(str(model_dir), tuple(prompt), MAX_TOKENS) for prompt in prompts]
    margin = min(min(ref.top2_margins) for ref in refs)
    assert margin > MIN_TOP2_MARGIN, f"{model_dir.name}: the fixture's top-2 margin {margin:.2e} is a near-tie"
    return [ref.token_ids for ref in refs]


def run_workload(model_dir: Path, **engine_args: Any) -> tuple[list[list[list[int]]], int, int]:
    """Each call of workload() through one engine: its tokens, preemptions and prefix-cache hit tokens."""
    with LLM(str(model_dir), **{**BASE_ARGS, **TIGHT_ARGS, **engine_args}) as llm:
        got = [[out.token_ids for out in llm.generate(prompts, GREEDY, use_tqdm=False)] for prompts in workload()]
        assert llm.engine is not None
        return got, llm.engine.scheduler.num_preemptions, llm.prefix_cache_stats().num_hit_tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_transformers_under_pressure(family_dirs: dict[str, Path], family: str) -> None:
    """Guards against a family's forward differing from transformers' (norm kind and its (1 + w) or bias, GELU
    flavour, partial or LongRoPE rotary, learned positions, parallel or sandwiched blocks, scaled embeddings,
    soft-capped logits, q.k scale, each layer's rope base, checkpoint renames, transposes and fused tensors),
    and against a sliding window masked wrongly once prompts and completions pass it, in prefill chunks,
    after preemption's recompute, and over cached prefix blocks."""
    got, num_preemptions, num_hit_tokens = run_workload(family_dirs[family])
    for call, (prompts, have) in enumerate(zip(workload(), got, strict=True)):
        want = reference_ids(family_dirs[family], prompts)
        for prompt, have_ids, want_ids in zip(prompts, have, want, strict=True):
            assert have_ids == want_ids, f"{family} call {call}, {len(prompt)}-token prompt: {have_ids} != {want_ids}"
    longest = max(len(prompt) for prompts in workload() for prompt in prompts)
    assert longest > TIGHT_ARGS["max_num_batched_tokens"], f"no prompt of {longest} tokens is chunked"
    assert longest > WINDOWED.get(family, 0), f"no prompt of {longest} tokens passes the window"
    assert num_preemptions > 0 and num_hit_tokens > 0, f"preemptions {num_preemptions}, hit tokens {num_hit_tokens}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", FAMILIES)
def test_family_on_gpu_matches_transformers(family_dirs: dict[str, Path], family: str) -> None:
    """Guards against the compiled Triton kernels (sliding-window masks, head sizes other than the Qwen
    shapes') and decode steps replayed from CUDA graphs diverging from the CPU path: the same workload in
    float32 on the GPU, every greedy token equal to transformers'."""
    got, _, _ = run_workload(family_dirs[family], device="cuda", attention_backend="triton")
    for call, (prompts, have) in enumerate(zip(workload(), got, strict=True)):
        assert have == reference_ids(family_dirs[family], prompts), f"{family} call {call} on the GPU"


@pytest.mark.parametrize("family", ["gemma3", "mistral"])
def test_fixture_window_changes_tokens(family_dirs: dict[str, Path], tiny_model_dir: Callable, family: str) -> None:
    """Guards the test above against being toothless: with the window as wide as the context, transformers
    must give other tokens for the longest prompt, so an engine that ignored the window would be caught."""
    longest = max((prompt for prompts in workload() for prompt in prompts), key=len)
    unwindowed = tiny_model_dir(family, sliding_window=NO_WINDOW)  # the same seed: the same weights
    windowed_ids = reference_ids(family_dirs[family], [longest])
    assert reference_ids(unwindowed, [longest]) != windowed_ids, f"{family}: the window changes nothing"


def test_tp2_phi_matches_transformers(family_dirs: dict[str, Path]) -> None:
    """Guards against a mis-sharded piece of the families' layers: the LM head's bias split by vocabulary, the
    plain MLP's biased column/row pair, LayerNorm, partial rotary per head, and the parallel layer's two
    all-reduces (attention and MLP) summed into one stream."""
    got, _, _ = run_workload(family_dirs["phi"], tensor_parallel_size=2)
    for call, (prompts, have) in enumerate(zip(workload(), got, strict=True)):
        want = reference_ids(family_dirs["phi"], prompts)
        assert have == want, f"call {call}: TP=2 tokens {have} != transformers' {want}"
    assert_no_tensor_parallel_left()


def edited_config_dir(model_dir: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A directory holding only the model's config.json, edited: no weights, so an error must come first."""
    config = json.loads((model_dir / "config.json").read_text())
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


BAD_CONFIGS = {
    # name: (family, edit of config.json, expected error)
    "architecture": (
        "gpt2",
        lambda c: c.update(architectures=["MambaForCausalLM"], model_type="mamba"),
        r"architecture 'MambaForCausalLM' \(model_type 'mamba'\).*not supported; supported: GPT2LMHeadModel, "
        r"Gemma3ForCausalLM, LlamaForCausalLM",
    ),
    "activation": (
        "gpt2",
        lambda c: c.update(activation_function="relu"),
        r"activation 'relu' is not supported; supported: silu, swish, gelu, gelu_new, gelu_pytorch_tanh",
    ),
    "rope_type": (
        "mistral",
        lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}),
        r"rope type 'yarn' in config.json is not supported; supported: \('default', 'linear', 'llama3', 'longrope'",
    ),
    "option": ("phi", lambda c: c.update(qk_layernorm=True), r"qk_layernorm=True is not supported for PhiForCausalLM"),
    "attention_softcap": (
        "gemma3",
        lambda c: c.update(attn_logit_softcapping=50.0),
        r"attn_logit_softcapping=50.0 is not supported for Gemma3ForCausalLM; supported: None",
    ),
    "layer_type": (
        "gemma3",
        lambda c: c.update(layer_types=["chunked_attention", "full_attention"]),
        r"layer_types holds \['chunked_attention'\]; supported layer types: \('full_attention', 'sliding_attention'\)",
    ),
    "longrope_factors": (
        "phi3",
        lambda c: c["rope_parameters"].update(short_factor=[1.0, 2.0]),
        r"longrope short_factor has 2 values; head_dim=16 with partial_rotary_factor=0.75 needs 6",
    ),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_unsupported_config_is_refused_before_weights(family_dirs: dict[str, Path], tmp_path: Path, case: str) -> None:
    """Guards against an unsupported architecture, activation, rope type, layer type or option running anyway
    (silently as something else) or failing late, after workers start and weights load, with an obscure error."""
    family, edit, message = BAD_CONFIGS[case]
    with pytest.raises(ValueError, match=message):
        LLM(str(edited_config_dir(family_dirs[family], tmp_path, edit)), **BASE_ARGS)


def to_legacy_gemma3(config: dict[str, Any]) -> None:
    """Gemma 3's config.json as the hub's first checkpoints spell it: a pattern, two top-level rope bases."""
    del config["layer_types"], config["rope_parameters"]
    config.update(sliding_window_pattern=2, rope_theta=50_000.0, rope_local_base_freq=500.0)
    config["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}  # the global layers'


def to_legacy_rope(config: dict[str, Any], scaling_type: str | None = None) -> None:
    """rope_parameters as top-level rope_theta, partial_rotary_factor and rope_scaling (LongRoPE as "su")."""
    params = config.pop("rope_parameters")
    config.update(rope_theta=params.pop("rope_theta"), partial_rotary_factor=params.pop("partial_rotary_factor"))
    params.pop("original_max_position_embeddings", None)  # top-level in these configs
    config["rope_scaling"] = None if scaling_type is None else {**params, "rope_type": scaling_type}


LEGACY_CONFIGS: dict[str, Callable[[dict[str, Any]], None]] = {
    "gemma3": to_legacy_gemma3,
    "phi3": lambda config: to_legacy_rope(config, "su"),
    "phi": to_legacy_rope,
}


@pytest.mark.parametrize("family", LEGACY_CONFIGS)
def test_legacy_config_spelling_reads_the_same(family_dirs: dict[str, Path], tmp_path: Path, family: str) -> None:
    """Guards against the config.json spellings hub checkpoints still carry (before transformers 5) being read
    as another model: Gemma 3's sliding_window_pattern and rope_local_base_freq, top-level rope_theta and
    partial_rotary_factor, Phi-3's "su" LongRoPE."""
    from nanovllm.models.registry import load_model_arch

    legacy_dir = edited_config_dir(family_dirs[family], tmp_path, LEGACY_CONFIGS[family])
    assert load_model_arch(str(legacy_dir)) == load_model_arch(str(family_dirs[family]))


def test_longrope_table_matches_transformers_past_original_length() -> None:
    """Guards the LongRoPE positions no engine test reaches: at and past original_max_position_embeddings the
    long factors rotate (transformers' choice once a sequence is that long), below it the short ones, both
    scaled by the attention factor, over the partial rotary dimensions only."""
    from model_fixtures import FAMILY_CONFIGS, TINY_SIZES
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    from nanovllm.layers.rotary import RotaryEmbedding
    from nanovllm.models.arch import parse_rope

    config_cls, fields = FAMILY_CONFIGS["phi3"]
    config = config_cls(**{**TINY_SIZES, **fields})
    head_dim = config.hidden_size // config.num_attention_heads
    ours = RotaryEmbedding(head_dim, config.max_position_embeddings, parse_rope(config.to_dict(), head_dim))
    for positions in ([0, 5, 127], [128, 300, 1023]):  # short, then long (transformers: by the last position)
        cos, sin = Phi3RotaryEmbedding(config)(torch.zeros(1), torch.tensor([positions]))  # [1, 3, rotary_dim]
        half = ours.rotary_dim // 2
        torch.testing.assert_close(ours.cos[positions], cos[0, :, :half], msg=f"cos at {positions}")
        torch.testing.assert_close(ours.sin[positions], sin[0, :, :half], msg=f"sin at {positions}")


def test_gpt2_hub_checkpoint_layout(family_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Guards against GPT-2 checkpoints as the hub stores them failing to load: names without the
    ``transformer.`` prefix, and the causal-mask buffers older versions saved beside the weights."""
    shutil.copytree(family_dirs["gpt2"], tmp_path / "hub")
    tensors = load_file(tmp_path / "hub" / "model.safetensors")
    hub = {name.removeprefix("transformer."): tensor for name, tensor in tensors.items()}
    hub["h.0.attn.bias"] = torch.ones(1, 1, 8, 8).tril()
    hub["h.1.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(hub, tmp_path / "hub" / "model.safetensors")
    prompt = workload()[0][0]
    with LLM(str(tmp_path / "hub"), **BASE_ARGS, num_kvcache_blocks=16) as llm:
        got = llm.generate([prompt], GREEDY, use_tqdm=False)[0].token_ids
    assert got == reference_ids(family_dirs["gpt2"], [prompt])[0]
