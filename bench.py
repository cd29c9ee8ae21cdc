"""Throughput benchmark: nano-vllm's workload, output tokens per second of one timed generate().

    python bench.py                      # Qwen3-0.6B shape, random weights (GPU: full workload)
    python bench.py --model DIR          # a real checkpoint
    python bench.py --shape qwen3-8b     # another built-in shape
    python bench.py --shape qwen3-30b-a3b  # mixture of experts: 128 experts, top-8 (about 61 GB: GPU only)
    python bench.py --shape gemma3-1b    # other families: gemma3-1b, phi-1.5
    python bench.py --tensor-parallel-size 2   # the model split over 2 GPUs
    python bench.py --quantization fp8   # FP8 weights (online); awq, gptq, w4a16, fp8-block...: random weights
                                         # in that published format (without --model)
    python bench.py --kv-cache-dtype fp8       # K/V stored in FP8 (e4m3): twice the tokens in the same memory
    python bench.py --num-loras 4        # 4 random LoRA adapters (rank 16, all seven projections) and the base
    python bench.py --data-parallel-size 2     # 2 replicas of the model, each with half the prompts

Workload (as nano-vllm's bench.py): random.seed(0); 256 requests; each prompt has
randint(100, 1024) token ids drawn with randint(0, 10000); each request then gets
SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=randint(100, 1024)). One warm-up
generate runs first. Without a GPU the workload is scaled down (see CPU_WORKLOAD) and says so.
"""

import argparse
import gc
import json
import os
import random
import tempfile
import time
from typing import Any

import torch

from nanovllm import LLM, LoRARequest, SamplingParams
from nanovllm.engine.llm_engine import LLMEngine

# Real configs of the shapes we benchmark (from the models' published config.json).
QWEN3_COMMON = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 40960,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "torch_dtype": "bfloat16",
    "vocab_size": 151936,
}
SHAPES = {
    "qwen3-0.6b": {
        **QWEN3_COMMON,
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_attention_heads": 16,
        "num_hidden_layers": 28,
        "tie_word_embeddings": True,
    },
    "qwen3-8b": {
        **QWEN3_COMMON,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_attention_heads": 32,
        "num_hidden_layers": 36,
        "tie_word_embeddings": False,
    },
    "qwen3-30b-a3b": {
        **QWEN3_COMMON,
        "architectures": ["Qwen3MoeForCausalLM"],
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "num_hidden_layers": 48,
        "tie_word_embeddings": False,
    },
}
# Dense families other than Qwen and LLaMA at Qwen3-0.6B's size class (issue #28's benchmark).
SHAPES["gemma3-1b"] = {  # google/gemma-3-1b-it (text): 5 of every 6 layers slide over 512 keys
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "attention_bias": False,
    "attn_logit_softcapping": None,
    "bos_token_id": 2,
    "eos_token_id": [1, 106],
    "final_logit_softcapping": None,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 1152,
    "intermediate_size": 6912,
    "max_position_embeddings": 32768,
    "num_attention_heads": 4,
    "num_hidden_layers": 26,
    "num_key_value_heads": 1,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "vocab_size": 262144,
}
SHAPES["phi-1.5"] = {  # microsoft/phi-1_5 (published in float32; benchmarked in bfloat16 as the others)
    "architectures": ["PhiForCausalLM"],
    "model_type": "phi",
    "hidden_act": "gelu_new",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048,
    "num_attention_heads": 32,
    "num_hidden_layers": 24,
    "num_key_value_heads": 32,
    "partial_rotary_factor": 0.5,
    "qk_layernorm": False,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 51200,
}
GPU_ONLY_SHAPES = {"qwen3-30b-a3b"}  # their random weights alone outgrow a CPU machine's memory (61 GB in bf16)
# Random weights in a published format: the quantization_config its config.json carries.
FP8_ARGS = {"num_bits": 8, "type": "float", "symmetric": True}
W4A16_WEIGHTS = {
    "num_bits": 4,
    "type": "int",
    "strategy": "group",
    "group_size": 128,
    "symmetric": True,
    "dynamic": False,
}
FP8_CHANNEL = {
    "weights": {**FP8_ARGS, "strategy": "channel", "dynamic": False},
    "input_activations": {**FP8_ARGS, "strategy": "token", "dynamic": True},
}
QUANTIZED_FORMATS: dict[str, dict[str, Any]] = {
    "fp8-block": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
    "fp8-dynamic": {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], **FP8_CHANNEL}},
        "ignore": ["lm_head"],
    },
    "w4a16": {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": W4A16_WEIGHTS}},
        "ignore": ["lm_head"],
    },
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
}
LORA_RANK = 16  # the LoRA benchmark: rank 16 on q, k, v, o, gate, up and down
LORA_WEIGHT_STD = 0.02  # spread of the random adapter weights, as the dummy model's
GPU_WORKLOAD = {"num_seqs": 256, "max_input_len": 1024, "max_output_len": 1024}
CPU_WORKLOAD = {"num_seqs": 8, "max_input_len": 64, "max_output_len": 32}  # about a minute on 2 cores


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a Hugging Face model dir; default: random weights of --shape")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b")
    parser.add_argument("--num-seqs", type=int, help="requests (default 256 on GPU, 8 on CPU)")
    parser.add_argument("--max-input-len", type=int, help="longest prompt (default 1024 on GPU, 64 on CPU)")
    parser.add_argument("--max-output-len", type=int, help="longest completion (default 1024 on GPU, 32 on CPU)")
    parser.add_argument("--min-len", type=int, default=100, help="shortest prompt and completion (default 100)")
    parser.add_argument("--backend", default="auto", help="attention_backend: auto, torch, triton, flash_attn")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--no-async-scheduling", action="store_true", help="run each step before scheduling the next")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto (the model's dtype), fp8, fp8_e4m3, fp8_e5m2")
    parser.add_argument("--top-p", type=float, default=1.0, help="top_p of every request (default 1.0 = off)")
    parser.add_argument("--top-k", type=int, default=0, help="top_k of every request (default 0 = off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="of every request (default 1.0 = off)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs (processes) to split the model over")
    parser.add_argument(
        "--quantization", choices=["fp8", *QUANTIZED_FORMATS],
        help="fp8: quantize the weights to FP8 as they load; another: random weights in that format (no --model)",
    )  # fmt: skip
    parser.add_argument(
        "--num-loras", type=int, default=0, help="random LoRA adapters; requests go round-robin over them and the base"
    )
    parser.add_argument("--data-parallel-size", type=int, default=1, help="replicas sharing the prompts (spawned)")
    return parser.parse_args()


def build_dummy_llm(shape: str, quantized_format: str | None = None, **engine_args: Any) -> LLM:
    """An engine over random weights of a built-in shape (in a quantized format if given); no tokenizer, so
    prompts are token ids."""
    config = dict(SHAPES[shape])
    if quantized_format is not None:
        config["quantization_config"] = QUANTIZED_FORMATS[quantized_format]
    with tempfile.TemporaryDirectory() as tmp:  # only config.json is read, at construction
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f)
        return LLM(tmp, load_format="dummy", skip_tokenizer_init=True, **engine_args)


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmarked model's config.json."""
    if not args.model:
        return SHAPES[args.shape]
    with open(os.path.join(args.model, "config.json")) as f:
        config: dict[str, Any] = json.load(f)
    return config


