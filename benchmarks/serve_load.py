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
server's own time-to-first-token and inter-token histograms (/metrics, read before and after the
timed run) are reported too: a gap between the two views is time spent outside the engine and
response path (HTTP parsing, the socket, the load client itself).
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
SERVER_LATENCIES = {  # histograms of the server's /metrics reported next to the client's figures
    "nanovllm:time_to_first_token_seconds": "time to first token",
    "nanovllm:engine_time_to_first_token_seconds": "time to first token in the engine loop",
    "nanovllm:inter_token_latency_seconds": "inter-token latency",
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


def server_histograms(base_url: str) -> dict[str, dict[float, float]]:
    """The server's latency histograms from /metrics: metric name -> {bucket upper bound (s): cumulative count}."""
    from prometheus_client.parser import text_string_to_metric_families

    histograms: dict[str, dict[float, float]] = {}
    response = httpx.get(f"{base_url}/metrics", timeout=10)
    if response.status_code != 200:
        return histograms  # a server without Prometheus metrics: only the client's view is reported
    for family in text_string_to_metric_families(response.text):
        if family.name in SERVER_LATENCIES:
            buckets = {float(s.labels["le"]): s.value for s in family.samples if s.name.endswith("_bucket")}
            histograms[family.name] = buckets
    return histograms


def bucket_percentile(before: dict[float, float], after: dict[float, float], pct: float) -> float:
    """The smallest bucket bound holding pct% of the observations made between two scrapes; NaN if none."""
    counts = {le: after[le] - before.get(le, 0.0) for le in sorted(after)}
    total = counts[float("inf")] if counts else 0.0
    return next((le for le, count in counts.items() if total and count >= pct / 100 * total), float("nan"))


def report_server_side(before: dict[str, dict[float, float]], after: dict[str, dict[float, float]]) -> None:
    """What the server measured over the timed run: from the request's arrival in its handler to the chunk
    handed to the response, so HTTP parsing, the socket and the client are outside it."""
    for name, label in SERVER_LATENCIES.items():
        if name in after:
            p50, p99 = (bucket_percentile(before.get(name, {}), after[name], pct) * 1e3 for pct in (50, 99))
            print(f"server side, {label}: p50 <= {p50:g} ms, p99 <= {p99:g} ms (histogram bucket bounds)")


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
                histograms_before = server_histograms(base_url)
                report(run_clients(pool, args, base_url, args.num_requests, args.max_tokens))
            report_server_side(histograms_before, server_histograms(base_url))
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=60)


if __name__ == "__main__":
    main()
