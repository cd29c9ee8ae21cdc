"""The server under load with the device's time emulated: the host side of serving, measured on a CPU.

    python benchmarks/serve_emulated.py [--engine-process] [--decode-ms 1] [--prefill-ms-per-1k 2.5]
                                        [--decode-host-ms 0.3] [--prefill-host-ms 8]

The engine serves the tiny test model, but each step emulates the model run instead of running it:
first Python busy work that holds the GIL, as launching kernels does (--decode-host-ms for a decode
step, which replays a CUDA graph; --prefill-host-ms for an eager prefill, hundreds of launches), then
the device's time (--decode-ms; --prefill-ms-per-1k per thousand prompt tokens), waited for in a sleep
that releases the GIL, as waiting for the GPU does. A step run in turn (ModelRunner.run) sleeps it at
once; a step launched ahead (ModelRunner.launch, as the engine loop does where it schedules ahead)
starts on the emulated device once the step before it has ended there, and waiting for its samples
sleeps until it ends too. Every row then "samples" the same token. The defaults are guesses for the Qwen3-0.6B
shape on an H100 at 64 streams, not measurements. So the engine needs little CPU beyond what a GPU host
spends, and what serve_load.py measures is the host side: the engine loop, the event loop writing
chunks, HTTP, and how they share one GIL (the engine in a thread) or not (--engine-process).

The server runs in a child process started from this file, so that the emulation, applied when this
module is imported with NANOVLLM_EMULATED_DEVICE set, also reaches an engine process it spawns (spawn
imports the parent's main module first). Load: serve_load.py --url with the flags below.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO_ROOT, os.path.join(REPO_ROOT, "tests")]

EMULATION_ENV = "NANOVLLM_EMULATED_DEVICE"  # "DECODE_MS,PREFILL_MS_PER_1K,DECODE_HOST_MS,PREFILL_HOST_MS"
SAMPLED_TOKEN_ID = 5  # what every emulated step samples; not an EOS id of the tiny tokenizer


def emulate_device(decode_ms: float, prefill_ms_per_1k: float, decode_host_ms: float, prefill_host_ms: float) -> None:
    """Replace ModelRunner.run and ModelRunner.launch, in this process, with busy work for the step's host time and
    a sleep for its device time."""
    from nanovllm.runner.model_runner import ModelRunner
    from nanovllm.scheduler.batch import ScheduledBatch, StepSamples

    device_free_s = [0.0]  # perf_counter() time at which the emulated device has run every step launched so far

    def launch_on_device(batch: ScheduledBatch) -> float:
        """Hold the GIL for the step's host time, then queue it on the device; returns when it will have run."""
        busy_until = time.perf_counter() + (prefill_host_ms if batch.is_prefill else decode_host_ms) / 1000
        while time.perf_counter() < busy_until:
            pass
        device_s = (prefill_ms_per_1k * batch.num_tokens / 1000 if batch.is_prefill else decode_ms) / 1000
        device_free_s[0] = max(time.perf_counter(), device_free_s[0]) + device_s
        return device_free_s[0]

    class EmulatedSamples:
        """A launched step's samples, there once the emulated device has run it."""

        def __init__(self, batch: ScheduledBatch, ready_s: float) -> None:
            self.batch, self.ready_s = batch, ready_s

        def wait(self, seqs: list) -> StepSamples:
            wait_s = self.ready_s - time.perf_counter()
            if wait_s > 0:  # not sleep(0): it gives up the CPU, which costs more than zero device time
                time.sleep(wait_s)
            num_rows = len(self.batch.seqs)  # every row "samples" the same token
            return StepSamples([SAMPLED_TOKEN_ID] * num_rows, [None] * num_rows, [None] * num_rows)

    def run(self: ModelRunner, batch: ScheduledBatch) -> StepSamples:
        return EmulatedSamples(batch, launch_on_device(batch)).wait(batch.seqs)

    def launch(self: ModelRunner, batch: ScheduledBatch, in_flight: ScheduledBatch | None) -> EmulatedSamples:
        return EmulatedSamples(batch, launch_on_device(batch))

    ModelRunner.run = run  # type: ignore[method-assign]
    ModelRunner.launch = launch  # type: ignore[method-assign,assignment]


if os.environ.get(EMULATION_ENV):  # the server child, and any engine process it spawns
    emulate_device(*(float(value) for value in os.environ[EMULATION_ENV].split(",")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine-process", action="store_true", help="the engine in its own process")
    parser.add_argument("--decode-ms", type=float, default=1.0, help="emulated device time of a decode step")
    parser.add_argument("--prefill-ms-per-1k", type=float, default=2.5, help="... of a prefill, per 1k tokens")
    parser.add_argument("--decode-host-ms", type=float, default=0.3, help="emulated launch time of a decode step")
    parser.add_argument("--prefill-host-ms", type=float, default=8.0, help="... of a prefill step")
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--processes", type=int, default=1, help="load processes (default 1)")
    parser.add_argument("--serve", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # the server child
    args = parser.parse_args()
    if args.serve is not None:
        from nanovllm.serving.server import main as serve_main

        serve_main(args.serve)
        return

    from model_fixtures import write_tiny_model
    from serve_load import free_loopback_port, wait_until_healthy

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_model(Path(tmp), "qwen3")
        port = free_loopback_port()
        serve_args = ["--model", tmp, "--port", str(port), "--served-model-name", "load-test"]
        serve_args += ["--log-level", "warning", "--max-model-len", "1024", "--num-kvcache-blocks", "2048"]
        serve_args += ["--engine-process" if args.engine_process else "--no-engine-process"]
        times = (args.decode_ms, args.prefill_ms_per_1k, args.decode_host_ms, args.prefill_host_ms)
        env = {**os.environ, EMULATION_ENV: ",".join(map(str, times))}
        server = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", *serve_args], env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_healthy(url, server, timeout_s=300.0)
            load = [sys.executable, os.path.join(REPO_ROOT, "benchmarks", "serve_load.py"), "--url", url]
            load += ["--model-name", "load-test", "--num-requests", str(args.num_requests)]
            load += ["--concurrency", str(args.concurrency), "--prompt-len", str(args.prompt_len)]
            load += ["--max-tokens", str(args.max_tokens), "--processes", str(args.processes)]
            subprocess.run(load, check=True)
        finally:
            server.terminate()
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
