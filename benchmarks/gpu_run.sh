#!/usr/bin/env bash
# The GPU tier in one command, for the lent single-GPU machine (see benchmarks/README.md):
# installs the package, runs `pytest -m gpu` (2, 4 and 8 ranks on one GPU, CUDA graphs) and the
# benchmark CLI (W = 1 and W = 4 under MPS), writes logs and results under $OUT, and prints a
# short summary last (BENCH_ARGS applies to every world size, BENCH_ARGS_W<W> to one).
# DESIGN.md section 4: multicast stays off, no card settings are touched,
# MPS is started here and stopped on exit.
set -u
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1
export TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
STAGES=${STAGES:-"tests bench"}
cd "$(dirname "$0")/.."

python3 -m pip install -e . --no-deps --no-build-isolation -q >"$OUT/install.log" 2>&1 \
  || { echo "install failed"; tail -20 "$OUT/install.log"; exit 1; }
{ nvidia-smi; python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'; } >"$OUT/env.txt" 2>&1

export CUDA_MPS_PIPE_DIRECTORY=/tmp/symmtriton-mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/symmtriton-mps-log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
if nvidia-cuda-mps-control -d >/dev/null 2>&1; then
  trap 'echo quit | nvidia-cuda-mps-control' EXIT
  echo "MPS started" >>"$OUT/env.txt"
else
  echo "MPS not started (ranks time-slice the GPU)" >>"$OUT/env.txt"
fi

summary=()
if [[ " $STAGES " == *" tests "* ]]; then
  timeout "${TEST_TIMEOUT:-420}" python3 -m pytest -m gpu -q -p no:cacheprovider ${TESTS:-tests} \
    >"$OUT/pytest_gpu.log" 2>&1
  summary+=("pytest -m gpu: rc=$? $(tail -1 "$OUT/pytest_gpu.log")")
fi
if [[ " $STAGES " == *" bench "* ]] && python3 -c 'import symmtriton.bench' 2>/dev/null; then
  for W in ${BENCH_WORLDS:-1 4}; do
    timeout "${BENCH_TIMEOUT:-240}" python3 -m torch.distributed.run --standalone --nproc-per-node="$W" \
      -m symmtriton.bench --out-dir "$OUT" ${BENCH_ARGS:-} $(eval echo "\${BENCH_ARGS_W$W:-}") \
      >"$OUT/bench_w$W.log" 2>&1
    summary+=("bench W=$W: rc=$?")
  done
fi
echo "==== gpu_run summary ($(date -u +%FT%TZ)) ===="
head -3 "$OUT/env.txt" | tail -1
grep -E "^(torch|MPS)" "$OUT/env.txt"
grep -E "passed|failed|error" "$OUT/pytest_gpu.log" 2>/dev/null | tail -5
for W in ${BENCH_WORLDS:-1 4}; do [ -f "$OUT/bench_w$W.log" ] && tail -25 "$OUT/bench_w$W.log"; done
printf '%s\n' "${summary[@]}"
