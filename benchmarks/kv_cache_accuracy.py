"""How close an FP8 KV cache stays to the model-dtype cache, measured as vLLM measures it (check_logprobs_close).

    python benchmarks/kv_cache_accuracy.py                       # CPU: the tiny test models of every architecture
    python benchmarks/kv_cache_accuracy.py --model DIR           # a real checkpoint (GPU: its bfloat16 cache)
    python benchmarks/kv_cache_accuracy.py --shape qwen3-0.6b    # random weights of a bench.py shape (GPU)

Both runs decode the same random-token prompts greedily with the top-N logprobs on. For each sequence: where the
tokens first differ (the comparison stops there), whether each run's token is among the other's top-N there, and
the largest logprob gap of a token both rank up to that point (tests/logprob_check.py). Without --model the
reference cache is float32 (the models are built in float32 by transformers, tests/model_fixtures.py).
"""

import argparse
import json
import random
import statistics
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout
sys.path.insert(0, str(ROOT / "tests"))  # the comparison and the tiny models live with the tests

from logprob_check import compare_runs  # noqa: E402

from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.outputs import CompletionOutput  # noqa: E402

TINY_ARCHS = ("qwen3", "qwen2", "llama", "llama2", "mistral")
TINY_VOCAB = 400  # prompt ids below the tiny tokenizer's size (model_fixtures.NUM_BPE_TOKENS)
TINY_ENGINE_ARGS = dict(device="cpu", dtype="float32", kvcache_block_size=16, num_kvcache_blocks=256, max_model_len=256)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a Hugging Face model dir; default: the tiny test models (CPU)")
    parser.add_argument("--shape", help="instead of --model: random weights of one of bench.py's shapes")
    parser.add_argument("--kv-cache-dtype", nargs="+", default=["fp8", "fp8_e5m2"], help="the caches to compare")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-prompt-len", type=int, default=64, help="prompts have 1 to this many tokens")
    parser.add_argument("--max-tokens", type=int, default=16, help="greedy tokens per prompt")
    parser.add_argument("--logprobs", type=int, default=5, help="top-N of the check (vLLM's check: 5)")
    return parser.parse_args()


def greedy(llm: LLM, prompts: list[list[int]], args: argparse.Namespace) -> list[CompletionOutput]:
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, logprobs=args.logprobs)
    with llm:
        return [out.outputs[0] for out in llm.generate(prompts, params, use_tqdm=False)]


def measure(name: str, make_llm: Callable[..., LLM], vocab: int, args: argparse.Namespace) -> None:
    """Print one line per cache of args.kv_cache_dtype; ``make_llm(kv_cache_dtype=...)`` builds an engine."""
    rng = random.Random(0)
    lengths = [rng.randint(1, args.max_prompt_len) for _ in range(args.num_prompts)]
    prompts = [[rng.randrange(vocab) for _ in range(length)] for length in lengths]
    reference = greedy(make_llm(kv_cache_dtype="auto"), prompts, args)
    for kv_cache_dtype in args.kv_cache_dtype:
        comparisons = compare_runs(reference, greedy(make_llm(kv_cache_dtype=kv_cache_dtype), prompts, args))
        firsts = [args.max_tokens if c.first_difference is None else c.first_difference for c in comparisons]
        num_not_close = sum(not c.is_close for c in comparisons)
        print(
            f"{name:8} {kv_cache_dtype:9} sequences {len(comparisons)}, not close (top-{args.logprobs}) "
            f"{num_not_close}, identical {firsts.count(args.max_tokens)}, first difference median "
            f"{statistics.median(firsts)} min {min(firsts)}, largest logprob gap "
            f"{max(c.largest_logprob_gap for c in comparisons):.3f}"
        )


def main() -> None:
    args = parse_args()
    if args.shape:
        from bench import SHAPES, build_dummy_llm

        measure(args.shape, partial(build_dummy_llm, args.shape), SHAPES[args.shape]["vocab_size"], args)
    elif args.model:
        vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
        device_args = {} if torch.cuda.is_available() else {"device": "cpu", "dtype": "float32"}
        measure(Path(args.model).name, partial(LLM, args.model, **device_args), vocab, args)
    else:
        from model_fixtures import write_tiny_model

        with tempfile.TemporaryDirectory() as tmp:
            for arch in TINY_ARCHS:
                model_dir = str(write_tiny_model(Path(tmp) / arch, arch))
                measure(arch, partial(LLM, model_dir, **TINY_ENGINE_ARGS), TINY_VOCAB, args)


if __name__ == "__main__":
    main()
