"""Soak test of the server: many requests of every kind, and the memory of both server processes as they go.

    python benchmarks/serve_soak.py [--num-requests 10000] [--concurrency 16] [--max-tokens 4]

Starts `nanovllm serve` on the tiny test model (CPU, the engine in its own process, the default) and sends
requests in a fixed rotation: a streamed completion, a whole completion, a streamed chat, a bad request
(a lone surrogate, a boolean token id, n over --max-n, a body over the size cap: each must be a 4xx), and
a stream its client leaves after the first chunk (the server must abort it and free its blocks). Prompts
are random, so the prefix cache keeps filling and evicting. Every --sample-every requests it prints the
resident memory (RSS, from /proc) of the API process and of the engine process; memory that is flat after
the warm-up, with every answer as expected, is what passes. Linux only (/proc).
"""

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO_ROOT, os.path.join(REPO_ROOT, "tests")]

MODEL_NAME = "soak"
KINDS = ("stream", "whole", "chat", "bad", "leave")  # the rotation of request kinds
BODY_CAP_BYTES = 64 << 10  # the server's --max-request-body-bytes here, so that one bad request can pass it
MAX_N = 4  # the server's --max-n here
KV_CACHE_BLOCKS = 256  # of 16 tokens: 4,096 tokens, about 100 requests' worth


def rss_mib(pid: int) -> float:
    """Resident memory of a process, in MiB (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def engine_pid(server_pid: int) -> int:
    """The server's engine process: its child started by multiprocessing's spawn."""
    for child in Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split():
        if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
            return int(child)
    raise RuntimeError(f"process {server_pid} has no engine process")


def bad_body(rng: random.Random) -> tuple[dict, bytes | None]:
    """A request the server must refuse with a 4xx: (JSON body, or raw bytes to send instead)."""
    case = rng.randrange(4)
    if case == 0:
        return {"model": MODEL_NAME, "prompt": "caf\ud800", "max_tokens": 2}, None
    if case == 1:
        return {"model": MODEL_NAME, "prompt": [1, True], "max_tokens": 2}, None
    if case == 2:
        return {"model": MODEL_NAME, "prompt": "hi", "n": MAX_N + 1, "temperature": 1.0}, None
    return {}, json.dumps({"model": MODEL_NAME, "prompt": "x" * BODY_CAP_BYTES}).encode()


async def one_request(client: httpx.AsyncClient, idx: int, rng: random.Random, max_tokens: int) -> bool:
    """Send request ``idx`` of the rotation; whether the server answered as it must."""
    kind = KINDS[idx % len(KINDS)]
    prompt = " ".join(rng.choice(("the", "fox", "model", "cache", "token", "step", "hello")) for _ in range(20))
    if kind == "bad":
        body, raw = bad_body(rng)
        content = raw if raw is not None else json.dumps(body).encode()
        response = await client.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
        return 400 <= response.status_code < 500 and "error" in response.json()
    common = {"model": MODEL_NAME, "max_tokens": max_tokens, "temperature": 0.8, "ignore_eos": True}
    if kind == "whole":
        response = await client.post("/v1/completions", json={**common, "prompt": prompt})
        return response.status_code == 200 and response.json()["usage"]["completion_tokens"] == max_tokens
    path, body = "/v1/completions", {**common, "prompt": prompt, "stream": True}
    if kind == "chat":
        path, body = "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": prompt}]}
        body["stream"] = True
    async with client.stream("POST", path, json=body) as response:
        lines = 0
        async for line in response.aiter_lines():
            lines += line.startswith("data: ")
            if kind == "leave" and lines:
                return response.status_code == 200  # leaving mid-stream: the server aborts the request
        return response.status_code == 200 and lines > max_tokens // 2


async def run(url: str, args: argparse.Namespace, pids: tuple[int, int]) -> list[tuple[int, float, float, float]]:
    """Send every request; returns (requests done, seconds, API RSS MiB, engine RSS MiB) every --sample-every."""
    rng = random.Random(0)
    samples = [(0, 0.0, rss_mib(pids[0]), rss_mib(pids[1]))]
    next_idx, num_failed = 0, 0
    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def worker() -> None:
            nonlocal next_idx, num_failed
            while next_idx < args.num_requests:
                idx, next_idx = next_idx, next_idx + 1
                num_failed += not await one_request(client, idx, rng, args.max_tokens)
                if (idx + 1) % args.sample_every == 0:
                    sample = (idx + 1, time.perf_counter() - start, rss_mib(pids[0]), rss_mib(pids[1]))
                    samples.append(sample)
                    print(f"{sample[0]:>6} requests {sample[1]:7.1f} s  API {sample[2]:7.1f} MiB  engine "
                          f"{sample[3]:7.1f} MiB  unexpected answers {num_failed}", flush=True)  # fmt: skip

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    if num_failed:
        raise SystemExit(f"{num_failed} requests were not answered as they must be")
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=4, help="output tokens of each request that runs")
    parser.add_argument("--sample-every", type=int, default=1000, help="requests between memory samples")
    args = parser.parse_args()
    from model_fixtures import write_tiny_model
    from serve_load import free_loopback_port, wait_until_healthy

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_model(Path(tmp), "qwen3")
        port = free_loopback_port()
        command = [sys.executable, "-m", "nanovllm", "serve", "--model", tmp, "--port", str(port)]
        command += ["--served-model-name", MODEL_NAME, "--log-level", "warning", "--max-model-len", "256"]
        command += ["--max-n", str(MAX_N), "--max-request-body-bytes", str(BODY_CAP_BYTES)]
        # A KV cache small enough to be touched all over within the warm-up: growth after it is then a leak, not
        # the lazily touched pages of a 1 GiB CPU cache (issue #24, item 9, the engine's side).
        command += ["--kvcache-block-size", "16", "--num-kvcache-blocks", str(KV_CACHE_BLOCKS)]
        # One torch thread: on a small shared CPU a second one mostly spins, and steps take 10x longer.
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        server = subprocess.Popen(command, cwd=REPO_ROOT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_healthy(url, server, timeout_s=300.0)
            samples = asyncio.run(run(url, args, (server.pid, engine_pid(server.pid))))
        finally:
            server.terminate()
            server.wait(timeout=60)
    warm = samples[min(2, len(samples) - 1)]  # after the warm-up: caches, pools and allocator arenas filled
    last = samples[-1]
    print(f"{last[0]} requests in {last[1]:.0f} s; RSS from request {warm[0]} to {last[0]}: API "
          f"{warm[2]:.1f} -> {last[2]:.1f} MiB ({last[2] - warm[2]:+.1f}), engine {warm[3]:.1f} -> {last[3]:.1f} MiB "
          f"({last[3] - warm[3]:+.1f})")  # fmt: skip


if __name__ == "__main__":
    main()
