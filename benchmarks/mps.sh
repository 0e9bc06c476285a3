# Sourced by the GPU scripts: start_mps LOGFILE starts the CUDA MPS daemon once (ranks that share
# one GPU spin on each other's flags; without MPS they run in time slices of milliseconds) and
# stops it when the sourcing script exits.
mps_started=""
start_mps() {
  [ -n "$mps_started" ] && return
  mps_started=1
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/symmtriton-mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/symmtriton-mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d >>"$1" 2>&1; then
    trap 'echo quit | nvidia-cuda-mps-control' EXIT
    echo "==== MPS started" >>"$1"
  else
    echo "==== MPS not started (ranks time-slice the GPU)" >>"$1"
  fi
}
