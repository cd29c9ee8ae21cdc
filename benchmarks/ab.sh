#!/usr/bin/env bash
# Run one benchmark command alternately in this checkout and in a baseline tree, on one machine start.
# Figures vary by up to 2x between GPU-machine starts (host time) and 13% within one (bench.py), so a
# change is judged only against the baseline in the same start, in alternating runs, the first of
# each tree set against the first of the other. Logs go to $OUT when set.
# Usage: bash benchmarks/ab.sh BASELINE_DIR ROUNDS COMMAND...
#   BASELINE_DIR  a copy of the tree to compare with (e.g. `git archive <commit> | tar -x -C DIR`)
#   ROUNDS        how many times each tree runs, alternating, the baseline first
#   COMMAND       what to run in each tree's root, e.g. python3 bench.py
set -u
export PYTHONUNBUFFERED=1
if [ $# -lt 3 ] || [ ! -d "$1" ]; then
  echo "usage: bash benchmarks/ab.sh BASELINE_DIR ROUNDS COMMAND..." >&2
  exit 2
fi
baseline=$(cd "$1" && pwd)
rounds=$2
shift 2
here=$(pwd)
out=${OUT:-/tmp/nanovllm-ab}
mkdir -p "$out"
for round in $(seq 1 "$rounds"); do
  for tree in baseline new; do
    dir=$here
    [ "$tree" = baseline ] && dir=$baseline
    log="$out/ab_${tree}_${round}.log"
    echo "== $tree, round $round: $* ($(date -u +%H:%M:%S) UTC)"
    (cd "$dir" && "$@") >"$log" 2>&1
    tail -3 "$log"
  done
done
