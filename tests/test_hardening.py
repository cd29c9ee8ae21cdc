"""What a new user tripped over (issue #24, the library's half): prompt shapes, limits, broken model
directories, a tensor-parallel script without a main guard, and memory that climbed like a leak."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovllm import LLM, SamplingParams
from nanovllm.config import EngineConfig
from tests.test_engine import BASE_ARGS

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
ARGS = {**BASE_ARGS, "num_kvcache_blocks": 64}


@pytest.fixture(scope="module")
def llm(tiny_models: dict[str, Path]):
    with LLM(str(tiny_models["qwen3"]), **ARGS) as llm:
        yield llm


def test_a_bare_prompt_is_one_prompt(llm: LLM) -> None:
    """Guards against a bare string (or token-id list) being split into one prompt per character (or token)."""
    text = llm.generate("Hello", GREEDY, use_tqdm=False)
    ids = llm.generate([5, 6, 7], GREEDY, use_tqdm=False)
    both = llm.generate(["Hello", [5, 6, 7]], GREEDY, use_tqdm=False)
    assert [len(text), len(ids)] == [1, 1], (len(text), len(ids))
    assert [text[0].token_ids, ids[0].token_ids] == [out.token_ids for out in both]
    assert {out.request_id for out in llm.stream("Hello", GREEDY)} == {"0"}
    assert len(llm.beam_search("Hello", beam_width=2, max_tokens=2)) == 1
    assert llm.generate([], GREEDY, use_tqdm=False) == []


@pytest.mark.parametrize(
    ("prompts", "params", "error", "message"),
    [
        (np.array([1, 2, 3]), GREEDY, TypeError, r"ndarray; convert it with \.tolist\(\)"),
        (None, GREEDY, TypeError, "got NoneType"),
        ([[1, True]], GREEDY, TypeError, r"token ids must be ints, got True"),
        (["a", 5, "b"], GREEDY, TypeError, "prompt 1 must be a str or a list of int token ids, got int"),
        ("Hello", {"max_tokens": 3}, TypeError, r"got dict; build one with SamplingParams\(\*\*your_dict\)"),
        (["a", "b"], [GREEDY, "x"], TypeError, r"sampling_params\[1\] must be a SamplingParams, got str"),
        (["a", "b"], [GREEDY], ValueError, "got 2 prompts but 1 SamplingParams"),
    ],
)
def test_bad_prompts_and_params_are_named(llm: LLM, prompts: object, params: object, error: type, message: str) -> None:
    """Guards against bare AttributeErrors or len() TypeErrors from deep inside for inputs of the wrong type."""
    with pytest.raises(error, match=message):
        llm.generate(prompts, params, use_tqdm=False)  # type: ignore[arg-type]
    assert llm.engine is not None and not llm.engine.has_unfinished_requests()


def test_n_is_bounded_by_max_num_seqs(llm: LLM) -> None:
    """Guards against a request with a huge n (100,000 once held an engine for 20 s and 300 MB): n completions
    that could never run together are refused at once."""
    with pytest.raises(ValueError, match=r"n=513 completions exceed max_num_seqs=512"):
        llm.generate("Hello", SamplingParams(n=513, max_tokens=4), use_tqdm=False)
    assert len(llm.generate("Hello", SamplingParams(n=3, max_tokens=4), use_tqdm=False)[0].outputs) == 3


def test_a_directory_without_tokenizer_files_is_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Guards against transformers building an empty tokenizer for a directory without tokenizer files, after
    which every text prompt failed as 'empty'."""
    model_dir = tmp_path / "no_tokenizer"
    model_dir.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(tiny_models["qwen3"] / name, model_dir / name)
    with pytest.raises(ValueError, match=r"tokenizer in .* is empty.*tokenizer\.json.*skip_tokenizer_init=True"):
        LLM(str(model_dir), **ARGS)
    with LLM(str(model_dir), skip_tokenizer_init=True, **ARGS) as llm:
        assert len(llm.generate([1, 2, 3], GREEDY, use_tqdm=False)[0].token_ids) == GREEDY.max_tokens


