#!/usr/bin/env bash
# The GPU tier in one command (benchmarks/README.md). Stages, in this order (STAGES picks some):
#   tests     pytest -m gpu on the one-rank-per-GPU worlds (gpu-w2-nccl, gpu-w2-gloo; with 4 or 8
#             GPUs also gpu-w4-*, gpu-w8-*; TESTS_K narrows the -k expression, e.g. "w4-nccl")
#   examples  every example under torchrun, one rank per GPU (NPROC ranks: the GPU count, at least 2;
#             with one GPU the two ranks share it under MPS; EXAMPLES: a comma list, default all)
#   bench     symmtriton-bench, NPROC ranks, one per GPU (NCCL), BENCH_ARGS (default: the default sweep)
#   shared    MPS started: pytest -m gpu on the shared-GPU worlds SHARED_WORLDS (default "4"; all:
#             "2 4 8"; SHARED_TESTS: test files, default all; SHARED_TESTS_CAP_S, default 360: the
#             94 W=4 tests took ~290 s on one H200); MPS stopped
#   shared_bench  MPS started: the bench with SHARED_BENCH_W ranks on GPU 0; MPS stopped
# Every stage runs under `timeout` within one time limit for the whole script (BUDGET_S, 600 s:
# a stage that no longer fits is skipped and said so), so a hang fails fast and the script always
# ends. For each program the table at the end gives its exit time: seconds from the start of its
# teardown (symmtriton-exit-mark, printed when SYMMTRITON_EXIT_MARK is set) to the process's end.
# Logs under $OUT (few files): gpu_run.log (environment, examples,
# bench output), pytest_gpu.log (both test stages), the bench's CSV/JSON/PNG.
# docs/ARCHITECTURE.md, "GPU machines": multicast stays off, no card settings are touched, MPS
# only in `shared`.
set -u
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1
export SYMMTRITON_EXIT_MARK=1
unset TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES  # set per process where ranks share a GPU
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
LOG="$OUT/gpu_run.log"
TLOG="$OUT/pytest_gpu.log"
: >"$LOG"
: >"$TLOG"
cd "$(dirname "$0")/.."
START=$SECONDS
BUDGET_S=${BUDGET_S:-600}
STAGES=${STAGES:-"tests examples bench shared shared_bench"}
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
NPROC=${NPROC:-$(( NGPU >= 2 ? NGPU : 2 ))}
SHARED_WORLDS=${SHARED_WORLDS:-"4"}
SHARED_BENCH_W=${SHARED_BENCH_W:-4}
PY=${PYTHON:-python3}
# the commit the bench records (a copy of the tree without .git cannot tell): COMMIT=<sha>
COMMIT=${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}

[ -n "${SKIP_INSTALL:-}" ] || $PY -m pip install -e . --no-deps --no-build-isolation -q >>"$LOG" 2>&1 \
  || { echo "install failed"; tail -20 "$LOG"; exit 1; }
{ echo "==== environment"; nvidia-smi -L; nvidia-smi topo -m 2>/dev/null | head -8
  $PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)'
} >>"$LOG" 2>&1

