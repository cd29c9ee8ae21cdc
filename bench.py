"""Throughput benchmark: nano-vllm's workload, output tokens per second of one timed generate().

    python bench.py                      # Qwen3-0.6B shape, random weights (GPU: full workload)
    python bench.py --model DIR          # a real checkpoint
    python bench.py --shape qwen3-8b     # another built-in shape
    python bench.py --tensor-parallel-size 2   # the model split over 2 GPUs
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

from nanovllm import LLM, SamplingParams

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
}
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
    parser.add_argument("--top-p", type=float, default=1.0, help="top_p of every request (default 1.0 = off)")
    parser.add_argument("--top-k", type=int, default=0, help="top_k of every request (default 0 = off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="of every request (default 1.0 = off)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs (processes) to split the model over")
    parser.add_argument("--data-parallel-size", type=int, default=1, help="replicas sharing the prompts (spawned)")
    return parser.parse_args()


def build_dummy_llm(shape: str, **engine_args: Any) -> LLM:
    """An engine over random weights of a built-in shape; no tokenizer, so prompts are token ids."""
    with tempfile.TemporaryDirectory() as tmp:  # only config.json is read, at construction
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(SHAPES[shape], f)
        return LLM(tmp, load_format="dummy", skip_tokenizer_init=True, **engine_args)


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
    if not on_gpu:
        print(f"no GPU: running a scaled-down workload {workload}, prompts/outputs from {min_len} tokens")
    engine_args = dict(
        max_model_len=args.max_model_len,
        enforce_eager=args.enforce_eager,
        async_scheduling=not args.no_async_scheduling,
        attention_backend=args.backend,
        tensor_parallel_size=args.tensor_parallel_size,
        data_parallel_size=args.data_parallel_size,
    )
    if args.model:
        llm = LLM(args.model, dtype=args.dtype, **engine_args)
    else:
        llm = build_dummy_llm(args.shape, dtype=args.dtype, **engine_args)
    sampling = dict(top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty)
    prompts, params = make_workload(
        workload["num_seqs"], min_len, workload["max_input_len"], workload["max_output_len"], **sampling
    )
    llm.generate([[1, 2, 3]] if llm.config.skip_tokenizer_init else ["Benchmark: "], use_tqdm=False)
    if any(value != default for value, default in zip(sampling.values(), (1.0, 0, 1.0), strict=True)):
        # The sampler compiles one graph per combination of stages and batch size 1 / >1 on first use:
        # warm that up too, as the default path is warmed above, so the timed run measures no compilation.
        warmup = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n, **sampling) for n in (4, 8)]
        llm.generate([[1, 2, 3], [4, 5, 6]], warmup, use_tqdm=False)
    full_collections = FullCollectionTimer()
    gc.callbacks.append(full_collections)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    gc.callbacks.remove(full_collections)
    llm.close()
    num_output_tokens = sum(len(out.token_ids) for out in outputs)
    pauses = full_collections.seconds
    print(f"full garbage collections in the timed run: {len(pauses)}, {1e3 * sum(pauses):.0f} ms")
    print(f"Total: {num_output_tokens} tok, Time: {elapsed:.2f} s, Throughput: {num_output_tokens / elapsed:.2f} tok/s")


if __name__ == "__main__":
    main()