def write_random_adapters(config: dict[str, Any], num_loras: int, root: str) -> list[LoRARequest]:
    """PEFT-layout adapters of rank LORA_RANK on every projection of a model with this config.json, in ``root``."""
    from safetensors.torch import save_file

    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_size = config["num_attention_heads"] * head_dim
    kv_size = config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
    shapes = {  # module -> (its block, out_features, in_features)
        "q_proj": ("self_attn", q_size, hidden), "k_proj": ("self_attn", kv_size, hidden),
        "v_proj": ("self_attn", kv_size, hidden), "o_proj": ("self_attn", hidden, q_size),
        "gate_proj": ("mlp", inter, hidden), "up_proj": ("mlp", inter, hidden), "down_proj": ("mlp", hidden, inter),
    }  # fmt: skip
    requests = []
    for lora_id in range(1, num_loras + 1):
        path = os.path.join(root, f"lora{lora_id}")
        os.makedirs(path)
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump(
                {"peft_type": "LORA", "r": LORA_RANK, "lora_alpha": 2 * LORA_RANK, "target_modules": list(shapes)}, f
            )
        weights = {}
        for layer in range(layers):
            for module, (block, out_features, in_features) in shapes.items():
                prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
                weights[f"{prefix}.lora_A.weight"] = LORA_WEIGHT_STD * torch.randn(LORA_RANK, in_features)
                weights[f"{prefix}.lora_B.weight"] = LORA_WEIGHT_STD * torch.randn(out_features, LORA_RANK)
        save_file(weights, os.path.join(path, "adapter_model.safetensors"))
        requests.append(LoRARequest(f"lora{lora_id}", lora_id, path))
    return requests


