"""Mixture-of-experts (Qwen3-MoE, Mixtral): the fused Triton kernel, the layer, its config and its checkpoints.

The kernel runs in Triton's interpreter on CPU (conftest.py sets TRITON_INTERPRET=1), against the torch
reference (a loop over experts) and against transformers' own MoE blocks on the same weights. The whole
models are compared with transformers token for token in tests/test_models.py (every fixture arch); here
the engine runs them again under chunked prefill, preemption and prefix caching at once, and over two
tensor-parallel ranks.
"""

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from model_fixtures import GreedyReference, hf_greedy_reference
from test_loader import rewrite_checkpoint
from test_models import random_id_prompts
from test_tp import assert_no_tensor_parallel_left

from nanovllm import LLM, SamplingParams
from nanovllm.kernels.fused_moe import fused_moe
from nanovllm.kernels.triton_fused_moe import DECODE_TILES, LARGE_TILES, SMALL_TILES, MoeTiles, choose_tiles
from nanovllm.kernels.triton_moe_sort import MAX_SORT_BLOCK_SLOTS, max_num_blocks, sort_by_expert
from nanovllm.layers.moe import SparseMoeBlock, route_tokens
from nanovllm.models.arch import check_tensor_parallel_split, parse_model_arch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Against the float32 reference on the same inputs: float32 differs by summation order only; bfloat16 by one
# rounding of the intermediate and of each expert's output (8 mantissa bits) before they are summed.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
WEIGHT_STD = 0.2  # wide enough that the experts' outputs differ clearly (as model_fixtures.INIT_RANGE)
MAX_TOKENS = 16  # as test_models, so that the transformers references are shared within one session
# Few blocks and a small step budget: sequences are preempted and prompts are prefilled in chunks.
TIGHT_ARGS: dict[str, Any] = dict(
    device="cpu", dtype="float32", kvcache_block_size=16, num_kvcache_blocks=6, max_model_len=96,
    max_num_batched_tokens=24, max_num_seqs=4, enable_prefix_caching=True, seed=0,
)  # fmt: skip
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def random_routing(num_tokens: int, num_experts: int, top_k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights [N, top_k] float32 and distinct experts per token [N, top_k], as a router makes them."""
    generator = torch.Generator().manual_seed(seed)
    probs = torch.randn(num_tokens, num_experts, generator=generator).softmax(dim=-1)  # [N, num_experts]
    topk_weights, topk_ids = probs.topk(top_k, dim=-1)  # [N, top_k] each
    return topk_weights.to(DEVICE), topk_ids.to(DEVICE)


@pytest.mark.parametrize(
    ("topk_ids", "num_experts", "block_m"),
    [
        ([[2, 0], [0, 1], [2, 0], [4, 2], [0, 4]], 5, 4),  # expert 3 gets nothing; 5 experts: 8 histogram bins
        ([[1, 0]], 8, 16),  # one decode token
        (torch.randint(0, 6, (MAX_SORT_BLOCK_SLOTS + 300, 1), generator=torch.Generator().manual_seed(0)), 6, 16),
    ],
)
def test_sort_by_expert_puts_every_slot_once_in_its_experts_block(
    topk_ids: Any, num_experts: int, block_m: int
) -> None:
    """Guards the sort that feeds the grouped GEMMs: a slot lost or repeated (a token missing an expert's output or
    getting it twice), a block holding rows of two experts, a group not padded to whole blocks, slots counted
    wrongly across the kernel's steps of MAX_SORT_BLOCK_SLOTS, or padding sized by the data (no CUDA graph then)."""
    topk_ids = torch.as_tensor(topk_ids, device=DEVICE)
    num_slots = topk_ids.numel()
    blocks = sort_by_expert(topk_ids, num_experts, block_m)
    num_rows = int(blocks.num_padded_rows.item())
    assert blocks.sorted_slot_ids.numel() == block_m * max_num_blocks(num_slots, num_experts, block_m)
    counts = torch.bincount(topk_ids.flatten().cpu(), minlength=num_experts)
    want_rows = int(((counts + block_m - 1) // block_m * block_m).sum())
    assert num_rows == want_rows <= blocks.sorted_slot_ids.numel(), f"{num_rows} padded rows, want {want_rows}"
    rows = blocks.sorted_slot_ids[:num_rows].view(-1, block_m).cpu()  # [num_used_blocks, block_m]
    block_experts = blocks.block_expert_ids[: rows.shape[0]].cpu()
    real = rows[rows < num_slots]
    assert sorted(real.tolist()) == list(range(num_slots)), f"slots in the blocks: {rows.tolist()}"
    assert (rows <= num_slots).all(), f"rows hold neither a slot nor padding: {rows.tolist()}"
    expert_of_slot = topk_ids.flatten().cpu()
    for block_idx, (block, expert) in enumerate(zip(rows, block_experts, strict=True)):
        slots = block[block < num_slots]
        assert (expert_of_slot[slots] == expert).all() and slots.numel() > 0, (
            f"block {block_idx} of expert {int(expert)} holds slots {slots.tolist()} of experts "
            f"{expert_of_slot[slots].tolist()}"
        )
        assert slots.tolist() == sorted(slots.tolist()), f"block {block_idx}: slots out of order {slots.tolist()}"
    assert block_experts.tolist() == sorted(block_experts.tolist()), f"blocks out of order: {block_experts.tolist()}"


@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "top_k", "hidden_size", "intermediate_size", "dtype", "tiles"),
    [
        (1, 8, 2, 64, 32, torch.float32, None),  # one decode token: 2 of 8 experts used
        (5, 4, 1, 48, 40, torch.float32, None),  # top-1; widths that are no multiple of the tiles (masks)
        (70, 4, 2, 64, 32, torch.float32, None),  # 140 slots over 4 experts: the tall (prefill) blocks
        (9, 8, 2, 64, 32, torch.bfloat16, None),
        (600, 4, 2, 48, 40, torch.bfloat16, None),  # 1200 slots over 4 experts: many tall blocks each
        # Each tile set at the sizes it was not chosen for: tiles must change speed only.
        (1, 8, 2, 200, 72, torch.bfloat16, LARGE_TILES),
        (3, 8, 2, 200, 72, torch.float32, SMALL_TILES),
        (40, 4, 2, 200, 72, torch.bfloat16, DECODE_TILES),
    ],
)
def test_triton_fused_moe_matches_reference(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    hidden_size: int,
    intermediate_size: int,
    dtype: torch.dtype,
    tiles: MoeTiles | None,
) -> None:
    """Guards the fused kernel: wrong expert weights or rows per block, a padding row written over a real one,
    gate and up swapped, the routing weight applied twice or not at all, a token's top_k rows not summed, a K or
    N tail dropped by a tile (hidden 200 and width 72 are no multiple of any block_k or block_n)."""
    from nanovllm.kernels.triton_fused_moe import fused_moe_triton

    generator = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, hidden_size, generator=generator).to(DEVICE, dtype)
    gate_up = WEIGHT_STD * torch.randn(num_experts, 2 * intermediate_size, hidden_size, generator=generator)
    down = WEIGHT_STD * torch.randn(num_experts, hidden_size, intermediate_size, generator=generator)
    gate_up, down = gate_up.to(DEVICE, dtype), down.to(DEVICE, dtype)
    topk_weights, topk_ids = random_routing(num_tokens, num_experts, top_k, seed=num_tokens)
    want = fused_moe(x.float(), gate_up.float(), down.float(), topk_weights, topk_ids)  # [N, hidden]
    got = fused_moe_triton(x, gate_up, down, topk_weights, topk_ids, tiles)
    error = (got.float() - want).abs().max().item()
    scale = want.abs().max().item()
    tiles = tiles or choose_tiles(num_tokens * top_k, num_experts)
    assert got.dtype == dtype and error <= TOLERANCE[dtype] * max(1.0, scale), (
        f"max error {error:.2e} (output scale {scale:.2f}, tiles {tiles})"
    )


