"""The script tests/test_distributed.py runs under torchrun: every rank runs it, as a user's script would.

    python torchrun_job.py MODEL_DIR OUT_DIR SCENARIO

Each rank writes OUT_DIR/rank<RANK>.json after each check (rank 1 dies before the last): the token
ids every generate() returned and what each check saw (an error's type and text, and when). Scenarios:

    one_host:    TP=2 (greedy, then seeded sampling); then arguments that differ by rank; then rank 1
                 leaves abruptly (os._exit(0), so torchrun does not stop rank 0) in the middle of a call
    two_hosts:   TP=2; then DP=2 x TP=1; then rank 1 is killed (SIGKILL) in the middle of a DP call
"""

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from nanovllm import LLM, SamplingParams

ARGS = dict(device="cpu", dtype="float32", kvcache_block_size=16, max_model_len=128, num_kvcache_blocks=40)
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
SEEDED = [SamplingParams(temperature=0.9, top_k=50, seed=seed, max_tokens=12, ignore_eos=True) for seed in range(6)]
LONG = SamplingParams(temperature=0.0, max_tokens=70, ignore_eos=True)  # the longest prompt (49) + 70 fits
DEATH_AFTER_S = 0.5  # into the long call, when rank 1 dies
LONG_REPEATS = 20  # the long call's prompts: prompts() this many times, seconds of work even on an idle machine


def prompts() -> list[list[int]]:
    """Six prompts of different lengths, so that data parallelism shares them out unevenly by count."""
    return [[(7 * i + j) % 400 for j in range(4 + 9 * i)] for i in range(6)]


def token_ids(llm: LLM, params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
    return [out.token_ids for out in llm.generate(prompts(), params, use_tqdm=False)]


def error_seen(call: Any) -> dict[str, Any]:
    """What a call raised, and when."""
    try:
        call()
    except Exception as e:
        return {"type": type(e).__name__, "message": str(e), "at": time.time()}
    return {"type": None, "message": "", "at": time.time()}


def die_during_long_call(llm: LLM, rank: int, how: str, out_dir: Path) -> dict[str, Any]:
    """Rank 1 dies DEATH_AFTER_S into a long call (noting when); the others report what the call raised."""
    if rank == 1:

        def die() -> None:
            (out_dir / "death.json").write_text(json.dumps({"at": time.time()}))
            if how == "exit":
                os._exit(0)  # no close(), no goodbye: as a crash, but torchrun leaves the other ranks running
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Timer(DEATH_AFTER_S, die).start()
    return error_seen(lambda: llm.generate(prompts() * LONG_REPEATS, LONG, use_tqdm=False))


class Results(dict):
    """What this rank saw so far, rewritten to OUT_DIR/rank<RANK>.json at every entry."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(self))
        partial.replace(self.path)  # at once: the test may be reading it


def one_host(model: str, rank: int, out_dir: Path, result: Results) -> None:
    with LLM(model, tensor_parallel_size=2, distributed_executor_backend="external_launcher", **ARGS) as llm:
        result["tp2_greedy"] = token_ids(llm, GREEDY)
        result["tp2_seeded"] = token_ids(llm, SEEDED)
    differing = dict(ARGS, max_num_seqs=8 + rank)
    result["mismatch"] = error_seen(
        lambda: LLM(model, tensor_parallel_size=2, distributed_executor_backend="external_launcher", **differing)
    )
    with LLM(model, tensor_parallel_size=2, distributed_executor_backend="external_launcher", **ARGS) as llm:
        result["death"] = die_during_long_call(llm, rank, "exit", out_dir)


def two_hosts(model: str, rank: int, out_dir: Path, result: Results) -> None:
    with LLM(model, tensor_parallel_size=2, distributed_executor_backend="external_launcher", **ARGS) as llm:
        result["tp2_greedy"] = token_ids(llm, GREEDY)
    with LLM(model, data_parallel_size=2, distributed_executor_backend="external_launcher", **ARGS) as llm:
        result["dp2_greedy"] = token_ids(llm, GREEDY)
        result["dp2_seeded"] = token_ids(llm, SEEDED)
        result["death"] = die_during_long_call(llm, rank, "kill", out_dir)


def main() -> None:
    model, out_dir, scenario = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    rank = int(os.environ["RANK"])
    scenarios = {"one_host": one_host, "two_hosts": two_hosts}
    scenarios[scenario](model, rank, out_dir, Results(out_dir / f"rank{rank}.json"))


if __name__ == "__main__":
    main()