def make_workload(
    num_seqs: int, min_len: int, max_input_len: int, max_output_len: int, **sampling: Any
) -> tuple[list, list]:
    """nano-vllm's workload; ``sampling`` adds SamplingParams fields (top_p, top_k, ...) to every request."""
    random.seed(0)
    prompts = [
        [random.randint(0, 10000) for _ in range(random.randint(min_len, max_input_len))] for _ in range(num_seqs)
    ]
    params = [
        SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=random.randint(min_len, max_output_len), **sampling)
        for _ in range(num_seqs)
    ]
    return prompts, params


class FullCollectionTimer:
    """A gc callback that times each full (oldest-generation) collection: no step is launched meanwhile."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if info["generation"] == 2:
            if phase == "start":
                self._start = time.perf_counter()
            else:
                self.seconds.append(time.perf_counter() - self._start)


def main() -> None:
    args = parse_args()
    on_gpu = torch.cuda.is_available()
    workload = dict(GPU_WORKLOAD if on_gpu else CPU_WORKLOAD)
    for key in workload:
        if getattr(args, key) is not None:
            workload[key] = getattr(args, key)
    min_len = min(args.min_len, workload["max_input_len"], workload["max_output_len"])
    if not on_gpu and not args.model and args.shape in GPU_ONLY_SHAPES:
        raise SystemExit(f"--shape {args.shape} needs a GPU; without one, use --shape qwen3-0.6b or --model DIR")
    if not on_gpu:
        print(f"no GPU: running a scaled-down workload {workload}, prompts/outputs from {min_len} tokens")
    engine_args = dict(
        max_model_len=args.max_model_len,
        enforce_eager=args.enforce_eager,
        async_scheduling=not args.no_async_scheduling,
        attention_backend=args.backend,
        tensor_parallel_size=args.tensor_parallel_size,
        kv_cache_dtype=args.kv_cache_dtype,
        data_parallel_size=args.data_parallel_size,
    )
    quantized_format = args.quantization if args.quantization in QUANTIZED_FORMATS else None
    if args.quantization == "fp8":
        engine_args["quantization"] = "fp8"
    if args.num_loras:
        engine_args.update(enable_lora=True, max_loras=args.num_loras, max_lora_rank=LORA_RANK)
    if args.model:
        if quantized_format is not None:
            raise SystemExit(f"--quantization {quantized_format} makes random weights; a --model is read as it is")
        llm = LLM(args.model, dtype=args.dtype, **engine_args)
    else:
        llm = build_dummy_llm(args.shape, quantized_format, dtype=args.dtype, **engine_args)
    if isinstance(llm.engine, LLMEngine):  # the memory plan's outcome: an FP8 cache holds twice bfloat16's tokens
        print(f"model weights on rank 0: {llm.engine.runner.weight_bytes / (1 << 30):.2f} GiB")
        print(f"KV cache ({args.kv_cache_dtype}): {llm.engine.stats().kv_cache_capacity_tokens} tokens")
    sampling = dict(top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty)
    prompts, params = make_workload(
        workload["num_seqs"], min_len, workload["max_input_len"], workload["max_output_len"], **sampling
    )
    adapter_dir = tempfile.TemporaryDirectory()  # each request's adapter is read when it arrives: kept to the end
    adapters = write_random_adapters(model_config(args), args.num_loras, adapter_dir.name)
    lora_requests = [[None, *adapters][i % (len(adapters) + 1)] for i in range(len(prompts))]
    llm.generate([[1, 2, 3]] if llm.config.skip_tokenizer_init else ["Benchmark: "], use_tqdm=False)
    if adapters:  # the LoRA kernels compile on first use too
        llm.generate([[1, 2, 3]] * len(adapters), use_tqdm=False, lora_request=adapters)
    if any(value != default for value, default in zip(sampling.values(), (1.0, 0, 1.0), strict=True)):
        # The sampler compiles one graph per combination of stages and batch size 1 / >1 on first use:
        # warm that up too, as the default path is warmed above, so the timed run measures no compilation.
        warmup = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n, **sampling) for n in (4, 8)]
        llm.generate([[1, 2, 3], [4, 5, 6]], warmup, use_tqdm=False)
    full_collections = FullCollectionTimer()
    gc.callbacks.append(full_collections)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=lora_requests if adapters else None)
    elapsed = time.perf_counter() - start
    gc.callbacks.remove(full_collections)
    llm.close()
    adapter_dir.cleanup()
    num_output_tokens = sum(len(out.token_ids) for out in outputs)
    pauses = full_collections.seconds
    print(f"full garbage collections in the timed run: {len(pauses)}, {1e3 * sum(pauses):.0f} ms")
    print(f"Total: {num_output_tokens} tok, Time: {elapsed:.2f} s, Throughput: {num_output_tokens / elapsed:.2f} tok/s")


if __name__ == "__main__":
    main()