def broken_copy(src: Path, dst: Path, edit_tensors=None, config_text: str | None = None) -> Path:  # type: ignore[no-untyped-def]
    shutil.copytree(src, dst)
    if edit_tensors is not None:
        tensors = load_file(str(dst / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(dst / "model.safetensors"))
    if config_text is not None:
        (dst / "config.json").write_text(config_text)
    return dst


def test_loader_errors_name_the_file_tensor_and_shapes(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Guards against bare library errors (a torch narrow() message, safetensors' or json's own) that do not say
    which file or tensor is wrong, and against a too-large tensor loading silently in part."""
    src = tiny_models["qwen3"]
    name = "model.layers.0.self_attn.q_proj.weight"

    def widen(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = torch.cat([tensors[name], tensors[name]])  # twice the query heads the config says

    rows, cols = load_file(str(src / "model.safetensors"))[name].shape
    wrong_shape = broken_copy(src, tmp_path / "shape", edit_tensors=widen)
    expected = rf"model.safetensors in .*'{name}' has shape \({2 * rows}, {cols}\), expected \({rows}, {cols}\)"
    with pytest.raises(ValueError, match=expected):
        LLM(str(wrong_shape), **ARGS)
    corrupt = broken_copy(src, tmp_path / "corrupt")
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file"):
        LLM(str(corrupt), **ARGS)
    bad_json = broken_copy(src, tmp_path / "json", config_text='{"architectures": [')
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        LLM(str(bad_json), **ARGS)
    config = json.loads((src / "config.json").read_text())
    del config["hidden_size"]
    no_field = broken_copy(src, tmp_path / "field", config_text=json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json lacks the field 'hidden_size'"):
        LLM(str(no_field), **ARGS)


def test_quantized_tensors_never_load_into_float_parameters(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Guards against FP8 codes converted to the model's dtype without their scales (a Qwen3-MoE checkpoint with
    FP8 experts loaded garbage experts silently), and against a bare "no parameter" for an expert's scale tensor:
    both must say that quantized experts are not supported."""
    src = tiny_models["qwen3_moe"]
    names = load_file(str(src / "model.safetensors")).keys()
    expert = next(name for name in sorted(names) if ".experts.0.down_proj.weight" in name)

    def to_fp8(tensors: dict[str, torch.Tensor]) -> None:
        tensors[expert] = tensors[expert].to(torch.float8_e4m3fn)

    def add_scale(tensors: dict[str, torch.Tensor]) -> None:
        tensors[expert.removesuffix("weight") + "weight_scale_inv"] = torch.ones(1, 1)

    fp8_expert = broken_copy(src, tmp_path / "fp8", edit_tensors=to_fp8)
    with pytest.raises(
        ValueError, match=rf"'{expert}' is torch.float8_e4m3fn, a quantized tensor.*experts unquantized"
    ):
        LLM(str(fp8_expert), **ARGS)
    with_scale = broken_copy(src, tmp_path / "scale", edit_tensors=add_scale)
    with pytest.raises(ValueError, match=r"weight_scale_inv' has no parameter.*quantized experts: issue #26"):
        LLM(str(with_scale), **ARGS)


def test_a_tensor_parallel_script_without_a_main_guard_is_told_why(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """Guards against a bare EOFError from the worker start-up when a script creates a tensor-parallel LLM at
    module level (spawn imports the script again in each worker)."""
    script = tmp_path / "no_guard.py"
    script.write_text(
        f"from nanovllm import LLM\nllm = LLM({str(tiny_models['qwen3'])!r}, tensor_parallel_size=2, **{ARGS!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    last_lines = result.stderr.strip().splitlines()[-3:]
    assert any("WorkerDiedError" in line and 'if __name__ == "__main__":' in line for line in last_lines), last_lines
    assert any("exited with code 1" in line for line in last_lines), last_lines


def resident_bytes() -> int:
    """This process's resident memory (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_cpu_memory_is_flat_from_the_first_request(tiny_models: dict[str, Path]) -> None:
    """Guards against memory that climbs like a leak: freed KV blocks are reused least recently freed first, so a
    lazily touched CPU cache took new pages for a long time. The cache's pages are taken at start-up; a run of
    requests that walks through every block adds (almost) nothing."""
    num_blocks = 1024  # 16-token blocks of 8 KiB (2 layers x K, V x 2 heads x 16 x float32): 8 MiB
    args = {**BASE_ARGS, "num_kvcache_blocks": num_blocks, "max_num_seqs": 8}
    before = resident_bytes()
    with LLM(str(tiny_models["qwen3"]), **args) as llm:
        assert llm.engine is not None
        cache_bytes = llm.engine.runner.kv_cache.numel() * llm.engine.runner.kv_cache.element_size()
        assert resident_bytes() - before >= 0.9 * cache_bytes, "the KV cache's pages were not taken at start-up"
        prompts = [[1 + i % 300, 2 + i % 7] * 20 for i in range(8)]
        llm.generate(prompts, GREEDY, use_tqdm=False)  # warm-up: the run's own allocations
        start = resident_bytes()
        for round_index in range(num_blocks // (8 * 3)):  # every block handed out at least once
            distinct = [[3 + round_index, *prompt] for prompt in prompts]
            llm.generate(distinct, GREEDY, use_tqdm=False)
        grown = resident_bytes() - start
    assert grown < cache_bytes / 4, f"resident memory grew {grown / 2**20:.1f} MiB over the run"


def test_every_engine_flag_has_a_description() -> None:
    """Guards `nanovllm serve --help`: each engine flag carries the one-line comment of its EngineConfig field."""
    from nanovllm.serving.server import make_parser

    text = make_parser().format_help()
    for name, comment in EngineConfig.field_help().items():
        assert f"--{name.replace('_', '-')}" in text and comment.split()[0] in text, name
    assert "most sequences running at once" in text