rows=()
# run NAME CAP_S LOGFILE RESULT_REGEX CMD...: CMD under timeout (CAP_S, less when the budget is
# short), output appended to LOGFILE; one row for the table.
run() {
  local name=$1 cap=$2 log=$3 pat=$4
  shift 4
  local left=$(( BUDGET_S - (SECONDS - START) - 40 ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 20 )); then rows+=("$name|skipped: budget|-|-|-"); return; fi
  local tmp t0 t1 rc mark exit_s wall status result
  tmp=$(mktemp)
  echo "==== $name (timeout ${limit}s): $*" >>"$log"
  t0=$(date +%s.%N)
  timeout -k 30 "$limit" "$@" >"$tmp" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  cat "$tmp" >>"$log"
  mark=$(grep -ao 'symmtriton-exit-mark [0-9.]*' "$tmp" | awk '{print $2}' | sort -n | head -1)
  exit_s=-
  [ -n "$mark" ] && exit_s=$(awk -v a="$t1" -v b="$mark" 'BEGIN { printf "%.1f", a - b }')
  wall=$(awk -v a="$t1" -v b="$t0" 'BEGIN { printf "%.0f", a - b }')
  status=$rc
  { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && status=TIMEOUT
  result=$(grep -aE "$pat" "$tmp" | tail -1 | cut -c1-110)
  rows+=("$name|$status|$wall|$exit_s|$result")
  rm -f "$tmp"
}

TORCHRUN=($PY -m torch.distributed.run --standalone)

source benchmarks/mps.sh
if [[ " $STAGES " == *" tests "* ]]; then
  if (( NGPU >= 2 )); then
    run "pytest -m gpu, one rank per GPU" ${TESTS_CAP_S:-330} "$TLOG" "passed|failed|error|worker pools" \
      $PY -m pytest -m gpu -q -p no:cacheprovider -k "${TESTS_K:-nccl or gloo}" tests
  else
    rows+=("pytest -m gpu, one rank per GPU|skipped: $NGPU GPU|-|-|-")
  fi
fi
if [[ " $STAGES " == *" examples "* ]]; then
  (( NGPU < NPROC )) && start_mps "$LOG"  # ranks that share a GPU spin on each other: MPS, not time slices
  IFS=',' read -r -a examples <<<"${EXAMPLES:-all_gather,reduce_scatter,symmetric_buffers,tp_decode,tp_decode --mode ar,ep_moe,megatron_tp}"
  for ex in "${examples[@]}"; do
    read -r script flags <<<"$ex"
    run "example $ex (${NPROC} ranks)" 120 "$LOG" "match|passed|speed-up|Error|error" \
      "${TORCHRUN[@]}" --nproc-per-node="$NPROC" "examples/$script.py" $flags
  done
fi
if [[ " $STAGES " == *" bench "* ]]; then
  run "bench W=$NPROC one rank per GPU" 170 "$LOG" "rows in|FAIL|Error" \
    "${TORCHRUN[@]}" --nproc-per-node="$NPROC" -m symmtriton.tools.bench --out-dir "$OUT" \
    --commit "$COMMIT" ${BENCH_ARGS:-}
fi
if [[ " $STAGES " == *" shared "* ]]; then
  start_mps "$LOG"
  k=$(printf 'gpu-w%s-shared or ' $SHARED_WORLDS)
  run "pytest -m gpu, shared GPU (W in $SHARED_WORLDS, MPS)" ${SHARED_TESTS_CAP_S:-360} "$TLOG" "passed|failed|error|worker pools" \
    $PY -m pytest -m gpu -q -p no:cacheprovider -k "${k% or }" ${SHARED_TESTS:-tests}
fi
if [[ " $STAGES " == *" shared_bench "* ]]; then
  start_mps "$LOG"
  run "bench W=$SHARED_BENCH_W on one GPU (MPS)" 120 "$LOG" "rows in|FAIL|Error" \
    env CUDA_VISIBLE_DEVICES=0 "${TORCHRUN[@]}" --nproc-per-node="$SHARED_BENCH_W" \
    -m symmtriton.tools.bench --out-dir "$OUT" --commit "$COMMIT" --quick \
    --max-bytes 64M --no-plot ${SHARED_BENCH_ARGS:-}
fi

{
  echo "==== gpu_run summary ($(date -u +%FT%TZ), $NGPU GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs), $(( SECONDS - START )) s)"
  grep -E "^torch " "$LOG" | head -1
  echo "commit $COMMIT"
  printf '%-46s %-8s %6s %7s  %s\n' "stage" "rc" "wall_s" "exit_s" "result"
  for r in "${rows[@]}"; do
    IFS='|' read -r name status wall exit_s result <<<"$r"
    flag=""
    [[ "$exit_s" != - ]] && awk -v e="$exit_s" 'BEGIN { exit !(e > 15) }' && flag=" (exit > 15 s)"
    printf '%-46s %-8s %6s %7s  %s%s\n' "$name" "$status" "$wall" "$exit_s" "$result" "$flag"
  done
  echo "files in $OUT: $(ls "$OUT" | xargs)"
} | tee -a "$LOG"
