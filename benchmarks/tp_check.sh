#!/usr/bin/env bash
# Tensor parallelism on a 2- or 4-GPU machine: correctness first, then timings. Logs go to $OUT when set.
# Usage: bash benchmarks/tp_check.sh
set -u
export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0  # no NVLink multicast (NVLS): it needs fabric support that shared machines may lack
out=${OUT:-/tmp/nanovllm-tp-check}
mkdir -p "$out"
num_gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
date -u
timeout 300 python3 -m pytest -q -x tests/test_gpu.py -k tp2 2>&1 | tee "$out/pytest.log" | tail -5
for tp in 2 4; do
  [ "$num_gpus" -ge "$tp" ] || continue
  timeout 600 python3 benchmarks/tp_check.py --tp "$tp" --dtype bfloat16 2>&1 | tee "$out/tp${tp}_check.log" | grep -v Warn
done
timeout 200 python3 benchmarks/tp_check.py --tp 2 --dtype float32 2>&1 | tee "$out/tp2_check_fp32.log" | grep -v Warn
for shape in qwen3-0.6b qwen3-8b; do
  for tp in 1 2; do
    timeout 400 python3 bench.py --shape "$shape" --tensor-parallel-size "$tp" 2>&1 | tee "$out/bench_${shape}_tp${tp}.log" | tail -2
  done
done