@pytest.mark.parametrize(("num_tokens", "tiles"), [(1, DECODE_TILES), (16, DECODE_TILES), (17, SMALL_TILES),
                                                   (256, SMALL_TILES), (257, LARGE_TILES)])  # fmt: skip
def test_tiles_follow_the_number_of_tokens(num_tokens: int, tiles: MoeTiles) -> None:
    """Guards the choice of tiles at Qwen3-30B-A3B's 128 experts, top-8: decode batches up to 16 tokens get the
    narrow, deep-pipelined decode tiles, up to 256 the short blocks, prefill the tall ones."""
    assert choose_tiles(num_tokens * 8, 128) == tiles, f"{num_tokens} tokens: {choose_tiles(num_tokens * 8, 128)}"


@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "top_k", "renormalize", "dtype"),
    [
        (5, 8, 2, True, torch.float32),  # Mixtral
        (7, 128, 8, False, torch.float32),  # Qwen3-30B-A3B without norm_topk_prob
        (3, 60, 3, True, torch.float32),  # no power of two: masked experts and choices
        (33, 128, 8, True, torch.bfloat16),  # a bf16 router: equal logits happen
        (0, 8, 2, True, torch.float32),
    ],
)
def test_triton_routing_matches_reference(
    num_tokens: int, num_experts: int, top_k: int, renormalize: bool, dtype: torch.dtype
) -> None:
    """Guards the one-launch router against route_tokens: softmax over padded experts, an expert chosen twice, the
    weights renormalised when they should not be (or not when they should), choices out of probability order."""
    from nanovllm.kernels.triton_moe_routing import route_tokens_triton

    generator = torch.Generator().manual_seed(num_tokens)
    logits = (2 * torch.randn(num_tokens, num_experts, generator=generator)).to(DEVICE, dtype)
    want = route_tokens(logits, top_k, renormalize)
    weights, ids = route_tokens_triton(logits, top_k, renormalize)
    assert ids.dtype == want.topk_ids.dtype and weights.dtype == torch.float32
    assert torch.allclose(weights, want.topk_weights, rtol=1e-6, atol=1e-7), f"{weights} vs {want.topk_weights}"
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).gather(1, ids)  # [N, top_k] of the experts chosen
    if renormalize:
        probs = probs / probs.sum(dim=-1, keepdim=True)
    assert torch.allclose(probs, weights, rtol=1e-6, atol=1e-7), f"weights {weights} of experts {ids}"
    assert all(len(set(row)) == top_k for row in ids.tolist()), f"an expert chosen twice: {ids.tolist()}"
    if dtype == torch.float32:  # no equal probabilities: the very experts, in order
        assert ids.tolist() == want.topk_ids.tolist(), f"{ids.tolist()} vs {want.topk_ids.tolist()}"


