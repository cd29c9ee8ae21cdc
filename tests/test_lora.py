"""LoRA end to end on tiny models, against PEFT: mixed batches of adapters and the base model, more adapters than
device slots, prefix caching per adapter, bad adapters, tensor parallelism, and the server with the openai client.

The reference is PEFT's merge_and_unload() model (W + scaling * B A) run greedily by transformers in float32;
the engine adds the low-rank product to each token's output instead, so it must give the same greedy tokens.
"""

import json
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from lora_fixtures import ADAPTER_SPECS, AdapterSpec, adapter_specs, peft_greedy_reference, write_peft_adapter
from prometheus_client.parser import text_string_to_metric_families

from nanovllm import LLM, LoRARequest, SamplingParams
from nanovllm.serving.async_llm import AsyncLLM

BLOCK_SIZE = 16
MAX_TOKENS = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
BASE_ARGS = dict(device="cpu", dtype="float32", kvcache_block_size=BLOCK_SIZE, max_model_len=128, seed=0)
LORA_ARGS = dict(enable_lora=True, max_lora_rank=16, num_kvcache_blocks=64, **BASE_ARGS)
# The families whose projections are q/k/v/o and gate/up/down in the checkpoint, and Phi (q/k/v, dense, fc1/fc2)
# and GPT-2 (c_attn holding q, k and v; c_proj twice; c_fc), whose checkpoints name them otherwise. Phi-3 fuses
# them: test_fused_checkpoint_modules_take_fused_adapters.
ARCHS = ["qwen3", "qwen2", "llama", "llama2", "mistral", "gemma3", "phi", "gpt2"]
# An adapter fits every model whose projections have its shapes: the tiny qwen2, llama, llama2 and mistral share
# theirs (head_dim 16), so one set of adapters, written for llama, serves the four; qwen3 (head_dim 32), gemma3,
# phi and gpt2 have their own.
ADAPTER_SHAPE_OF = {
    "qwen3": "qwen3", "qwen2": "llama", "llama": "llama", "llama2": "llama", "mistral": "llama", "gemma3": "gemma3",
    "phi": "phi", "gpt2": "gpt2",
}  # fmt: skip
# Adapter seeds start here for a shape whose first seeds' adapters change too few rows' tokens (the test asks 3).
SEED_BASE = {"gemma3": 3}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models run faster on one thread: a second one costs more in OpenMP hand-offs than it saves, many times
    more on a shared machine. Restored afterwards."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


