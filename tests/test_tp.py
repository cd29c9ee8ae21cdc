"""Tensor parallelism on CPU over gloo: N processes must produce the tokens of one.

Each tensor-parallel engine spawns workers that import torch (seconds each on a small CI box),
so every test builds as few engines as it can and one workload checks several things at once.
"""

import gc
import itertools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from nanovllm import LLM, SamplingParams
from nanovllm.parallel.failures import WorkerDiedError
from nanovllm.parallel.process_group import TensorParallelInfo, get_tensor_parallel
from nanovllm.scheduler.batch import ScheduledBatch

BLOCK_SIZE = 16
BASE_ARGS = dict(device="cpu", dtype="float32", kvcache_block_size=BLOCK_SIZE, max_model_len=128, seed=0)
# Few blocks force preemption; a small token budget chunks the longer prompts.
TIGHT_ARGS = dict(num_kvcache_blocks=10, max_num_batched_tokens=48, max_num_seqs=8)
PARAMS = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
TP2_ARCHS = ["qwen3", "qwen2", "llama", "llama2", "mistral"]  # every fixture arch (legacy variants share weights)


def random_prompts(num: int, min_len: int, max_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(400) for _ in range(rng.randint(min_len, max_len))] for _ in range(num)]


def workload() -> list[list[list[int]]]:
    """Three generate calls: a crowded batch (preemption, chunked prefill), then a prompt, then two that share
    its first 40 tokens (prefix-cache hits on the blocks the second call left behind)."""
    crowded = random_prompts(6, 10, 70, seed=1)
    shared = random_prompts(1, 40, 40, seed=2)[0]
    tails = random_prompts(2, 3, 10, seed=3)
    return [crowded, [shared], [shared + tail for tail in tails]]


