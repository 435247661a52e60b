#!/usr/bin/env bash
# What a GPU or TPU is worth to the program, in one run of under 8 minutes, written to one JSON:
#
#   bash benchmarks/device_check.sh [OUT.json]            # on a machine with a GPU or TPU
#   bash benchmarks/device_check.sh --tiny [OUT.json]     # tiny sizes on any backend (the test suite, on the CPU)
#   DEVICE_CHECK_TINY=1 bash benchmarks/device_check.sh   # the same
#
# Parts (each under its own time limit, so that one slow or failing part leaves the others' results; the JSON
# records every part's exit status and seconds):
#   selection        ResNet-50's whole APIB selection, cold and warm (python -m benchmarks.device_check)
#   peaks            the device's float32 and bfloat16 matmul peaks
#   gram_throughput  the Gram and quadratic-form builds' GFLOP/s (python -m benchmarks.gram_throughput), merged
#                    against both peaks
#   train_step       fine-tuning step images/s: dense and pruned ResNet-50, widths unrounded and rounded to 8
#   input_pipeline   the host input pipeline's rate (python -m benchmarks.input_pipeline --quick), where the
#                    module exists (its output is kept as the log's tail); its absence is recorded
# Default output: benchmarks/results/device_check.json (tiny: device_check_tiny.json). Run from the repository root.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
TINY=${DEVICE_CHECK_TINY:-}
OUT=""
for arg in "$@"; do
  case "$arg" in
    --tiny) TINY=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) OUT=$arg ;;
  esac
done
if [ -n "$TINY" ]; then
  OUT=${OUT:-benchmarks/results/device_check_tiny.json}; FLAG=--tiny
  LIMITS="selection=120 peaks=60 gram_throughput=120 train_step=120 input_pipeline=60"
else
  OUT=${OUT:-benchmarks/results/device_check.json}; FLAG=""
  # Seconds per part, 450 in all, so that the whole run (with up to 5 s of kill grace per part and the merge) ends
  # within 8 minutes. The compilations are most of it: ResNet-50's capture, its 32 problem builds and the search;
  # four ResNet-50 training steps (dense bfloat16 and float32, two pruned).
  LIMITS="selection=150 peaks=30 gram_throughput=60 train_step=180 input_pipeline=30"
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1

limit() { for kv in $LIMITS; do [ "${kv%%=*}" = "$1" ] && echo "${kv#*=}"; done; }

record() {  # part rc seconds [skipped-reason]
  local skipped=null
  [ -n "${4:-}" ] && skipped="\"$4\""
  echo "{\"part\": \"$1\", \"rc\": $2, \"seconds\": $3, \"skipped\": $skipped}" >> "$WORK/status.jsonl"
}

run_part() {  # part command...
  local part=$1; shift
  local t0 rc ns
  t0=$(date +%s%N)
  echo "== $part (limit $(limit "$part") s)"
  timeout --kill-after=5 "$(limit "$part")" "$@" > "$WORK/$part.log" 2>&1
  rc=$?
  tail -n 3 "$WORK/$part.log"
  ns=$(( $(date +%s%N) - t0 ))
  record "$part" "$rc" "$(( ns / 1000000000 )).$(printf %03d $(( ns / 1000000 % 1000 )))"
}

for part in selection peaks train_step; do
  run_part "$part" "$PY" -m benchmarks.device_check --part "$part" --out "$WORK" $FLAG
done
if [ -n "$TINY" ]; then GT_FLAGS="--quick"; else GT_FLAGS="--numpy-cap 0"; fi
run_part gram_throughput "$PY" -m benchmarks.gram_throughput $GT_FLAGS --no-readme --out "$WORK"
if [ -f benchmarks/input_pipeline.py ]; then
  run_part input_pipeline "$PY" -m benchmarks.input_pipeline --quick
else
  record input_pipeline 0 0 "benchmarks/input_pipeline.py is not in this checkout"
fi
"$PY" -m benchmarks.device_check --merge "$WORK" --out "$OUT" $FLAG