def hf_moe_block(family: str, norm_topk_prob: bool) -> tuple[torch.nn.Module, Any]:
    """transformers' own sparse MoE block of ``family`` with random weights, and its config."""
    from transformers import MixtralConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    sizes = dict(hidden_size=64, num_experts_per_tok=2)
    if family == "mixtral":
        config: Any = MixtralConfig(**sizes, intermediate_size=48, num_local_experts=4)
        block: torch.nn.Module = MixtralSparseMoeBlock(config)
    else:
        config = Qwen3MoeConfig(**sizes, moe_intermediate_size=48, num_experts=8, norm_topk_prob=norm_topk_prob)
        block = Qwen3MoeSparseMoeBlock(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, WEIGHT_STD)
    return block.eval(), config


def load_like_checkpoint(ours: SparseMoeBlock, theirs: torch.nn.Module) -> None:
    """Our block's weights from transformers', one expert's gate, up and down at a time, as a checkpoint has them."""
    ours.gate.weight.data.copy_(theirs.gate.weight)
    experts = ours.experts
    stacked = zip(theirs.experts.gate_up_proj, theirs.experts.down_proj, strict=True)
    for expert_idx, (gate_up, down) in enumerate(stacked):
        gate, up = gate_up.chunk(2, dim=0)  # [I, hidden] each
        experts.load(experts.gate_up_proj, gate, (expert_idx, "gate"))
        experts.load(experts.gate_up_proj, up, (expert_idx, "up"))
        experts.load(experts.down_proj, down, (expert_idx, "down"))


@pytest.mark.parametrize(("family", "norm_topk_prob"), [("qwen3_moe", False), ("qwen3_moe", True), ("mixtral", True)])
@pytest.mark.parametrize("triton_kernel", [False, True])
def test_moe_block_matches_transformers(family: str, norm_topk_prob: bool, triton_kernel: bool) -> None:
    """Guards routing and experts against transformers' own blocks: softmax before or after top-k, the top-k
    renormalised when the config says not to (or not when it says to), the checkpoint's expert tensors stacked
    in the wrong order or into the wrong half of gate_up_proj."""
    theirs, config = hf_moe_block(family, norm_topk_prob)
    num_experts = config.num_local_experts
    intermediate = config.intermediate_size if family == "mixtral" else config.moe_intermediate_size
    renormalize = family == "mixtral" or config.norm_topk_prob
    ours = SparseMoeBlock(config.hidden_size, intermediate, num_experts, 2, renormalize, triton_kernel)
    load_like_checkpoint(ours, theirs)
    x = torch.randn(1, 13, config.hidden_size, generator=torch.Generator().manual_seed(1))  # [batch, seq, hidden]
    with torch.inference_mode():
        want = theirs(x)[0]  # [seq, hidden]
        got = ours.to(DEVICE)(x[0].to(DEVICE)).cpu()
    error = (got - want).abs().max().item()
    assert error <= TOLERANCE[torch.float32] * max(1.0, want.abs().max().item()), f"max error {error:.2e}"


