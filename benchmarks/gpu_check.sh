#!/usr/bin/env bash
# One GPU-machine session: correctness checks first, then timings. Logs go to $OUT when it is set.
# Usage: bash benchmarks/gpu_check.sh quick|full|serving|breakdown|fp8|kernels|features
#   quick    GPU tests, kernels, a short bench
#   breakdown  bench.py, then its time per decode step against the floor, then the same with a GPU profile of
#            decode steps and of prefill steps, then the prefill kernel's tile sweep
#   full     GPU tests, kernels, bench.py temperature-only and with top-k/top-p/repetition penalty, GPU-busy share
#   serving  the sampler alone, the engine's time to first token without HTTP, then the server under 64
#            concurrent streams, engine in a thread and in a process (needs the serve extra installed;
#            fastapi 0.120 with starlette 0.48 where the image has no opentelemetry, which fastapi 0.165 imports)
#   fp8      the FP8 KV-cache tests, bench.py with a bf16 and an FP8 cache in turn, FP8 accuracy on the 0.6B shape
#   kernels  the GPU tests of quantization, LoRA, MoE and the families, then the quantized-GEMM, MoE and LoRA
#            kernels against their floors, with the decode tile sweeps (about 6 minutes)
#   features bench.py with LoRA beside the base model, Gemma 3, phi-1.5, Qwen3-8B in bf16, FP8 and W4A16, and
#            Qwen3-30B-A3B (about 10 minutes)
set -u
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/nanovllm-gpu-check}
mkdir -p "$out"
mode=${1:-quick}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
date -u
if [ "$mode" = serving ]; then
  timeout 120 python3 benchmarks/sampler.py 2>&1 | tee "$out/sampler.log" | tail -8
  # The engine's time to first token without HTTP: set against serve_load.py's, what HTTP and the client add.
  timeout 240 python3 benchmarks/engine_ttft.py --dummy-shape qwen3-0.6b 2>&1 | tee "$out/engine_ttft.log" | tail -4
  timeout 240 python3 benchmarks/engine_ttft.py --dummy-shape qwen3-0.6b --engine-process 2>&1 \
    | tee "$out/engine_ttft_process.log" | tail -1
  # Four load processes (one alone adds latency of its own); the engine in a thread, then in its own process.
  for engine in thread process; do
    server_args="--no-engine-process"; [ "$engine" = process ] && server_args="--engine-process"  # "=": a value led by --
    timeout 300 python3 benchmarks/serve_load.py --dummy-shape qwen3-0.6b --num-requests 512 --concurrency 64 \
      --prompt-len 128 --max-tokens 128 --processes 4 --server-args="$server_args" 2>&1 \
      | tee "$out/serve_load_$engine.log" | tail -8
  done
  exit 0
fi
if [ "$mode" = fp8 ]; then
  timeout 300 python3 -m pytest -q tests/test_fp8_kernels.py 2>&1 | tee "$out/pytest_fp8_kernels.log" | tail -3
  # The decode kernel's constants over FP8 caches (each loop step reads half of bf16's bytes).
  timeout 240 python3 benchmarks/kernels.py --sweep-decode --kv-cache-dtype fp8 2>&1 | tee "$out/sweep_fp8.log" | tail -6
  timeout 300 python3 -m pytest -q tests/test_gpu.py -k fp8 2>&1 | tee "$out/pytest_fp8_gpu.log" | tail -3
  for run in 1 2; do  # alternating: the first run of a machine start is the slowest
    for kv in auto fp8; do
      timeout 300 python3 bench.py --kv-cache-dtype $kv 2>&1 | tee "$out/bench_${kv}_$run.log" | tail -2
    done
  done
  timeout 600 python3 benchmarks/kv_cache_accuracy.py --shape qwen3-0.6b 2>&1 | tee "$out/fp8_accuracy.log" | tail -2
  exit 0
fi
if [ "$mode" = kernels ]; then
  timeout 300 python3 -m pytest -q tests/test_quant_kernels.py tests/test_lora_kernels.py tests/test_lora_gpu.py \
    tests/test_moe.py "tests/test_quantization.py::test_gpu_matches_transformers" \
    "tests/test_families.py::test_family_on_gpu_matches_transformers" 2>&1 | tee "$out/pytest_kernels.log" | tail -8
  timeout 200 python3 benchmarks/quant_gemm.py --sweep 2>&1 | tee "$out/quant_gemm_sweep.log" | tail -3
  timeout 120 python3 benchmarks/moe_kernel.py --sweep 2>&1 | tee "$out/moe_kernel_sweep.log" | tail -10
  timeout 90 python3 benchmarks/lora_kernel.py 2>&1 | tee "$out/lora_kernel.log" | tail -3
  exit 0
fi
if [ "$mode" = features ]; then
  run() { local name=$1; shift; timeout 150 python3 bench.py "$@" 2>&1 | tee "$out/bench_$name.log" | tail -1; }
  run base; run lora4 --num-loras 4
  run gemma3 --shape gemma3-1b; run phi --shape phi-1.5
  run q8b --shape qwen3-8b; run q8b_fp8 --shape qwen3-8b --quantization fp8; run q8b_w4a16 --shape qwen3-8b --quantization w4a16
  run moe --shape qwen3-30b-a3b
  exit 0
fi
if [ "$mode" = breakdown ]; then
  timeout 150 python3 bench.py 2>&1 | tee "$out/bench.log" | tail -1
  timeout 150 python3 benchmarks/step_breakdown.py 2>&1 | tee "$out/breakdown.log" | tail -12
  timeout 200 python3 benchmarks/step_breakdown.py --profile 2>&1 | tee "$out/breakdown_profile.log" | tail -45
  timeout 200 python3 benchmarks/step_breakdown.py --profile-prefill 2>&1 | tee "$out/breakdown_prefill.log" | tail -30
  timeout 240 python3 benchmarks/kernels.py --sweep-prefill 2>&1 | tee "$out/sweep_prefill.log" | tail -6
  exit 0
fi
timeout 300 python3 -m pytest -q tests/test_triton_kernels.py tests/test_gpu.py 2>&1 | tee "$out/pytest.log" | tail -15
timeout 200 python3 benchmarks/kernels.py 2>&1 | tee "$out/kernels.log" | tail -30
if [ "$mode" = quick ]; then
  timeout 240 python3 bench.py --num-seqs 64 --max-input-len 512 --max-output-len 256 2>&1 | tee "$out/bench_quick.log" | tail -5
else
  timeout 300 python3 bench.py 2>&1 | tee "$out/bench.log" | tail -1
  timeout 300 python3 bench.py --top-p 0.95 --top-k 50 --repetition-penalty 1.1 2>&1 | tee "$out/bench_sampling.log" | tail -1
  timeout 200 python3 benchmarks/gpu_busy.py 2>&1 | tee "$out/gpu_busy.log" | tail -8
fi
