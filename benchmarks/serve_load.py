"""Load test of the OpenAI-compatible server over loopback: requests/s, time to first token, inter-token latency.

    # CPU: the tiny test model (random weights), server started here
    python benchmarks/serve_load.py --tiny --num-requests 64 --concurrency 8 --prompt-len 32 --max-tokens 32

    # GPU: the real Qwen3-0.6B config.json with random weights and the tiny test tokenizer
    python benchmarks/serve_load.py --dummy-shape qwen3-0.6b --num-requests 512 --concurrency 64

    # any running server
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model-name NAME

Every request is a streamed /v1/completions call with a prompt of --prompt-len random token ids
below --max-token-id (ids the tiny tokenizer knows) and exactly --max-tokens output tokens
(ignore_eos). --concurrency clients send them back to back until --num-requests are done or
--duration-s has passed. Each SSE chunk carries one engine step's tokens of one request, so
the time to the first chunk is the time to first token and the gaps between chunks are the
inter-token latencies. A warm-up round (one request per client, not counted) runs first. The
server's own latencies over the timed run are reported too, with exact percentiles from the raw
observations it keeps (/metrics/samples): its time to first token split into stages (parse,
tokenize, hand-off to the engine loop, queue, prefill, return, dispatch to the handler; see
nanovllm/serving/metrics.py), its inter-token latency and end-to-end latency. The client's time to
first token minus the server's is HTTP in and out, the SSE write and the load client itself.
"""

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "tests"))

SERVED_MODEL_NAME = "load-test"
WARMUP_MAX_TOKENS = 8  # output tokens of each warm-up request
SERVER_LATENCIES = {  # the server's latencies reported next to the client's figures, in the order of a request
    "nanovllm:request_parse_time_seconds": "  parse",
    "nanovllm:request_tokenize_time_seconds": "  tokenize",
    "nanovllm:request_handoff_time_seconds": "  hand-off to the engine loop",
    "nanovllm:request_queue_time_seconds": "  queue",
    "nanovllm:request_prefill_time_seconds": "  prefill (and the step ahead of it)",
    "nanovllm:request_return_time_seconds": "  return to the event loop",
    "nanovllm:request_dispatch_time_seconds": "  dispatch to its handler",
    "nanovllm:time_to_first_token_seconds": "time to first token",
    "nanovllm:engine_time_to_first_token_seconds": "time to first token in the engine loop",
    "nanovllm:inter_token_latency_seconds": "inter-token latency",
    "nanovllm:e2e_request_latency_seconds": "end-to-end latency",
}


@dataclass
class RequestTiming:
    start_s: float  # when the request was sent (time.perf_counter())
    chunk_s: list[float] = field(default_factory=list)  # arrival of each chunk with generated text
    num_tokens: int = 0  # completion tokens, from the usage chunk


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--model", help="start a server on this model directory")
    target.add_argument("--tiny", action="store_true", help="start a server on the tiny test model (CPU)")
    target.add_argument("--dummy-shape", help="start a server on random weights of a bench.py shape, e.g. qwen3-0.6b")
    parser.add_argument("--model-name", default=SERVED_MODEL_NAME, help="the 'model' field sent (with --url)")
    parser.add_argument("--server-args", default="", help="extra flags for `nanovllm serve`, e.g. '--dtype float32'")
    parser.add_argument("--num-requests", type=int, default=256, help="requests to send (default 256)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight at once (default 64)")
    parser.add_argument(
        "--processes", type=int, default=1, help="load processes sharing the clients (default 1); one Python "
        "process parsing thousands of chunks a second can itself delay what it measures"
    )  # fmt: skip
    parser.add_argument("--duration-s", type=float, default=120.0, help="stop sending after this long (default 120)")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per request (default 128)")
    parser.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (default 128)")
    parser.add_argument("--max-token-id", type=int, default=390, help="prompt ids are drawn below this (default 390)")
    parser.add_argument("--start-timeout-s", type=float, default=600.0, help="wait this long for the server to start")
    return parser.parse_args()


def write_model_dir(path: str, tiny: bool, dummy_shape: str | None) -> None:
    """The tiny test model, or a bench.py shape's real config.json next to the tiny test tokenizer."""
    from model_fixtures import make_tokenizer, write_tiny_model

    if tiny:
        write_tiny_model(Path(path), "qwen3")
        return
    from bench import SHAPES

    if dummy_shape not in SHAPES:
        raise SystemExit(f"--dummy-shape {dummy_shape!r} is not one of {sorted(SHAPES)}")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(SHAPES[dummy_shape], f)
    make_tokenizer().save_pretrained(path)


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(model_dir: str, port: int, extra_args: list[str], timeout_s: float) -> subprocess.Popen:
    command = [sys.executable, "-m", "nanovllm", "serve", "--model", model_dir, "--port", str(port)]
    command += ["--served-model-name", SERVED_MODEL_NAME, "--log-level", "warning", *extra_args]
    print("starting:", " ".join(command), flush=True)
    server = subprocess.Popen(command, cwd=REPO_ROOT)
    wait_until_healthy(f"http://127.0.0.1:{port}", server, timeout_s)
    return server