def hf_references(model_dir: Path, prompts: list[list[int]]) -> list[GreedyReference]:
    return [hf_greedy_reference(str(model_dir), tuple(prompt), MAX_TOKENS) for prompt in prompts]


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_chunked_preempted_and_cached_runs_match_transformers(tiny_models: dict[str, Path], arch: str) -> None:
    """Guards MoE layers against the engine's bookkeeping: a prompt prefilled in chunks routed differently from a
    whole one, a preempted sequence recomputed wrongly, a prefix-cache hit feeding the experts stale rows."""
    prompts = random_id_prompts()
    want = [ref.token_ids for ref in hf_references(tiny_models[arch], prompts)]
    with LLM(str(tiny_models[arch]), **TIGHT_ARGS) as llm:
        first = [out.token_ids for out in llm.generate(prompts, GREEDY, use_tqdm=False)]
        again = [out.token_ids for out in llm.generate(prompts[-1:], GREEDY, use_tqdm=False)]
        assert llm.engine is not None
        num_preemptions = llm.engine.scheduler.num_preemptions
        num_hit_tokens = llm.prefix_cache_stats().num_hit_tokens
    assert first == want and again == want[-1:], f"{arch}: engine {first} + {again}, transformers {want}"
    assert num_preemptions > 0 and num_hit_tokens > 0, f"preemptions {num_preemptions}, cache hits {num_hit_tokens}"


def test_tensor_parallel_experts_match_transformers(tiny_models: dict[str, Path]) -> None:
    """Guards tensor-parallel experts: a rank's slice of an expert's gate, up or down taken from the wrong rows or
    columns, a missing all-reduce of the partial sums, ranks routing a token differently. Two ranks over gloo,
    under chunked prefill and preemption, must give transformers' tokens (hence also one rank's)."""
    prompts = random_id_prompts()
    want = [ref.token_ids for ref in hf_references(tiny_models["qwen3_moe"], prompts)]
    with LLM(str(tiny_models["qwen3_moe"]), tensor_parallel_size=2, **TIGHT_ARGS) as llm:
        got = [out.token_ids for out in llm.generate(prompts, GREEDY, use_tqdm=False)]
        assert llm.engine is not None and llm.engine.scheduler.num_preemptions > 0, "the run must preempt"
    assert got == want, f"TP=2 engine {got}, transformers {want}"
    assert_no_tensor_parallel_left()


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs Triton's CPU interpreter: hosts without a GPU")
def test_triton_experts_in_the_engine_match_transformers(tiny_models: dict[str, Path]) -> None:
    """Guards the fused kernel as the engine calls it (prefill, then decode, beside the Triton attention): the
    engine must choose it where Triton runs, and give transformers' tokens with it."""
    prompt = random_id_prompts()[1]
    num_tokens = 4  # each step runs every kernel in Triton's interpreter: a few steps suffice
    want = hf_references(tiny_models["qwen3_moe"], [prompt])[0].token_ids[:num_tokens]
    params = SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True)
    with LLM(str(tiny_models["qwen3_moe"]), **{**TIGHT_ARGS, "attention_backend": "triton"}) as llm:
        assert llm.engine is not None and llm.engine.runner.kernels.triton_moe
        [got] = [out.token_ids for out in llm.generate([prompt], params, use_tqdm=False)]
    assert got == want, f"engine {got}, transformers {want}"


def qwen3_moe_config(**fields: Any) -> dict[str, Any]:
    config = {
        "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "hidden_act": "silu",
    }  # fmt: skip
    return {**config, **fields}


