#!/usr/bin/env bash
# scripts/device/run.sh CMD...   (ON THE GPU MACHINE, after the last chunk's device_install.sh)
# Runs CMD in the repository root with the carried packages on the path, offline, NVLink multicast
# off, and nvidia-smi's view before and after. Example (the third call of docs/gpu.md):
#   bash scripts/device/device_install.sh .devcarry/chunk3 && \
#   bash scripts/device/run.sh python3 -m benchmarks.bench_gpu --out $OUT
set -uo pipefail
cd "$(dirname "$0")/../.."
[ -f /tmp/ms_env.sh ] || { echo "[run.sh] /tmp/ms_env.sh missing: run device_install.sh for every chunk first"; exit 1; }
. /tmp/ms_env.sh
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,utilization.gpu --format=csv
python3 -c "import torch, mani_skill, sapien, zmq, hydra; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'mani_skill', mani_skill.__version__, 'sapien', sapien.__version__, 'zmq', zmq.__version__, 'hydra', hydra.__version__)"
"$@"
rc=$?
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
exit $rc
