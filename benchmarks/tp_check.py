"""Tensor parallelism on real GPUs, on a random-weight model with a real config (run by tp_check.sh).

    python benchmarks/tp_check.py --tp 2 [--shape qwen3-0.6b|tiny] [--dtype bfloat16]

1. Greedy tokens of TP=N equal TP=1 (CUDA graphs on). In bf16 the all-reduce adds partial sums
   in another order than one GPU's matmul, so a near-tie can flip: the first divergences are
   printed with TP=1's top-2 logits at that step (a gap of a bf16 ulp or two is a tie), and the
   top-5 logprobs of every step where both runs saw the same tokens are compared with a tolerance.
2. TP=N with CUDA graphs equals TP=N eager.
3. A worker killed mid-run makes generate() raise within a few seconds (NCCL: the watchdog aborts).

In 16 bits, TP=1 is also run in float32: how far TP=1's and TP=N's logprobs each fall from float32
tells whether TP=N adds error beyond what 16-bit arithmetic makes on one GPU. That comparison is the
verdict; the fixed tolerance of step 1 is only a screen. For the Qwen3-0.6B shape in bf16 (CPU, gloo),
one device's own logprobs moved a median 0.23 from float32 (max 2.15), more than the 0.25 tolerance
allows between two bf16 runs. ``--accuracy-only`` runs just the float32 comparison.
"""

import argparse
import faulthandler
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]
from model_fixtures import write_tiny_model  # noqa: E402

from bench import SHAPES  # noqa: E402
from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.outputs import CompletionOutput  # noqa: E402
from nanovllm.parallel.failures import WorkerDiedError  # noqa: E402
from nanovllm.runner.model_inputs import build_model_inputs  # noqa: E402
from nanovllm.scheduler.batch import ScheduledBatch  # noqa: E402
from nanovllm.scheduler.sequence import Sequence  # noqa: E402

CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "num_hidden_layers", "vocab_size", "max_position_embeddings", "tie_word_embeddings")  # fmt: skip
PARAMS = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True, logprobs=5)
# Largest logprob difference accepted where both runs saw the same tokens: two bf16 steps of a logit in
# [16, 32), where these random-weight models' top logits sit; a few float32 roundings otherwise.
LOGPROB_TOLERANCE = {"bfloat16": 0.25, "float16": 0.03, "float32": 1e-3}
ARGS = dict(kvcache_block_size=256, max_model_len=2048, gpu_memory_utilization=0.5, skip_tokenizer_init=True)


def prompts(num: int = 16) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(500) for _ in range(rng.randint(20, 300))] for _ in range(num)]


def greedy(model_dir: str, dtype: str, **args: object) -> list[CompletionOutput]:
    start = time.perf_counter()
    with LLM(model_dir, dtype=dtype, **{**ARGS, **args}) as llm:
        completions = [out.outputs[0] for out in llm.generate(prompts(), PARAMS, use_tqdm=False)]
    print(f"  {args or 'TP=1'}: {time.perf_counter() - start:.1f} s (engine start included)")
    return completions


def top2_logits(model_dir: str, dtype: str, token_ids: list[int]) -> tuple[float, float]:
    """TP=1's two largest logits after ``token_ids``."""
    with LLM(model_dir, dtype=dtype, enforce_eager=True, **ARGS) as llm:
        assert llm.engine is not None
        seq = Sequence(token_ids, PARAMS)
        llm.engine.scheduler.block_manager.allocate(seq)
        seq.num_computed_tokens = 0  # compute every position, cached or not
        batch = ScheduledBatch([seq], [seq.num_tokens], is_prefill=True)
        runner = llm.engine.runner
        with torch.inference_mode():
            logits = runner.logits(build_model_inputs(batch, runner.block_size, runner.device))[0].float()
        top2 = logits.topk(2).values
        return float(top2[0]), float(top2[1])


def logprob_differences(want: CompletionOutput, got: CompletionOutput) -> list[float]:
    """|logprob difference| of every token both runs list, at each step both saw the same context."""
    assert want.logprobs is not None and got.logprobs is not None
    num_shared = next((k for k, (x, y) in enumerate(zip(want.token_ids, got.token_ids, strict=True)) if x != y), None)
    num_steps = len(want.token_ids) if num_shared is None else num_shared + 1  # the diverging step included
    return [
        abs(want.logprobs[step][token] - got.logprobs[step][token])
        for step in range(num_steps)
        for token in want.logprobs[step].keys() & got.logprobs[step].keys()
    ]


def sorted_differences(want: list[CompletionOutput], got: list[CompletionOutput]) -> list[float]:
    """Every sequence's logprob_differences, smallest first."""
    return sorted(d for a, b in zip(want, got, strict=True) for d in logprob_differences(a, b))


