#!/usr/bin/env bash
# Tensor parallelism on a 2- or 4-GPU machine. Logs go to $OUT when set.
# Usage: bash benchmarks/tp_check.sh check | bench [SHAPE ...]
#   check  GPU TP tests, then TP=N vs TP=1 tokens, graphs vs eager and a killed worker (tp_check.py)
#   bench  bench.py at TP=1, TP=2 and (with 4 GPUs) TP=4 on each shape (default: qwen3-0.6b qwen3-8b)
set -u
export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0  # no NVLink multicast (NVLS): it needs fabric support that shared machines may lack
out=${OUT:-/tmp/nanovllm-tp-check}
mode=${1:-check}
case "$mode" in check|bench) ;; *) echo "usage: bash benchmarks/tp_check.sh check | bench [SHAPE ...]" >&2; exit 2 ;; esac
mkdir -p "$out"
num_gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
date -u
if [ "$mode" = check ]; then
  timeout 240 python3 -m pytest -q -x tests/test_gpu.py -k tp2 2>&1 | tee "$out/pytest.log" | tail -5
  for tp in 2 4; do
    [ "$num_gpus" -ge "$tp" ] || continue
    # The whole log stays in $OUT; the terminal gets it without torch's warnings and C++ stack frames.
    timeout 300 python3 benchmarks/tp_check.py --tp "$tp" --dtype bfloat16 --hang-dump-s 280 2>&1 \
      | tee "$out/tp${tp}_check.log" | grep -v -e Warn -e '^frame #' -e '^\[rank' -e '^Exception raised from'
  done
  exit 0
fi
shift
shapes=${*:-qwen3-0.6b qwen3-8b}
for shape in $shapes; do
  for tp in 1 2 4; do
    [ "$num_gpus" -ge "$tp" ] || continue
    timeout 200 python3 bench.py --shape "$shape" --tensor-parallel-size "$tp" 2>&1 \
      | tee "$out/bench_${shape}_tp${tp}.log" | tail -1
  done
done
