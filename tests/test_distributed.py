"""Ranks started by torchrun or Ray, and data parallelism, on CPU over gloo: each must give one process's tokens.

Starting a rank costs seconds (it imports torch and nanovllm), so each launch runs several checks (see
torchrun_job.py), the torchrun jobs start together and run beside the other tests' work, and the
models are tiny.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch.distributed as dist
import torchrun_job as job

import nanovllm.parallel.heartbeats as heartbeats_module
from nanovllm import LLM
from nanovllm.config import EngineConfig
from nanovllm.engine.data_parallel import share_out
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.parallel.failures import PeerFailure, WorkerDiedError
from nanovllm.parallel.heartbeats import Heartbeats

REPO_ROOT = Path(__file__).resolve().parent.parent
JOB_SCRIPT = str(Path(__file__).resolve().parent / "torchrun_job.py")
JOB_TIMEOUT_S = 300  # a job on a busy 2-core box: each rank imports torch and nanovllm first
DEATH_NAMED_WITHIN_S = 10.0  # a dead rank's heartbeat timeout (5 s) plus slack for a loaded machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env() -> dict[str, str]:
    """The ranks import this checkout's nanovllm, one CPU thread each (four ranks share the cores)."""
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


@dataclass
class Jobs:
    """The two torchrun jobs, started together; each rank's results once they are done."""

    one_host_dir: Path  # results of `torchrun --standalone --nproc-per-node 2`
    two_hosts_dir: Path  # results of two launchers with --nnodes 2
    processes: dict[str, subprocess.Popen]  # "one_host", "node0", "node1"

    def results(self, out_dir: Path, rank: int, last_key: str) -> dict:
        """What a rank saw, once it has written ``last_key`` (its last check)."""
        path = out_dir / f"rank{rank}.json"
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline:
            if path.exists() and last_key in (result := json.loads(path.read_text())):
                return result
            time.sleep(0.2)
        raise AssertionError(f"{path} never got {last_key!r}; the jobs' output:\n{self.output()}")

    def output(self) -> str:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
        return "\n".join(f"--- {name}:\n{p.communicate()[0][-3000:]}" for name, p in self.processes.items())