def wait_until_healthy(base_url: str, server: subprocess.Popen, timeout_s: float) -> None:
    """Return once /health answers 200; exit if the server process ends or does not get there in time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode} before it was ready")
        try:
            if httpx.get(f"{base_url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.terminate()
    raise SystemExit(f"the server was not ready within {timeout_s} s")


async def one_request(client: httpx.AsyncClient, body: dict) -> RequestTiming:
    timing = RequestTiming(start_s=time.perf_counter())
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk.get("choices"):
                timing.chunk_s.append(time.perf_counter())
            elif chunk.get("usage"):
                timing.num_tokens = chunk["usage"]["completion_tokens"]
    return timing


async def run_load(
    args: argparse.Namespace, base_url: str, num_requests: int, max_tokens: int, concurrency: int, seed: int
) -> list[RequestTiming]:
    """One client process: `concurrency` clients sending `num_requests` requests in all."""
    rng = random.Random(seed)
    bodies = [
        {
            "model": args.model_name,
            "prompt": [rng.randrange(args.max_token_id) for _ in range(args.prompt_len)],
            "max_tokens": max_tokens,
            "temperature": 0.6,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for _ in range(num_requests)
    ]
    timings: list[RequestTiming] = []
    deadline = time.perf_counter() + args.duration_s
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=None, limits=limits) as client:

        async def worker() -> None:
            while bodies and time.perf_counter() < deadline:
                timings.append(await one_request(client, bodies.pop()))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return timings


def run_load_in_process(*load_args: Any) -> list[RequestTiming]:
    return asyncio.run(run_load(*load_args))


def run_clients(
    pool: ProcessPoolExecutor, args: argparse.Namespace, base_url: str, num_requests: int, max_tokens: int
) -> list[RequestTiming]:
    """Spread the requests and the clients over --processes load processes (each parses its own streams)."""
    num = args.processes
    futures = []
    for i in range(num):
        load = (args, base_url, share(num_requests, num, i), max_tokens, share(args.concurrency, num, i), i)
        futures.append(pool.submit(run_load_in_process, *load))
    return [timing for future in futures for timing in future.result()]


def share(total: int, num_parts: int, index: int) -> int:
    """Part `index` of `total` split into `num_parts` near-equal integer parts."""
    return total // num_parts + (index < total % num_parts)


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))]


def report(timings: list[RequestTiming]) -> None:
    # From the first request sent to the last chunk received: the load processes' start-up is outside it.
    elapsed_s = max(t.chunk_s[-1] for t in timings if t.chunk_s) - min(t.start_s for t in timings)
    ttft_ms = [(t.chunk_s[0] - t.start_s) * 1e3 for t in timings if t.chunk_s]
    itl_ms = [(b - a) * 1e3 for t in timings for a, b in zip(t.chunk_s, t.chunk_s[1:], strict=False)]
    e2e_s = [t.chunk_s[-1] - t.start_s for t in timings if t.chunk_s]
    num_tokens = sum(t.num_tokens for t in timings)
    print(f"requests: {len(timings)} in {elapsed_s:.2f} s = {len(timings) / elapsed_s:.2f} req/s")
    print(f"output tokens: {num_tokens} = {num_tokens / elapsed_s:,.0f} tok/s")
    print(f"time to first token: p50 {percentile(ttft_ms, 50):.1f} ms, p99 {percentile(ttft_ms, 99):.1f} ms")
    print(f"inter-token latency: p50 {percentile(itl_ms, 50):.1f} ms, p99 {percentile(itl_ms, 99):.1f} ms")
    print(f"end-to-end latency: p50 {percentile(e2e_s, 50):.2f} s, p99 {percentile(e2e_s, 99):.2f} s")


def server_samples(base_url: str, num_latest: int) -> dict[str, dict]:
    """The server's latency observations (/metrics/samples): name -> {"count": all so far, "latest": [seconds]}."""
    response = httpx.get(f"{base_url}/metrics/samples", params={"latest": num_latest}, timeout=60)
    return response.json() if response.status_code == 200 else {}  # another server: the client's view only


def report_server_side(base_url: str, before: dict[str, dict]) -> None:
    """What the server measured over the timed run: each stage from the body's arrival to the handler's first
    token, then its whole time to first token, inter-token and end-to-end latency (percentiles of the raw values;
    of the latest the server keeps, where the run made more)."""
    if not before:
        return
    counts_after = {name: entry["count"] for name, entry in server_samples(base_url, 0).items()}
    num_new = {name: count - before.get(name, {"count": 0})["count"] for name, count in counts_after.items()}
    after = server_samples(base_url, max(num_new.values(), default=0))
    print("server side, over the timed run:                  p50 ms     p99 ms   observations")
    for name, label in SERVER_LATENCIES.items():
        if num_new.get(name):
            values_ms = [1e3 * value for value in after[name]["latest"][-num_new[name] :]]
            p50, p99 = percentile(values_ms, 50), percentile(values_ms, 99)
            print(f"  {label:<44} {p50:9.2f}  {p99:9.2f}  {len(values_ms):>12}")


def main() -> None:
    args = parse_args()
    server = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            base_url = args.url.rstrip("/")
        else:
            model_dir = args.model
            if model_dir is None:
                model_dir = tmp
                write_model_dir(tmp, args.tiny, args.dummy_shape)
            extra = args.server_args.split() + (["--load-format", "dummy"] if args.dummy_shape else [])
            port = free_loopback_port()
            server = start_server(model_dir, port, extra, args.start_timeout_s)
            base_url = f"http://127.0.0.1:{port}"
            args.model_name = SERVED_MODEL_NAME
        try:
            with ProcessPoolExecutor(args.processes, mp_context=multiprocessing.get_context("spawn")) as pool:
                run_clients(pool, args, base_url, args.concurrency, WARMUP_MAX_TOKENS)
                samples_before = server_samples(base_url, 0)
                report(run_clients(pool, args, base_url, args.num_requests, args.max_tokens))
            report_server_side(base_url, samples_before)
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=60)


if __name__ == "__main__":
    main()
