"""LoRA's pieces alone, with no model: reading adapter directories (and refusing bad ones), the host cache, the
device slots' least-recently-used order, the scheduler's admission by adapter, and prefix hashes per adapter."""

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nanovllm import LoRARequest, SamplingParams
from nanovllm.engine.request import Request
from nanovllm.lora.adapter import load_adapter
from nanovllm.lora.cache import AdapterCache
from nanovllm.lora.slots import AdapterSlots
from nanovllm.models.arch import parse_model_arch
from nanovllm.scheduler.block_manager import BlockManager
from nanovllm.scheduler.scheduler import Scheduler, SchedulerLimits
from nanovllm.scheduler.sequence import Sequence

# A LLaMA shape: q 4 x 16, k/v 2 x 16, MLP 128, 2 layers.
ARCH_CONFIG = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
ARCH = parse_model_arch({"architectures": ["LlamaForCausalLM"], **ARCH_CONFIG})
PREFIX = "base_model.model.model.layers"  # PEFT's names of a causal LM's decoder layers
RANK = 4


def write_adapter(path: Path, config: dict | None = None, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """A PEFT directory laid out as PEFT saves one: q_proj and down_proj of layer 1, rank 4, unless overridden."""
    path.mkdir(parents=True, exist_ok=True)
    base_config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"]}
    (path / "adapter_config.json").write_text(json.dumps({**base_config, **(config or {})}))
    if weights is None:
        weights = {
            f"{PREFIX}.1.self_attn.q_proj.lora_A.weight": torch.randn(RANK, 64),
            f"{PREFIX}.1.self_attn.q_proj.lora_B.weight": torch.randn(64, RANK),
            f"{PREFIX}.1.mlp.down_proj.lora_A.weight": torch.randn(RANK, 128),
            f"{PREFIX}.1.mlp.down_proj.lora_B.weight": torch.randn(64, RANK),
        }
    save_file(weights, str(path / "adapter_model.safetensors"))
    return path


def test_adapter_read_with_its_scaling(tmp_path: Path) -> None:
    """Guards against a wrong scaling (alpha / r, or alpha / sqrt(r) with rsLoRA) and modules keyed wrongly."""
    adapter = load_adapter(LoRARequest("plain", 1, str(write_adapter(tmp_path / "a"))), ARCH, max_lora_rank=8)
    assert adapter.rank == RANK and adapter.scaling == 8 / RANK, adapter
    assert sorted(adapter.modules) == [(1, "down_proj"), (1, "q_proj")], sorted(adapter.modules)
    rs = load_adapter(LoRARequest("rs", 2, str(write_adapter(tmp_path / "b", {"use_rslora": True}))), ARCH, 8)
    assert rs.scaling == 8 / RANK**0.5, rs.scaling


A_Q = f"{PREFIX}.1.self_attn.q_proj.lora_A.weight"
B_Q = f"{PREFIX}.1.self_attn.q_proj.lora_B.weight"
# name -> (what to write into the adapter directory, words the error must contain)
BAD_ADAPTERS: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "missing directory": (lambda path: None, ["does not exist"]),
    "malformed config": (
        lambda path: (write_adapter(path), (path / "adapter_config.json").write_text("{r: 4")),
        ["adapter_config.json"],
    ),
    "rank above max_lora_rank": (lambda path: write_adapter(path, {"r": 16}), ["r=16", "max_lora_rank=8"]),
    "unsupported target module": (
        lambda path: write_adapter(path, {"target_modules": ["q_proj", "lm_head"]}),
        ["lm_head", "supported"],
    ),
    "weight of an unsupported module": (
        lambda path: write_adapter(path, weights={"base_model.model.lm_head.lora_A.weight": torch.randn(RANK, 64)}),
        ["lm_head", "supported"],
    ),
    "shape of another base model": (
        lambda path: write_adapter(path, weights={A_Q: torch.randn(RANK, 96), B_Q: torch.randn(64, RANK)}),
        ["(4, 96)", "(4, 64)"],
    ),
    "layer the model lacks": (
        lambda path: write_adapter(path, weights={A_Q.replace(".1.", ".7."): torch.randn(RANK, 64)}),
        ["layer 7"],
    ),
    "lora_A without lora_B": (lambda path: write_adapter(path, weights={A_Q: torch.randn(RANK, 64)}), ["lora_B"]),
    "bias": (lambda path: write_adapter(path, {"bias": "all"}), ["bias='all'"]),
    "DoRA": (lambda path: write_adapter(path, {"use_dora": True}), ["DoRA"]),
    "no safetensors": (
        lambda path: (write_adapter(path), (path / "adapter_model.safetensors").unlink()),
        ["adapter_model.safetensors"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_bad_adapter_refused_naming_it_and_the_problem(tmp_path: Path, case: str) -> None:
    """Guards against a bad adapter directory that loads (silently computing something else) or fails with an
    error that names neither the adapter nor what to change."""
    write, words = BAD_ADAPTERS[case]
    path = tmp_path / "adapter"
    write(path)
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        load_adapter(LoRARequest("my-adapter", 1, str(path)), ARCH, max_lora_rank=8)
    message = str(error.value)
    assert "my-adapter" in message and all(word in message for word in words), message


# name -> (architecture, target_modules, words the error must contain), for write_adapter's LLaMA-named weights: a
# module outside a family's table of checkpoint names (lora/adapter.py's CHECKPOINT_MODULES) is refused by name.
OTHER_FAMILY_NAMES = {
    "GPT-2 lm_head": ("GPT2LMHeadModel", ["c_attn", "lm_head"], ["['lm_head']", "supported: c_attn, c_proj, c_fc"]),
    "Phi's dense named o_proj": ("PhiForCausalLM", ["q_proj", "o_proj"], ["['o_proj']", "dense, fc1, fc2"]),
    "LLaMA's weight names on GPT-2": (
        "GPT2LMHeadModel",
        "all-linear",
        [f"{PREFIX}.1.", "supported: transformer.h.N.{attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj}"],
    ),
}


@pytest.mark.parametrize("case", sorted(OTHER_FAMILY_NAMES))
def test_names_outside_the_family_refused(tmp_path: Path, case: str) -> None:
    """Guards against an adapter of a family that names its modules its own way (Phi, GPT-2) read through another
    family's names, or its other modules (lm_head) accepted and silently not applied."""
    architecture, targets, words = OTHER_FAMILY_NAMES[case]
    arch = parse_model_arch({"architectures": [architecture], **ARCH_CONFIG})
    path = write_adapter(tmp_path / "adapter", {"target_modules": targets})
    with pytest.raises(ValueError) as error:
        load_adapter(LoRARequest("my-adapter", 1, str(path)), arch, max_lora_rank=8)
    message = str(error.value)
    assert "my-adapter" in message and all(word in message for word in words), message


def test_request_fields_checked() -> None:
    """Guards against lora_int_id 0 (the base model's) or a non-int id being accepted."""
    for bad in (dict(lora_int_id=0), dict(lora_int_id="1"), dict(lora_name=""), dict(lora_path="")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LoRARequest(**{"lora_name": "x", "lora_int_id": 1, "lora_path": "/p", **bad})  # type: ignore[arg-type]


def test_cache_evicts_least_recently_used_and_keeps_ids_to_their_directory(tmp_path: Path) -> None:
    """Guards against a host cache over capacity, one that drops the adapter used last, and an id reused for
    another directory (its prefix-cache blocks would be served to the other adapter)."""
    requests = [LoRARequest(f"a{i}", i, str(write_adapter(tmp_path / f"a{i}"))) for i in (1, 2, 3)]
    cache = AdapterCache(ARCH, max_lora_rank=8, capacity=2, pin_memory=False)
    for request in (requests[0], requests[1], requests[0], requests[2]):  # a2 is the least recently used
        cache.get(request)
    assert list(cache.adapters) == [1, 3] and cache.num_disk_reads == 3, (list(cache.adapters), cache.num_disk_reads)
    cache.get(requests[1])  # read again, a1 out
    assert list(cache.adapters) == [3, 2] and cache.num_disk_reads == 4, (list(cache.adapters), cache.num_disk_reads)
    with pytest.raises(ValueError, match="lora_int_id=1 already names"):
        cache.get(LoRARequest("impostor", 1, requests[2].lora_path))


def test_slots_keep_batch_adapters_and_evict_least_recently_used() -> None:
    """Guards against evicting an adapter the batch needs, reloading one already in its slot, and LRU order."""
    slots = AdapterSlots(max_loras=2)
    first = slots.assign([7, 3])
    assert first.slot_of == {7: 0, 3: 1} and first.to_load == [(0, 7), (1, 3)], first
    again = slots.assign([3])
    assert again.to_load == [], again
    third = slots.assign([3, 9])  # 7 is least recently used and not needed: 9 takes its slot
    assert third.slot_of == {3: 1, 9: 0} and third.to_load == [(0, 9)], third
    with pytest.raises(RuntimeError, match="max_loras=2"):
        slots.assign([1, 2, 3])


def lora_seq(prompt: list[int], lora_int_id: int | None) -> Sequence:
    lora = None if lora_int_id is None else LoRARequest(f"l{lora_int_id}", lora_int_id, "/unused")
    return Sequence(prompt, SamplingParams(max_tokens=4), lora_request=lora)


def test_scheduler_admits_at_most_max_loras_adapters_and_keeps_order() -> None:
    """Guards against a batch needing more adapters than the device has slots (the runner would fail), and against
    a passed-over request losing its place or blocking base-model requests behind it."""
    scheduler = Scheduler(BlockManager(64, 16), SchedulerLimits(8, 256, 128, max_loras=1), eos_token_ids=set())
    seqs = [lora_seq([1, 2, 3], lora_id) for lora_id in (None, 1, 2, None, 1, 2)]
    for seq in seqs:
        scheduler.add(seq)
    batch = scheduler.schedule()
    assert batch.seqs == [seqs[0], seqs[1], seqs[3], seqs[4]], [s.lora_request for s in batch.seqs]
    assert list(scheduler.waiting) == [seqs[2], seqs[5]], "the passed-over requests keep their order"
    for seq in batch.seqs:
        scheduler.abort(seq)  # adapter 1's sequences end: adapter 2 may come in
    assert scheduler.schedule().seqs == [seqs[2], seqs[5]]


def test_prefix_blocks_keyed_by_adapter() -> None:
    """Guards against one prompt under two adapters (or an adapter and the base model) sharing KV blocks."""
    manager = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(9))  # two full blocks before the last token
    for lora_int_id in (1, None, 2, 1):
        seq = lora_seq(prompt, lora_int_id)
        manager.allocate(seq)
        seq.num_computed_tokens = len(prompt)
        manager.register_computed(seq)
        manager.free(seq)
    assert manager.stats.num_hit_tokens == 8, f"only adapter 1's second run may hit: {manager.stats}"


def test_siblings_of_n_completions_keep_the_adapter() -> None:
    """Guards against the n - 1 sibling completions of a request running on the base model."""
    first = lora_seq([1, 2, 3], 5)
    request = Request.build(
        "r", Sequence([1, 2, 3], SamplingParams(n=3, temperature=1.0), 0, first.lora_request), None, False
    )
    assert [seq.lora_request for seq in request.seqs] == [first.lora_request] * 3, request.seqs


def test_serve_lora_flags(tmp_path: Path) -> None:
    """Guards against --lora-modules accepted without --enable-lora, a malformed or repeated NAME=PATH, and a bad
    adapter directory found only when a request first uses it (the server would answer 500s instead of failing
    to start)."""
    pytest.importorskip("uvicorn")
    from nanovllm.serving.server import lora_modules_from, make_parser

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **ARCH_CONFIG}))
    good, bad = write_adapter(tmp_path / "good"), write_adapter(tmp_path / "bad", {"r": 64})

    def parse(*flags: str) -> list[LoRARequest]:
        return lora_modules_from(make_parser().parse_args(["--model", str(model_dir), *flags]), "base")

    assert parse("--enable-lora", "--lora-modules", f"sql={good}", f"chat={good}") == [
        LoRARequest("sql", 1, str(good)),
        LoRARequest("chat", 2, str(good)),
    ]
    for flags, words in [  # --enable-lora when given, then the --lora-modules values
        ((f"sql={good}",), "needs --enable-lora"),
        (("--enable-lora", f"{good}"), "NAME=PATH"),
        (("--enable-lora", f"sql={good}", f"sql={good}"), "'sql' is already served"),
        (("--enable-lora", f"base={good}"), "'base' is already served"),
        (("--enable-lora", f"sql={bad}"), "max_lora_rank=16"),
    ]:
        enable, pairs = [f for f in flags if f.startswith("--")], [f for f in flags if not f.startswith("--")]
        with pytest.raises(ValueError, match=words):
            parse(*enable, "--lora-modules", *pairs)