@pytest.fixture(scope="module", autouse=True)  # started first: the other tests run while the ranks start
def jobs(
    request: pytest.FixtureRequest, tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Jobs | None]:
    if not any("torchrun" in item.name for item in request.session.items):
        yield None  # no test that reads them was selected
        return
    model = str(tiny_models["qwen3"])
    one_host, two_hosts = tmp_path_factory.mktemp("one_host"), tmp_path_factory.mktemp("two_hosts")
    port = str(free_port())
    commands = {
        "one_host": torchrun("--standalone", "--nproc-per-node", "2", JOB_SCRIPT, model, str(one_host), "one_host"),
        **{
            f"node{node}": torchrun(
                "--nnodes",
                "2",
                "--node-rank",
                str(node),
                "--nproc-per-node",
                "1",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                port,
                JOB_SCRIPT,
                model,
                str(two_hosts),
                "two_hosts",
            )  # fmt: skip
            for node in (0, 1)
        },
    }
    processes = {
        name: subprocess.Popen(command, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, command in commands.items()
    }
    yield Jobs(one_host, two_hosts, processes)
    for process in processes.values():
        if process.poll() is None:
            process.kill()  # node 0's launcher waits out torchrun's exit barrier for node 1, which failed
        process.communicate()


@pytest.fixture(scope="module")
def reference(tiny_models: dict[str, Path]) -> dict[str, list[list[int]]]:
    """One process, one replica: the tokens every launch must reproduce."""
    with LLM(str(tiny_models["qwen3"]), **job.ARGS) as llm:
        return {"greedy": job.token_ids(llm, job.GREEDY), "seeded": job.token_ids(llm, job.SEEDED)}


def test_share_out_balances_and_keeps_order() -> None:
    """Guards against replicas that finish far apart (shares by count, not cost) or outputs out of order."""
    costs = [100, 1, 1, 1, 50, 49, 2]
    shares = share_out(costs, 2)
    totals = [sum(costs[i] for i in share) for share in shares]
    assert sorted(i for share in shares for i in share) == list(range(len(costs))), shares
    assert all(share == sorted(share) for share in shares), shares
    assert max(totals) - min(totals) <= 2, f"shares {shares} cost {totals}"
    assert share_out([5], 3) == [[0], [], []], "more replicas than requests: the others get none"


def test_bad_parallel_settings_fail_before_any_model_memory(tiny_model_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against a bad backend, size or launch failing late (in a worker, after loading weights) or vaguely:
    each must name the setting, on every rank, before a process group or a model exists."""
    model = str(tiny_model_dir("qwen3"))
    with pytest.raises(ValueError, match=r"distributed_executor_backend must be one of .* got 'slurm'"):
        LLM(model, distributed_executor_backend="slurm", **job.ARGS)
    with pytest.raises(ValueError, match="data_parallel_size must be a positive integer, got 0"):
        LLM(model, data_parallel_size=0, **job.ARGS)
    with pytest.raises(ValueError, match=r"data_parallel_size=2 is not supported with .*'ray'"):
        EngineConfig(model, data_parallel_size=2, distributed_executor_backend="ray")
    with pytest.raises(ValueError, match=r"data_parallel_size=2 .* runs through LLM\(...\).generate\(\) only"):
        LLMEngine(EngineConfig(model, data_parallel_size=2, **job.ARGS))  # the server builds its engine this way
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT is not set"):
        LLM(model, distributed_executor_backend="external_launcher", **job.ARGS)
    launch = {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for name, value in launch.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=r"WORLD_SIZE=3 ranks, but data_parallel_size=2 x tensor_parallel_size=1"):
        LLM(model, data_parallel_size=2, distributed_executor_backend="external_launcher", **job.ARGS)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)  # as if Ray were not installed
    with pytest.raises(ValueError, match=r"'ray' needs Ray, which is not installed; pip install 'nanovllm\[ray\]'"):
        LLM(model, tensor_parallel_size=2, distributed_executor_backend="ray", **job.ARGS)
    assert not dist.is_initialized(), "a bad setting must fail before any process group"


def test_heartbeats_name_a_rank_that_left_or_went_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against a dead rank on another host going unnoticed (no process sentinel can see it), and against a
    rank's own departure at close() being reported to itself."""
    monkeypatch.setattr(heartbeats_module, "HEARTBEAT_INTERVAL_S", 0.05)
    monkeypatch.setattr(heartbeats_module, "HEARTBEAT_TIMEOUT_S", 0.5)
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)

    def connect() -> dist.Store:
        return dist.TCPStore("127.0.0.1", server.port, is_master=False)

    names = ["rank 0 (a)", "rank 1 (b)", "rank 2 (c)"]
    failures = [PeerFailure() for _ in names]
    beats = [Heartbeats(connect, rank, names, failures[rank], lambda: None) for rank in range(3)]
    beats[2].stop.set()  # rank 2 falls silent without a word, as a killed process does
    assert failures[0].reported.wait(5), "rank 0 never noticed the silent rank 2"
    assert failures[0].message is not None and failures[0].message.startswith("rank 2 (c) stopped responding")
    beats[0].close()
    assert failures[1].reported.wait(5), "rank 1 never noticed rank 2, or rank 0 leaving"
    assert "rank 2 (c) stopped responding" in str(failures[1].message) or "rank 0 (a) left the job" in str(
        failures[1].message
    ), failures[1].message
    beats[1].close()
    assert not failures[2].has_failed, f"a silent rank reported {failures[2].message}"


def test_data_parallel_spawned_equals_one_replica_and_a_dead_replica_is_named(
    tiny_models: dict[str, Path], reference: dict[str, list[list[int]]]
) -> None:
    """Guards against data parallelism changing tokens (greedy or seeded), returning outputs out of input order,
    hiding which prompt a replica refused, hanging when a replica dies mid-call, and offering calls it cannot
    serve (stream)."""
    with LLM(str(tiny_models["qwen3"]), data_parallel_size=2, **job.ARGS) as llm:
        outputs = llm.generate(job.prompts(), job.GREEDY, use_tqdm=False)
        seeded = job.token_ids(llm, job.SEEDED)
        assert [out.index for out in outputs] == list(range(len(outputs))), [out.index for out in outputs]
        assert [out.token_ids for out in outputs] == reference["greedy"], "DP=2 greedy tokens differ from DP=1's"
        assert seeded == reference["seeded"], f"DP=2 seeded tokens {seeded} != DP=1's {reference['seeded']}"
        assert {out.request_id.split("-")[0] for out in outputs} == {"dp0", "dp1"}, "both replicas must work"
        with pytest.raises(ValueError, match=r"stream\(\) runs on one engine driven from this process"):
            llm.stream(job.prompts())
        too_long = r"replica 0 \(its prompts 0, 1, ... are the call's 1\): prompt 0: prompt \(200 tokens\)"
        with pytest.raises(ValueError, match=too_long):  # the costlier prompt went to replica 0
            llm.generate([[1, 2, 3], [1] * 200], job.GREEDY, use_tqdm=False)
        assert llm.engine is not None and not isinstance(llm.engine, LLMEngine)
        replica = llm.engine.processes[1]  # type: ignore[union-attr]
        killed_at: list[float] = []

        def kill() -> None:
            killed_at.append(time.monotonic())
            os.kill(replica.pid, signal.SIGKILL)  # type: ignore[arg-type]

        threading.Timer(job.DEATH_AFTER_S, kill).start()
        with pytest.raises(WorkerDiedError, match=r"data-parallel replica 1 \(pid \d+\) exited with code -9"):
            llm.generate(job.prompts() * job.LONG_REPEATS, job.LONG, use_tqdm=False)
        seconds = time.monotonic() - killed_at[0]
        assert seconds < 5, f"the error came {seconds:.1f} s after the kill"


def test_ray_tensor_parallel_equals_one_process(
    tiny_models: dict[str, Path], reference: dict[str, list[list[int]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards the Ray backend (where Ray is installed: pip install 'nanovllm[ray]'): TP=2 with rank 1 a Ray actor
    in a placement group gives one process's tokens, and an actor that dies mid-call is named within seconds."""
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))  # the actors import this checkout's nanovllm
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with LLM(
            str(tiny_models["qwen3"]), tensor_parallel_size=2, distributed_executor_backend="ray", **job.ARGS
        ) as llm:
            assert job.token_ids(llm, job.GREEDY) == reference["greedy"], "Ray TP=2 greedy tokens differ"
            assert job.token_ids(llm, job.SEEDED) == reference["seeded"], "Ray TP=2 seeded tokens differ"
            assert isinstance(llm.engine, LLMEngine) and llm.engine.workers is not None
            actor = llm.engine.workers.actors[0]  # type: ignore[attr-defined]
            killed_at: list[float] = []

            def kill() -> None:
                killed_at.append(time.monotonic())
                ray.kill(actor)

            threading.Timer(job.DEATH_AFTER_S, kill).start()
            with pytest.raises(WorkerDiedError, match=r"rank 1 \(a Ray actor\) died"):
                llm.generate(job.prompts() * job.LONG_REPEATS, job.LONG, use_tqdm=False)
            seconds = time.monotonic() - killed_at[0]
            assert seconds < 5, f"the error came {seconds:.1f} s after the kill"
    finally:
        ray.shutdown()
    assert not dist.is_initialized(), "the process group outlived its engine"


def test_torchrun_one_host_equals_one_process(jobs: Jobs | None, reference: dict[str, list[list[int]]]) -> None:
    """Guards `torchrun --nproc-per-node 2` with external_launcher: TP=2 gives one process's tokens on every rank
    (greedy and seeded), ranks given different arguments all fail naming the argument, and a rank that dies
    mid-call is named on the other within seconds (os._exit, so torchrun does not stop the survivor first)."""
    assert jobs is not None
    ranks = [jobs.results(jobs.one_host_dir, rank, last) for rank, last in ((0, "death"), (1, "mismatch"))]
    for rank, result in enumerate(ranks):
        assert result["tp2_greedy"] == reference["greedy"], f"rank {rank}: greedy {result['tp2_greedy']}"
        assert result["tp2_seeded"] == reference["seeded"], f"rank {rank}: seeded {result['tp2_seeded']}"
        mismatch = result["mismatch"]
        assert mismatch["type"] == "ValueError" and "max_num_seqs=9 on rank 1" in mismatch["message"], mismatch
    death = ranks[0]["death"]
    assert death["type"] == "WorkerDiedError" and death["message"].startswith("rank 1 ("), death
    died_at = json.loads((jobs.one_host_dir / "death.json").read_text())["at"]
    assert death["at"] - died_at < DEATH_NAMED_WITHIN_S, f"named {death['at'] - died_at:.1f} s after the death"
    assert jobs.processes["one_host"].wait(JOB_TIMEOUT_S) == 0, jobs.output()


def test_torchrun_two_hosts_tensor_and_data_parallel(jobs: Jobs | None, reference: dict[str, list[list[int]]]) -> None:
    """Guards the multi-host path (two launchers, --nnodes 2, node ranks 0 and 1 on one host): TP=2 across the
    'hosts', DP=2 x TP=1 in input order, and a killed replica named on the other within seconds, although no
    collective joins them (only heartbeats can tell)."""
    assert jobs is not None
    result = jobs.results(jobs.two_hosts_dir, 0, "death")
    assert result["tp2_greedy"] == reference["greedy"], f"TP=2 over two launchers: {result['tp2_greedy']}"
    assert result["dp2_greedy"] == reference["greedy"], f"DP=2 over two launchers: {result['dp2_greedy']}"
    assert result["dp2_seeded"] == reference["seeded"], f"DP=2 seeded over two launchers: {result['dp2_seeded']}"
    death = result["death"]
    assert death["type"] == "WorkerDiedError" and death["message"].startswith("rank 1 ("), death
    assert "replica 1" in death["message"], death
    died_at = json.loads((jobs.two_hosts_dir / "death.json").read_text())["at"]
    assert death["at"] - died_at < DEATH_NAMED_WITHIN_S, f"named {death['at'] - died_at:.1f} s after the death"
    assert jobs.processes["node1"].wait(JOB_TIMEOUT_S) != 0, "node 1's launcher must report its killed rank"
