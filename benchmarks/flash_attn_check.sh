#!/usr/bin/env bash
# Build flash-attn from its PyPI source on the GPU machine, then verify our flash_attn backend.
# The source tarball must sit in .fa/ (fetched elsewhere, see shared FLASH_ATTN_BUILD notes).
#   bash benchmarks/flash_attn_check.sh start [full]   # unpack and start the build in the background:
#                                                      # by default trimmed to the forward kernels of head_dim
#                                                      # 32 and 128 (benchmarks/flash_attn_trim.py), 17 ninja
#                                                      # steps instead of 73; "full" builds everything
#   bash benchmarks/flash_attn_check.sh wait SECONDS   # poll the build; install the wheel when done
#   bash benchmarks/flash_attn_check.sh verify         # engine tests and bench.py with flash_attn
set -u
export PYTHONUNBUFFERED=1
log=/tmp/fa-build.log
case "$1" in
  start)
    mkdir -p /tmp/fa && tar xzf .fa/flash_attn-*.tar.gz -C /tmp/fa
    [ "${2:-}" = full ] || python3 benchmarks/flash_attn_trim.py /tmp/fa/flash_attn-* || exit 1
    cd /tmp/fa/flash_attn-* || exit 1
    FLASH_ATTENTION_FORCE_BUILD=TRUE FLASH_ATTN_CUDA_ARCHS=90 MAX_JOBS=14 NVCC_THREADS=2 \
      setsid nohup python3 setup.py bdist_wheel --dist-dir /tmp/fa-dist > "$log" 2>&1 < /dev/null &
    echo "build started" ;;
  wait)
    deadline=$((SECONDS + $2))
    while [ $SECONDS -lt $deadline ] && ! ls /tmp/fa-dist/*.whl > /dev/null 2>&1; do
      sleep 30; echo "$(date -u +%T) $(grep -o '^\[[0-9]*/[0-9]*\]' "$log" | tail -1)"
    done
    if ls /tmp/fa-dist/*.whl > /dev/null 2>&1; then
      python3 -m pip install -q --no-deps --no-index /tmp/fa-dist/*.whl && echo "flash-attn installed"
    else
      tail -3 "$log"
    fi ;;
  verify)
    python3 -c "import flash_attn; print('flash_attn', flash_attn.__version__)" || exit 1
    timeout 300 python3 -m pytest -q -s tests/test_gpu.py -k "flash" 2>&1 | grep -E "decode logits|passed|failed"
    for backend in triton flash_attn triton flash_attn; do  # alternating: the first run of a start is slow
      echo "$backend: $(timeout 150 python3 bench.py --backend $backend 2>&1 | tail -1)"
    done ;;
esac
