#!/usr/bin/env bash
# Same-run A/B of two source trees of symmtriton on this machine's GPU(s): each tree is installed
# into its own directory, then the bench runs once per tree, alternating A, B, A, B (ROUNDS, 2),
# with the same arguments, and benchmarks/ab_compare.py prints the per-row ratio of the medians.
#   benchmarks/ab_trees.sh OLD_TREE NEW_TREE [bench arguments]
# NPROC ranks (default: the GPU count, at least 2; ranks share GPU 0 when there is one GPU, with
# TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1 under MPS: a regression check, not a latency claim). Output:
# $OUT/ab_<old|new>_<round>.csv and the table. Multicast stays off (docs/ARCHITECTURE.md).
set -u
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1
OLD=$1 NEW=$2
shift 2
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
ROUNDS=${ROUNDS:-2}
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
NPROC=${NPROC:-$(( NGPU >= 2 ? NGPU : 2 ))}
here=$(cd "$(dirname "$0")" && pwd)
source "$here/mps.sh"
mkdir -p "$OUT"
(( NGPU < 2 )) && { export TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1; start_mps "$OUT/ab_mps.log"; }
for side in old new; do
  tree=$OLD; [ "$side" = new ] && tree=$NEW
  rm -rf "/tmp/ab_$side"
  $PY -m pip install -q --no-deps --no-build-isolation --target "/tmp/ab_$side" "$tree" \
    >"$OUT/ab_install_$side.log" 2>&1 || { echo "install of $tree failed"; exit 1; }
done
bench_module() {  # the bench's module in the tree installed at $1
  if [ -d "$1/symmtriton/tools/bench" ]; then echo symmtriton.tools.bench; else echo symmtriton.bench; fi
}
for round in $(seq 1 "$ROUNDS"); do
  for side in old new; do
    env PYTHONPATH="/tmp/ab_$side" $PY -m torch.distributed.run --standalone \
      --nproc-per-node="$NPROC" -m "$(bench_module "/tmp/ab_$side")" --out-dir "$OUT/ab_$side" \
      --name "ab_${side}_$round" --no-plot "$@" >"$OUT/ab_${side}_$round.log" 2>&1 \
      || { echo "bench $side round $round failed:"; tail -5 "$OUT/ab_${side}_$round.log"; exit 1; }
    cp "$OUT/ab_$side/ab_${side}_$round.csv" "$OUT/" 2>/dev/null
  done
done
$PY "$here/ab_compare.py" --old "$OUT"/ab_old_*.csv --new "$OUT"/ab_new_*.csv
