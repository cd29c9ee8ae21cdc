"""Hugging Face transformers' continuous batching against nanovllm on one workload, in one run.

    python benchmarks/hf_baseline.py [--num-seqs 64] [--max-tokens 256]

Both engines get the same random-weight Qwen3-0.6B-shaped model and bench.py's prompts
(random.seed(0), prompt lengths randint(100, 1024), ids randint(0, 10000)); transformers'
generate_batch takes one max_new_tokens for all requests, so both use --max-tokens for every
request, temperature 0.6, EOS ignored. Throughput = output tokens / wall time of the timed run.
"""

import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import SHAPES, build_dummy_llm  # noqa: E402
from nanovllm import SamplingParams  # noqa: E402


def make_prompts(num_seqs: int) -> list[list[int]]:
    random.seed(0)
    return [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(num_seqs)]


def run_transformers(config: dict, prompts: list[list[int]], max_tokens: int) -> tuple[int, float]:
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen3Config

    model = AutoModelForCausalLM.from_config(Qwen3Config(**config), dtype=torch.bfloat16).cuda().eval()
    generation_config = GenerationConfig(
        max_new_tokens=max_tokens, do_sample=True, temperature=0.6, eos_token_id=-1, pad_token_id=0
    )
    model.generate_batch(inputs=prompts[:4], generation_config=generation_config)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = model.generate_batch(inputs=prompts, generation_config=generation_config)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    num_tokens = sum(len(out.generated_tokens) for out in outputs.values())
    del model
    torch.cuda.empty_cache()
    return num_tokens, elapsed


def run_nanovllm(prompts: list[list[int]], max_tokens: int, backend: str) -> tuple[int, float]:
    llm = build_dummy_llm("qwen3-0.6b", attention_backend=backend)
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=max_tokens)
    llm.generate(prompts[:4], params, use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    llm.close()
    return sum(len(out.token_ids) for out in outputs), elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-seqs", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    config = SHAPES["qwen3-0.6b"]
    prompts = make_prompts(args.num_seqs)
    results = {"nanovllm": run_nanovllm(prompts, args.max_tokens, args.backend)}
    try:
        results["transformers generate_batch"] = run_transformers(config, prompts, args.max_tokens)
    except Exception as e:  # report and keep our figure: the baseline's API moves between releases
        print(f"transformers baseline failed: {type(e).__name__}: {e}")
    for name, (num_tokens, elapsed) in results.items():
        print(f"{name:30s} {num_tokens:7d} tok in {elapsed:7.2f} s = {num_tokens / elapsed:9.1f} tok/s")


if __name__ == "__main__":
    main()