@pytest.fixture(scope="module")
def lora_models(tiny_models: dict[str, Path], tiny_model_dir: Callable[..., Path]) -> dict[str, Path]:
    """The tiny model of each of ARCHS: arch -> model dir (gemma3 is a family, not among tiny_models)."""
    return {arch: tiny_models[arch] if arch in tiny_models else tiny_model_dir(arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def adapters(lora_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """Three PEFT adapters (adapter_specs) for each architecture's tiny model: arch -> adapter name -> directory."""
    root = tmp_path_factory.mktemp("lora_adapters")
    written = {
        shape: {
            name: str(
                write_peft_adapter(root / shape / name, lora_models[shape], spec, seed=SEED_BASE.get(shape, 0) + seed)
            )
            for seed, (name, spec) in enumerate(adapter_specs(shape).items())
        }
        for shape in set(ADAPTER_SHAPE_OF.values())
    }
    return {arch: written[shape] for arch, shape in ADAPTER_SHAPE_OF.items()}


def lora_requests(adapter_dirs: dict[str, str]) -> dict[str, LoRARequest]:
    """LoRARequests of one model's adapters: a -> id 1, b -> 2, c -> 3."""
    return {name: LoRARequest(name, i, path) for i, (name, path) in enumerate(adapter_dirs.items(), start=1)}


def random_prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(400) for _ in range(length)]


def expected_tokens(model_dir: Path, prompts: list[list[int]], loras: list[LoRARequest | None]) -> list[list[int]]:
    """PEFT's greedy tokens for each prompt under its adapter (the base model's for None)."""
    return [
        peft_greedy_reference(str(model_dir), None if lora is None else lora.lora_path, tuple(p), MAX_TOKENS).token_ids
        for p, lora in zip(prompts, loras, strict=True)
    ]


def generate_ids(llm: LLM, prompts: list[list[int]], loras: list[LoRARequest | None]) -> list[list[int]]:
    return [out.token_ids for out in llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=loras)]


def mixed_batch(requests: dict[str, LoRARequest]) -> tuple[list[list[int]], list[LoRARequest | None]]:
    """Rows of adapter a, b, the base model and c, then a's prompt (two blocks and more) under b. The first and
    third prompts fill a new block as they decode."""
    prompts = [random_prompt(length, seed) for seed, length in enumerate((3 * BLOCK_SIZE - 2, 9, BLOCK_SIZE - 3, 5))]
    return [*prompts, prompts[0]], [requests["a"], requests["b"], None, requests["c"], requests["b"]]


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_matches_peft(lora_models: dict[str, Path], adapters: dict[str, dict[str, str]], arch: str) -> None:
    """Guards against a row given another row's adapter (or none), a base row given one, a wrong scaling (alpha/r,
    rsLoRA), q/k/v or gate/up slices swapped in the fused layers, a module an adapter does not target changed, and
    a family's own module names mapped onto the wrong layer (Phi's dense, GPT-2's c_attn rows or its two c_proj)."""
    requests = lora_requests(adapters[arch])
    prompts, loras = mixed_batch(requests)
    expected = expected_tokens(lora_models[arch], prompts, loras)
    base = expected_tokens(lora_models[arch], prompts, [None] * len(prompts))
    changed = [row for row, lora in enumerate(loras) if lora is not None and expected[row] != base[row]]
    assert len(changed) >= 3, f"{arch}: the adapters barely change the tokens; the test would not see them ignored"
    with LLM(str(lora_models[arch]), max_loras=4, **LORA_ARGS) as llm:
        got = generate_ids(llm, prompts, loras)
    for row, (have, want) in enumerate(zip(got, expected, strict=True)):
        lora = loras[row].lora_name if loras[row] else "base"
        assert have == want, f"{arch} row {row} ({lora}): engine {have} != PEFT {want} (base model: {base[row]})"


def retargeted_copy(adapter_dir: str, path: Path, target_modules: list[str]) -> Path:
    """A copy of an adapter directory whose adapter_config.json names other target modules."""
    shutil.copytree(adapter_dir, path)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": target_modules}))
    return path


def test_moe_model_takes_attention_adapters(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Guards against LoRA on a mixture-of-experts model failing to start (its sparse layers have no gate/up/down
    projections) or adding an adapter to the wrong layers: attention adapters give PEFT's tokens beside base rows,
    and an adapter that targets the MLP is refused by name, the engine serving on."""
    model = tiny_models["qwen3_moe"]
    attention = {"a": str(write_peft_adapter(tmp_path / "a", model, ADAPTER_SPECS["a"], seed=0))}  # q and v
    request = lora_requests(attention)["a"]
    prompts, loras = [random_prompt(9, 0), random_prompt(5, 1), random_prompt(20, 2)], [request, None, request]
    expected = expected_tokens(model, prompts, loras)
    mlp_dir = retargeted_copy(attention["a"], tmp_path / "mlp", ["q_proj", "gate_proj"])
    with LLM(str(model), max_loras=2, **LORA_ARGS) as llm:
        assert generate_ids(llm, prompts, loras) == expected
        with pytest.raises(ValueError, match=r"\['gate_proj'\] are not supported; supported: q_proj, k_proj"):
            generate_ids(llm, prompts[:1], [LoRARequest("mlp", 2, str(mlp_dir))])
        assert generate_ids(llm, prompts[:1], loras[:1]) == expected[:1]


def test_fused_checkpoint_modules_take_fused_adapters(tiny_model_dir: Callable[..., Path], tmp_path: Path) -> None:
    """Guards against Phi-3's adapters (PEFT can target only its checkpoint's fused qkv_proj and gate_up_proj) being
    refused or split wrong: each part takes the adapter's A and its own rows of B, beside base rows, as PEFT runs
    them; and the parts' own names are refused by name, since the checkpoint has no such modules."""
    model = tiny_model_dir("phi3")
    specs = {
        "attention": AdapterSpec(rank=8, alpha=16, target_modules=("qkv_proj", "o_proj")),
        "mlp": AdapterSpec(rank=16, alpha=8, target_modules=("gate_up_proj", "down_proj"), use_rslora=True),
    }
    dirs = {
        name: str(write_peft_adapter(tmp_path / name, model, spec, seed=i))
        for i, (name, spec) in enumerate(specs.items())
    }
    requests = lora_requests(dirs)
    prompts = [random_prompt(length, seed) for seed, length in enumerate((20, 9, 5, 13))]
    loras = [requests["attention"], requests["mlp"], None, requests["mlp"]]
    expected = expected_tokens(model, prompts, loras)
    base = expected_tokens(model, prompts, [None] * len(prompts))
    assert sum(expected[row] != base[row] for row in (0, 1, 3)) >= 2, "the adapters barely change the tokens"
    parts_dir = retargeted_copy(dirs["attention"], tmp_path / "parts", ["q_proj", "v_proj"])
    with LLM(str(model), max_loras=2, **LORA_ARGS) as llm:
        assert generate_ids(llm, prompts, loras) == expected
        with pytest.raises(ValueError, match=r"\['q_proj', 'v_proj'\] are not supported; supported: qkv_proj, o_proj,"):
            generate_ids(llm, prompts[:1], [LoRARequest("parts", 3, str(parts_dir))])


def test_more_adapters_than_slots_queue_and_reload(
    tiny_models: dict[str, Path], adapters: dict[str, dict[str, str]]
) -> None:
    """Guards against a batch needing more adapters than max_loras (an error under load instead of waiting), an
    adapter evicted from its slot or the host cache and not reloaded right, a request lost while it waited, and
    adapter slots misassigned to the tokens of prompt chunks or of preempted, recomputed sequences."""
    requests = lora_requests(adapters["qwen3"])
    prompts, loras = mixed_batch(requests)
    prompts, loras = prompts * 2, loras[::-1] + loras  # 10 rows, the adapters interleaved
    expected = expected_tokens(tiny_models["qwen3"], prompts, loras)
    # 24-token steps chunk the longer prompts; 8 blocks of 16 make the running sequences preempt one another.
    tight = {**LORA_ARGS, "num_kvcache_blocks": 8, "max_num_batched_tokens": 24}
    with LLM(str(tiny_models["qwen3"]), max_loras=1, max_cpu_loras=2, **tight) as llm:
        got = generate_ids(llm, prompts, loras)
        again = generate_ids(llm, prompts[:1], loras[:1])  # adapter b: evicted from its slot by now
        assert llm.engine is not None and llm.engine.runner.lora is not None
        manager = llm.engine.runner.lora
        num_preemptions = llm.engine.scheduler.num_preemptions
    assert got == expected, f"engine {got} != PEFT {expected}"
    assert again == expected[:1], (again, expected[:1])
    assert num_preemptions > 0, "the workload must preempt"
    assert manager.num_slot_loads > 3, f"3 adapters over 1 slot must reload some: {manager.num_slot_loads} loads"
    assert manager.cache.num_disk_reads > 3, f"3 adapters, 2 kept on the host: {manager.cache.num_disk_reads} reads"


def test_one_prompt_under_two_adapters_never_shares_kv(
    tiny_models: dict[str, Path], adapters: dict[str, dict[str, str]]
) -> None:
    """Guards against prefix-cache blocks shared across adapters (or with the base model): the second adapter would
    read the first one's keys and values. The same adapter must still find its own blocks."""
    requests = lora_requests(adapters["qwen3"])
    prompt = random_prompt(2 * BLOCK_SIZE + 5, seed=7)
    order = [requests["a"], requests["b"], None, requests["a"]]
    expected = expected_tokens(tiny_models["qwen3"], [prompt] * 4, order)
    with LLM(str(tiny_models["qwen3"]), max_loras=2, **LORA_ARGS) as llm:
        got, hits = [], []
        for lora in order:
            got += generate_ids(llm, [prompt], [lora])
            hits.append(llm.prefix_cache_stats().num_hit_tokens)
    assert got == expected, f"engine {got} != PEFT {expected}"
    assert hits == [0, 0, 0, 2 * BLOCK_SIZE], f"only adapter a's second run may hit its 2 blocks: {hits}"


def test_stream_beam_search_and_add_request_take_adapters(
    tiny_models: dict[str, Path], adapters: dict[str, dict[str, str]]
) -> None:
    """Guards against lora_request dropped by stream(), beam_search() or add_request()."""
    requests = lora_requests(adapters["llama"])
    prompts, loras = mixed_batch(requests)
    expected = expected_tokens(tiny_models["llama"], prompts, loras)
    with LLM(str(tiny_models["llama"]), max_loras=2, **LORA_ARGS) as llm:
        streamed: dict[str, list[int]] = {}
        for out in llm.stream(prompts, GREEDY, lora_request=loras):
            streamed.setdefault(out.request_id, []).extend(out.new_token_ids)
        beams = llm.beam_search(
            prompts[:2], beam_width=1, max_tokens=MAX_TOKENS, ignore_eos=True, lora_request=loras[:2]
        )
        engine = llm.engine
        assert engine is not None
        request_id = engine.add_request(prompts[3], GREEDY, lora_request=loras[3])
        added: list[int] = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                assert out.request_id == request_id
                added += out.new_token_ids
    assert [streamed[str(i)] for i in range(len(prompts))] == expected, (streamed, expected)
    assert [beam.sequences[0].token_ids for beam in beams] == expected[:2], "beam width 1 is greedy"
    assert added == expected[3], (added, expected[3])


def test_bad_adapters_refused_and_engine_keeps_serving(
    tiny_models: dict[str, Path], adapters: dict[str, dict[str, str]], tmp_path: Path
) -> None:
    """Guards against a bad adapter failing the step that runs it (every request with it) instead of the one call
    that brought it, and against lora_request accepted by an engine without LoRA (silently the base model)."""
    requests = lora_requests(adapters["qwen3"])
    prompt = random_prompt(9, seed=3)
    want = expected_tokens(tiny_models["qwen3"], [prompt], [requests["a"]])
    bad = {
        "max_lora_rank=8": requests["b"],  # rank 16
        "does not exist": LoRARequest("gone", 9, str(tmp_path / "missing")),
        "already names": LoRARequest("impostor", 1, requests["c"].lora_path),  # a's id, c's directory
    }
    with LLM(str(tiny_models["qwen3"]), **{**LORA_ARGS, "max_lora_rank": 8}) as llm:
        engine = llm.engine
        assert engine is not None
        request_id = engine.add_request(prompt, GREEDY, lora_request=requests["a"])
        engine.step()
        for words, lora in bad.items():
            with pytest.raises((ValueError, FileNotFoundError), match=words) as error:
                engine.add_request(prompt, GREEDY, lora_request=lora)
            assert lora.lora_name in str(error.value), error.value
        with pytest.raises(ValueError, match="3 lora_requests"):
            llm.generate([prompt], GREEDY, lora_request=[requests["a"]] * 3)
        got: list[int] = []
        while engine.has_unfinished_requests():
            got += [t for out in engine.step() if out.request_id == request_id for t in out.new_token_ids]
    assert got == want[0], f"the good request after the refusals: {got} != PEFT {want[0]}"
    plain = LLM(str(tiny_models["qwen3"]), num_kvcache_blocks=16, **BASE_ARGS)
    with plain, pytest.raises(ValueError, match="enable_lora=True"):
        plain.generate([prompt], GREEDY, lora_request=requests["a"])


@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
def test_tensor_parallel_2_matches_peft(
    lora_models: dict[str, Path], adapters: dict[str, dict[str, str]], arch: str
) -> None:
    """Guards against A and B sharded unlike their layers (A split with a row-parallel layer's input, B with a
    column-parallel layer's output rows, q/k/v of the fused layer per rank: qwen3's and GPT-2's c_attn; gate/up
    and GPT-2's fc1/fc2) or a worker without the adapter."""
    requests = lora_requests(adapters[arch])
    prompts, loras = mixed_batch(requests)
    expected = expected_tokens(lora_models[arch], prompts, loras)
    with LLM(str(lora_models[arch]), tensor_parallel_size=2, max_loras=2, **LORA_ARGS) as llm:
        got = generate_ids(llm, prompts, loras)
    assert got == expected, f"TP=2 {got} != PEFT {expected}"


def test_server_serves_adapters_by_model_name(
    tiny_models: dict[str, Path], adapters: dict[str, dict[str, str]]
) -> None:
    """Guards against a request's `model` not picking its adapter, /v1/models without the adapters, an unknown
    name answered other than OpenAI's 404, and adapter requests left out of the metrics."""
    from test_server import uvicorn_in_thread  # needs the serve extra, like the server tests

    from nanovllm.serving.app import build_app

    requests = lora_requests(adapters["qwen3"])
    model_dir = str(tiny_models["qwen3"])
    served = [requests["a"], requests["c"]]
    with LLM(model_dir, max_loras=2, **LORA_ARGS) as llm:
        want = {lora.lora_name: llm.generate(["Once upon a time"], GREEDY, False, lora)[0].text for lora in served}
    async_llm = AsyncLLM.from_engine_args(model_dir, max_loras=2, **LORA_ARGS)
    try:
        with uvicorn_in_thread(build_app(async_llm, "base", lora_modules=served)) as base_url:
            client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
            assert [m.id for m in client.models.list()] == ["base", "a", "c"]
            extra = {"ignore_eos": True}
            for name in ("a", "c", "a"):
                out = client.completions.create(
                    model=name, prompt="Once upon a time", max_tokens=MAX_TOKENS, temperature=0, extra_body=extra
                )
                assert (out.model, out.choices[0].text) == (name, want[name]), (name, out, want[name])
            with pytest.raises(openai.NotFoundError) as error:
                client.completions.create(model="b", prompt="Hi", max_tokens=2)
            assert error.value.body["code"] == "model_not_found" and "'b'" in error.value.body["message"], error.value
            metrics = httpx.get(f"{base_url}/metrics").text
    finally:
        async_llm.shutdown()
    counts = {
        s.labels["lora_name"]: s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
        if s.name == "nanovllm:lora_requests_total"
    }
    assert counts == {"a": 2, "c": 1}, counts
