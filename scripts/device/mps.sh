#!/usr/bin/env bash
# scripts/device/mps.sh CMD...   (ON THE GPU MACHINE, inside run.sh; issue #20)
#   bash scripts/device/run.sh bash scripts/device/mps.sh python3 -m benchmarks.bench_gpu --out $OUT ...
# Runs CMD under a CUDA MPS control daemon of its own: started as a plain process with its pipe and
# log directories under /tmp/tandem_mps, stopped ("quit") when CMD ends, fails or is interrupted.
# Every CUDA process CMD starts (the bench and its env workers) inherits CUDA_MPS_PIPE_DIRECTORY and
# becomes a client of one MPS server, so their CUDA work shares the GPU instead of time-slicing
# between contexts (SAPIEN's Vulkan rendering is not CUDA and is not affected). No GPU setting is
# touched (no compute mode, no MIG, no reset). If the daemon does not start, or a CUDA client cannot
# connect through it, the daemon is stopped and CMD runs without MPS; TANDEM_MPS=1|0 tells CMD which.
set -uo pipefail
export CUDA_MPS_PIPE_DIRECTORY=/tmp/tandem_mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/tandem_mps/log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
export TANDEM_MPS=0

stop_mps() {
  echo quit | nvidia-cuda-mps-control 2>/dev/null && echo "[mps] daemon stopped"
  tail -3 "$CUDA_MPS_LOG_DIRECTORY/control.log" 2>/dev/null
}

if ! command -v nvidia-cuda-mps-control >/dev/null; then
  echo "[mps] nvidia-cuda-mps-control not on PATH: running without MPS"
elif ! nvidia-cuda-mps-control -d; then
  echo "[mps] the daemon did not start: running without MPS"
else
  trap stop_mps EXIT
  trap 'exit 143' TERM INT
  if timeout 60 python3 -c "import torch; torch.zeros(1, device='cuda').add_(1); torch.cuda.synchronize()"; then
    TANDEM_MPS=1
    echo "[mps] daemon up, a CUDA client connected: $(echo get_server_list | nvidia-cuda-mps-control | tr '\n' ' ')"
  else
    echo "[mps] no CUDA client could connect through MPS: stopping it, running without MPS"
    stop_mps
    trap - EXIT
  fi
fi
[ "$TANDEM_MPS" = 1 ] || unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
"$@"