def compare(name: str, want: list[CompletionOutput], got: list[CompletionOutput], model_dir: str, dtype: str) -> bool:
    differ = [i for i, (a, b) in enumerate(zip(want, got, strict=True)) if a.token_ids != b.token_ids]
    print(f"  {name}: {len(want) - len(differ)} of {len(want)} sequences equal")
    deltas = sorted_differences(want, got)
    tolerance = LOGPROB_TOLERANCE.get(dtype, 0.25)
    verdict = "within" if deltas[-1] <= tolerance else "OUTSIDE"
    print(f"    logprobs where both saw the same tokens ({len(deltas)} values): max |diff| {deltas[-1]:.3g}, ", end="")
    print(f"median {deltas[len(deltas) // 2]:.3g}: {verdict} the tolerance {tolerance:g}")
    for i in differ[:2]:
        a, b = want[i].token_ids, got[i].token_ids
        step = next(k for k, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
        first, second = top2_logits(model_dir, dtype, prompts()[i] + a[:step])
        print(f"    seq {i} diverges at step {step}: {a[step]} vs {b[step]}", end="")
        print(f"; TP=1 top-2 logits {first:.5g}, {second:.5g}")
    return not differ and deltas[-1] <= tolerance


def distance_to_float32(name: str, exact: list[CompletionOutput], got: list[CompletionOutput]) -> float:
    """Print and return the median |logprob difference| from the float32 run, at steps with the same context."""
    deltas = sorted_differences(exact, got)
    median = deltas[len(deltas) // 2]
    print(f"    {name} vs TP=1 float32 ({len(deltas)} values): median |diff| {median:.3g}, max {deltas[-1]:.3g}")
    return median


def kill_worker_mid_run(model_dir: str, dtype: str, tp: int) -> None:
    llm = LLM(model_dir, dtype=dtype, tensor_parallel_size=tp, **ARGS)
    assert llm.engine is not None and llm.engine.workers is not None
    pid = llm.engine.workers.processes[-1].pid
    assert pid is not None
    killed_at: list[float] = []

    def kill() -> None:
        killed_at.append(time.monotonic())
        os.kill(pid, signal.SIGKILL)

    threading.Timer(2.0, kill).start()
    try:
        max_tokens = llm.engine.max_model_len - 300  # prompts are at most 300 tokens; run well past the kill
        llm.generate(
            prompts(64), SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False
        )
        print("  kill: FAILED, generate finished without an error")
    except WorkerDiedError as e:
        print(f"  kill: raised {time.monotonic() - killed_at[0]:.1f} s after the kill: {e}")
    llm.close()
    llm.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--shape", choices=["tiny", *sorted(SHAPES)], default="qwen3-0.6b", help="tiny: CPU-sized")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--hang-dump-s", type=float, default=500, help="print every thread's stack and exit after this")
    parser.add_argument("--accuracy-only", action="store_true", help="only the 16-bit runs against float32")
    args = parser.parse_args()
    faulthandler.dump_traceback_later(args.hang_dump_s, exit=True)  # a hang shows where, not just a timeout
    with tempfile.TemporaryDirectory() as tmp:
        shape = SHAPES.get(args.shape, {})
        model_dir = str(write_tiny_model(Path(tmp), "qwen3", **{k: shape[k] for k in CONFIG_FIELDS if k in shape}))
        print(f"{args.shape} config, random weights, {args.dtype}, TP={args.tp}")
        tp1 = greedy(model_dir, args.dtype)
        # A fixed cache: 16 prompts need few blocks, and float32 at gpu_memory_utilization=0.5 would take
        # half the GPU for nothing.
        exact = greedy(model_dir, "float32", num_kvcache_blocks=64) if args.dtype != "float32" else tp1
        tpn = greedy(model_dir, args.dtype, tensor_parallel_size=args.tp)
        if args.dtype != "float32":
            print(f"  {args.dtype} against float32 (the same weights):")
            ratio = distance_to_float32(f"TP={args.tp}", exact, tpn) / distance_to_float32("TP=1", exact, tp1)
            verdict = "as close as" if ratio <= 1.5 else "FARTHER than"
            print(f"    TP={args.tp} is {verdict} TP=1 to float32 (median ratio {ratio:.2f}; 1.5 allowed)")
        if args.accuracy_only:
            return
        tpn_eager = greedy(model_dir, args.dtype, tensor_parallel_size=args.tp, enforce_eager=True)
        compare(f"TP={args.tp} vs TP=1", tp1, tpn, model_dir, args.dtype)
        compare(f"TP={args.tp} graphs vs eager", tpn_eager, tpn, model_dir, args.dtype)
        kill_worker_mid_run(model_dir, args.dtype, args.tp)


if __name__ == "__main__":
    main()