def generate_ids(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [out.token_ids for out in llm.generate(prompts, PARAMS, use_tqdm=False)]


def reference_tokens(model_dir: Path) -> list[list[list[int]]]:
    """One process, a roomy cache, no prefix caching: the tokens every other setup must reproduce."""
    with LLM(str(model_dir), num_kvcache_blocks=128, enable_prefix_caching=False, **BASE_ARGS) as llm:
        return [generate_ids(llm, prompts) for prompts in workload()]


def check_tensor_parallel_matches(model_dir: Path, size: int) -> None:
    expected = reference_tokens(model_dir)
    with LLM(str(model_dir), tensor_parallel_size=size, **TIGHT_ARGS, **BASE_ARGS) as llm:
        got = [generate_ids(llm, prompts) for prompts in workload()]
        assert llm.engine is not None
        num_preemptions = llm.engine.scheduler.num_preemptions
        num_hit_tokens = llm.prefix_cache_stats().num_hit_tokens
    for call, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert have == want, f"call {call}: TP={size} tokens {have} != TP=1 tokens {want}"
    assert num_preemptions > 0, "the workload must preempt"
    assert num_hit_tokens >= 2 * 2 * BLOCK_SIZE, f"the last call must hit the prefix cache, hit {num_hit_tokens}"
    assert_no_tensor_parallel_left()


def assert_no_tensor_parallel_left() -> None:
    assert not dist.is_initialized(), "the process group outlived its engine"
    assert get_tensor_parallel() == TensorParallelInfo(0, 1), get_tensor_parallel()


@pytest.mark.parametrize("arch", TP2_ARCHS)
def test_tp2_equals_tp1(tiny_models: dict[str, Path], arch: str) -> None:
    """Guards against a mis-sharded weight (QKV, merged gate/up, row-parallel bias, vocab shards, tied head),
    a missing all-reduce, and workers whose mirrored batch drifts from rank 0's (prefix hits, chunks,
    preemption). Runs engines one after another in this process, so it also guards against leftover state."""
    check_tensor_parallel_matches(tiny_models[arch], 2)


def test_tp4_replicates_kv_heads(tiny_models: dict[str, Path]) -> None:
    """Guards against wrong KV-head replication: qwen3's fixture has 2 KV heads, so each serves 2 of 4 ranks."""
    check_tensor_parallel_matches(tiny_models["qwen3"], 4)


def test_dropped_engine_stops_workers_and_killed_worker_raises(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against orphaned workers when an LLM is garbage-collected, and against rank 0 hanging (or
    failing with an obscure gloo error) when a worker dies mid-run; close() after that, twice, is harmless."""
    model_dir = str(tiny_models["qwen3"])
    llm = LLM(model_dir, tensor_parallel_size=2, num_kvcache_blocks=64, **BASE_ARGS)
    assert llm.engine is not None and llm.engine.workers is not None
    processes = list(llm.engine.workers.processes)
    del llm
    gc.collect()
    for process in processes:
        process.join(10)
        assert process.exitcode == 0, f"worker after its LLM was dropped: exit code {process.exitcode}"
    assert_no_tensor_parallel_left()

    llm = LLM(model_dir, tensor_parallel_size=2, num_kvcache_blocks=64, **BASE_ARGS)
    assert llm.engine is not None and llm.engine.workers is not None
    runner = llm.engine.runner
    worker = llm.engine.workers.processes[0]
    killed_at: list[float] = []
    run_step, steps = runner.run, itertools.count()

    def kill() -> None:
        killed_at.append(time.monotonic())
        os.kill(worker.pid, signal.SIGKILL)  # type: ignore[arg-type]

    def run_and_kill_at_step_5(batch: ScheduledBatch) -> list[int]:
        if next(steps) == 5:
            threading.Timer(0.02, kill).start()  # while this step runs, or just after
        return run_step(batch)

    monkeypatch.setattr(runner, "run", run_and_kill_at_step_5)
    long_params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    try:
        with pytest.raises(WorkerDiedError, match=r"rank 1 \(pid \d+\) exited with code -9"):
            llm.generate(random_prompts(4, 10, 20, seed=4), long_params, use_tqdm=False)
        seconds = time.monotonic() - killed_at[0]
        assert seconds < 5, f"the error came {seconds:.1f} s after the kill"
    finally:
        llm.close()  # also when the check fails: an open engine would fail every later TP test
    llm.close()
    assert_no_tensor_parallel_left()


def test_workers_stop_at_interpreter_exit(tiny_models: dict[str, Path]) -> None:
    """Guards against a script that never calls close() hanging at exit or leaving workers behind."""
    script = (
        "from nanovllm import LLM\n"
        f"llm = LLM({str(tiny_models['qwen3'])!r}, tensor_parallel_size=2, num_kvcache_blocks=64, **{BASE_ARGS!r})\n"
        "print(llm.engine.workers.processes[0].pid, flush=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    worker_pid = int(result.stdout.split()[-1])
    with pytest.raises(ProcessLookupError):
        os.kill(worker_pid, 0)  # the worker is gone (its pid reaped, not a zombie: it was our child's child)


def test_bad_tensor_parallel_sizes(tiny_model_dir) -> None:
    """Guards against a split that cannot work failing late (inside a worker) or with a vague message."""
    model_dir = str(tiny_model_dir("qwen3"))
    with pytest.raises(ValueError, match="does not divide the model's num_attention_heads=4"):
        LLM(model_dir, tensor_parallel_size=3, **BASE_ARGS)
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
        LLM(model_dir, tensor_parallel_size=0, **BASE_ARGS)
    odd_kv = str(tiny_model_dir("qwen3", num_attention_heads=12, num_key_value_heads=6))
    with pytest.raises(ValueError, match="num_key_value_heads=6 must divide one another"):
        LLM(odd_kv, tensor_parallel_size=4, **BASE_ARGS)
    assert_no_tensor_parallel_left()


def test_tp2_rich_sampling_equals_tp1(tiny_models: dict[str, Path]) -> None:
    """Guards against tensor parallelism breaking what rank 0 alone decides: seeded draws through top-k/top-p,
    penalties, n samples that join after the first one's prefill, and stop strings (the workers must follow
    sequences that finish early or appear mid-run)."""
    params = [
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=7, max_tokens=16),
        SamplingParams(n=2, temperature=1.0, min_p=0.05, presence_penalty=0.5, seed=3, max_tokens=12),
        SamplingParams(temperature=0.0, stop=["e"], max_tokens=16),
    ]
    prompts = ["Hello, world! How are", "The scheduler decides which", "Once upon a time there was"]

    def completions(llm: LLM) -> list[list[tuple[list[int], str]]]:
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return [[(c.token_ids, c.text) for c in out.outputs] for out in outputs]

    model_dir = str(tiny_models["qwen3"])
    with LLM(model_dir, num_kvcache_blocks=64, **BASE_ARGS) as llm:
        expected = completions(llm)
    with LLM(model_dir, tensor_parallel_size=2, num_kvcache_blocks=64, **BASE_ARGS) as llm:
        got = completions(llm)
    assert got == expected, f"TP=2 {got} != TP=1 {expected}"
    assert len(got[1]) == 2, "n=2 must give two completions"
    assert_no_tensor_parallel_left()


def is_running(pid: int) -> bool:
    """Whether the process exists and is not a zombie (killed, but not reaped by its new parent yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_stuck_rank0_exits_with_the_reason_and_takes_the_workers() -> None:
    """Guards the NCCL last resort (seen on 4 H200s): when aborting the group cannot free rank 0 from a
    collective that waits on a dead worker, the process must exit naming the worker, not hang, and the
    workers still alive (stuck in the same collective) must not outlive it."""
    script = (
        "import multiprocessing, time, nanovllm.parallel.workers as w\n"
        "w.STUCK_EXIT_S = 0.5\n"
        "if __name__ == '__main__':\n"
        "    worker = multiprocessing.get_context('spawn').Process(target=time.sleep, args=(60,))\n"
        "    worker.start()\n"
        "    print(worker.pid, flush=True)\n"
        "    w._exit_if_stuck(w.PeerFailure(message='rank 3 exited with code -9', in_step=True), [worker])\n"
        "    time.sleep(30)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "rank 3 exited with code -9" in result.stderr and "exiting the process" in result.stderr
    worker_pid = int(result.stdout.split()[0])
    deadline = time.monotonic() + 10
    while is_running(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not is_running(worker_pid), "the live worker outlived rank 0"


def test_rank0_not_stuck_is_not_exited() -> None:
    """Guards against the last resort killing a process that is not stuck: its engine raised, or it sat
    between steps (an idle engine raises at its next step, however late that comes)."""
    script = (
        "import nanovllm.parallel.workers as w\n"
        "w.STUCK_EXIT_S = 0.5\n"
        "raised = w.PeerFailure(message='rank 1 exited with code -9', in_step=True)\n"
        "raised.raised.set()\n"
        "w._exit_if_stuck(raised, [])\n"
        "w._exit_if_stuck(w.PeerFailure(message='rank 1 exited with code -9', in_step=False), [])\n"
        "print('still here')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "still here" in result.stdout
