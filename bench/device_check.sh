#!/usr/bin/env bash
# The one GPU check of labkit: under 8 minutes on one H100/H200, each step under `timeout`, results in
# $OUT as they come (the device tool brings back at most a few files: everything goes into four).
#
#   bench/device_check.sh            # on the device (make device-check); OUT defaults to bench/results/device
#   bench/device_check.sh --dry-run  # the same steps on the CPU with a tiny shape (tests run it: it cannot rot)
#
# Wheels the device image lacks (pydantic, duckdb, trl, datasets, ...) travel in .devwheels/ (made here by
# bench/device_wheels.sh, carried by the device tool) and are installed into a scratch dir on PYTHONPATH.
#
# Files in $OUT: results.jsonl (one JSON line per step: ok, seconds, numbers), device_check.log (every
# step's output), gpu_sft_1b.json and gpu_sft_3b.json (bench/gpu_sft.py's full reports).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-bench/results/device}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
SCRATCH=${SCRATCH:-$(mktemp -d)}
export LABKIT_HOME=${LABKIT_HOME:-$SCRATCH/labkit-home}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
BUDGET=${BUDGET_S:-470}   # seconds for all steps; a step that cannot fit in what is left is skipped
T0=$(date +%s)
RESULTS="$OUT/results.jsonl"
LOG="$OUT/device_check.log"
: > "$RESULTS"
: > "$LOG"

if [ $DRY = 1 ]; then
  PRESET=tiny; STEPS=3; CPU=--cpu; BATCH=16; TOKENS=2048
  SFT_ARGS=(--dry-run --systems labkit_packed,trl_padded); SFT3_ARGS=(--dry-run --systems labkit_packed)
else
  PRESET=1b; STEPS=40; CPU=; BATCH=64; TOKENS=16384
  SFT_ARGS=(--preset 1b); SFT3_ARGS=(--preset 3b --grad-ckpt --max-tokens-per-device 8192)
fi

# step NAME LIMIT_S CMD...: run CMD under timeout, log its output, record one JSON line.
step() {
  local name=$1 limit=$2; shift 2
  local now left start rc
  now=$(date +%s); left=$((BUDGET - (now - T0)))
  if [ "$limit" -gt "$left" ]; then
    echo "{\"step\": \"$name\", \"ok\": false, \"skipped\": \"needs ${limit}s, ${left}s left of the budget\"}" >> "$RESULTS"
    return
  fi
  echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)" >> "$LOG"
  start=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" > "$OUT/.step.out" 2>&1
  rc=$?
  cat "$OUT/.step.out" >> "$LOG"
  # The step's own JSON line (the python steps print one), else a line made from its exit code.
  local line
  line=$(grep -E '^\{"step": ' "$OUT/.step.out" | tail -n 1)
  if [ -z "$line" ]; then
    local ok=false; [ $rc = 0 ] && ok=true
    line="{\"step\": \"$name\", \"ok\": $ok}"
  fi
  echo "$line" | "$PY" -c "import json,sys; d=json.loads(sys.stdin.read()); d.update(step='$name', ok=bool(d.get('ok')) and $rc == 0, rc=$rc, \
wall_s=$(( $(date +%s) - start )), timed_out=$rc in (124, 137)); print(json.dumps(d))" >> "$RESULTS" \
    || echo "{\"step\": \"$name\", \"ok\": false, \"rc\": $rc}" >> "$RESULTS"
  rm -f "$OUT/.step.out"
}

if [ -d .devwheels ] && ls .devwheels/*.whl >/dev/null 2>&1; then
  step wheels 90 "$PY" -m pip install -q --no-index --no-deps --target "$SCRATCH/site" .devwheels/*.whl
  export PYTHONPATH="$PYTHONPATH:$SCRATCH/site"
fi

{ nvidia-smi 2>&1 || echo "no nvidia-smi"; } >> "$LOG"
step env 60 "$PY" bench/device_check.py env
step gpu-tests 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_attention.py \
  tests/test_bench_gpu_sft.py
step model 120 "$PY" bench/device_check.py model --preset "$PRESET" --out "$SCRATCH/model-$PRESET"
step train 150 "$PY" bench/device_check.py train --model "$SCRATCH/model-$PRESET" --root "$SCRATCH/runs" \
  --name "train-$PRESET" --steps "$STEPS" --batch "$BATCH" --tokens "$TOKENS" $CPU --timeout 140
step fsdp-resume 150 "$PY" bench/device_check.py resume --model "$SCRATCH/model-$PRESET" --root "$SCRATCH/runs" \
  --name "fsdp-$PRESET" --strategy fsdp --steps $((STEPS < 12 ? STEPS + 3 : 12)) --checkpoint-step 2 \
  --batch "$BATCH" --tokens "$TOKENS" $CPU --timeout 140
step gpu-sft-1b 120 "$PY" bench/gpu_sft.py "${SFT_ARGS[@]}" --out "$OUT/gpu_sft_1b.json"
step gpu-sft-3b 150 "$PY" bench/gpu_sft.py "${SFT3_ARGS[@]}" --out "$OUT/gpu_sft_3b.json"

echo "=== done in $(( $(date +%s) - T0 ))s" >> "$LOG"
cat "$RESULTS"
# Success means every step ran and passed; the results say which did not.
! grep -q '"ok": false' "$RESULTS"