def test_sparse_layers_are_transformers_layers() -> None:
    """Guards decoder_sparse_step and mlp_only_layers against an off-by-one: the layers we make sparse must be the
    very layers transformers builds a sparse MoE block for."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    fields = {"decoder_sparse_step": 2, "mlp_only_layers": [3]}
    config = qwen3_moe_config(**fields)
    hf_fields = {key: value for key, value in config.items() if key != "architectures"}
    model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(**hf_fields))
    hf_sparse = tuple(i for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, Qwen3MoeSparseMoeBlock))
    moe = parse_model_arch(config).moe
    assert moe is not None and moe.sparse_layer_ids == hf_sparse == (1, 5), (moe, hf_sparse)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_experts_per_tok": 9}, r"num_experts_per_tok=9 exceeds the 8 experts"),
        ({"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported .* supported: \('silu',\)"),
        ({"mlp_only_layers": [6]}, r"mlp_only_layers=\[6\] must list layer indices in \[0, num_hidden_layers=6\)"),
        ({"decoder_sparse_step": 0}, r"decoder_sparse_step=0 must be a positive integer"),
        ({"moe_intermediate_size": None}, r"moe_intermediate_size=None must be a positive integer"),
        ({"norm_topk_prob": "yes"}, r"norm_topk_prob='yes' must be true or false"),
    ],
)
def test_bad_moe_config_fails_before_weights_load(tmp_path: Path, fields: dict[str, Any], message: str) -> None:
    """Guards against an MoE config we cannot run correctly loading anyway (or failing deep inside a kernel): the
    error names the field and its value, and comes from config.json alone (the directory has no weights)."""
    (tmp_path / "config.json").write_text(json.dumps(qwen3_moe_config(**fields)))
    with pytest.raises(ValueError, match=message):
        LLM(str(tmp_path), device="cpu", skip_tokenizer_init=True)


def test_tensor_parallel_size_must_split_every_expert() -> None:
    """Guards against a tensor_parallel_size that splits the dense MLP but not an expert's width being accepted,
    to fail later inside the layer with no word of the engine argument."""
    arch = parse_model_arch(qwen3_moe_config(moe_intermediate_size=34))
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4 does not divide the model's moe_intermediate_size"):
        check_tensor_parallel_split(4, arch)


def test_mixtral_config_needs_its_expert_count() -> None:
    """Guards against a Mixtral config without num_local_experts running with a guessed number of experts."""
    config = {**qwen3_moe_config(), "architectures": ["MixtralForCausalLM"]}
    with pytest.raises(ValueError, match=r"MixtralForCausalLM lacks 'num_local_experts'"):
        parse_model_arch(config)


def test_missing_expert_tensor_is_an_error(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Guards against an expert left uninitialized when the checkpoint lacks one of its tensors."""
    name = "model.layers.1.block_sparse_moe.experts.3.w3.weight"
    rewrite_checkpoint(tiny_models["mixtral"], tmp_path / "m", 1, lambda tensors: tensors.pop(name))
    missing = r"lacks 1 parameter.*model\.layers\.1\.mlp\.experts\.gate_up_proj\[\(3, 'up'\)\]"
    with pytest.raises(ValueError, match=missing):
        LLM(str(tmp_path / "m"), device="cpu", dtype="float32", kvcache_block_size=16, num_kvcache_blocks=8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_moe_cuda_graphs_equal_eager_on_gpu(tiny_models: dict[str, Path], dtype: str) -> None:
    """Guards MoE decode in CUDA graphs: a size computed from the routing (or a host read) in the sort by expert,
    which capture refuses or replays stale, and padded graph lanes leaking into real tokens' experts."""
    # 7 sequences: graph bucket 8 with one padded lane, its token routed to experts too.
    prompts = [prompt * 3 for prompt in random_id_prompts()] + random_id_prompts()[:3]
    args: dict[str, Any] = dict(
        device="cuda", dtype=dtype, kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=256,
        max_num_seqs=8, attention_backend="triton",
    )  # fmt: skip
    tokens = {}
    for enforce_eager in (True, False):
        with LLM(str(tiny_models["qwen3_moe"]), enforce_eager=enforce_eager, **args) as llm:
            assert llm.engine is not None and (llm.engine.runner.decode_graphs is None) == enforce_eager
            tokens[enforce_eager] = [out.token_ids for out in llm.generate(prompts, GREEDY, use_tqdm=False)]
    assert tokens[False] == tokens[True], f"graphs {tokens[False]}, eager {tokens[True]}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_triton_experts_on_gpu_match_transformers(tiny_models: dict[str, Path], arch: str) -> None:
    """Guards the compiled fused kernel (not the interpreter) in float32: transformers' tokens, graphs included."""
    prompts = random_id_prompts()
    want = [ref.token_ids for ref in hf_references(tiny_models[arch], prompts)]
    args: dict[str, Any] = dict(device="cuda", dtype="float32", kvcache_block_size=16, num_kvcache_blocks=64)
    with LLM(str(tiny_models[arch]), attention_backend="triton", max_num_seqs=8, **args) as llm:
        got = [out.token_ids for out in llm.generate(prompts, GREEDY, use_tqdm=False)]
    assert got == want, f"engine {got}, transformers {want}"
