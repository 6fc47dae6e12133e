#!/usr/bin/env bash
# scripts/device/prepare.sh [OUTDIR=.devcarry] [CHUNK_MIB=28]
# Tandem's copy of the tested ManiSkill recipe (../shared/device/prepare.sh), extended with the
# project's own import-time needs (pyzmq, hydra-core, omegaconf, antlr4-python3-runtime) and with
# the project's device scripts in every chunk. docs/gpu.md gives the device call sequence.
# Runs on the development machine (it reaches the package registries). Downloads ManiSkill3 3.0.1 + SAPIEN 3.0.3 (cp312) and
# the pure-python deps the device image lacks, plus the Debian GL/Vulkan loader .debs, packs the
# wheels into one tar, and splits it into OUTDIR/chunk1..chunkN (each CHUNK_MIB MiB, default 28: with the ~33 MB working tree),
# so that each device `run` call carries < 64 MiB. GL debs go to OUTDIR/gl (~0.4 MB).
# Every chunk dir also gets MANIFEST, device_install.sh and bench_maniskill.py.
set -euo pipefail
OUT=${1:-.devcarry}
CHUNK_MIB=${2:-28}
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${MS_RECIPE_CACHE:-${TMPDIR:-/tmp}/ms_recipe_cache}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

# Pinned set, tested on the nvidia-h200 image (python 3.12, torch 2.11, numpy 2.x).
# Deliberately NOT carried: IPython (imported by mani_skill.utils.visualization.jupyter_utils at
# import time; device_install.sh writes a 2-name stub instead),
# mplib/toppra (only motion-planning examples), imageio-ffmpeg (only mp4 writing),
# opencv-python (image has opencv-python-headless; sapien installed --no-deps).
# Everything else mani_skill/sapien need (numpy, scipy, h5py, pyyaml, tqdm, tabulate, imageio,
# lxml, networkx, requests, setuptools, matplotlib, absl-py, nvidia-ml-py, huggingface_hub,
# cloudpickle, typing-extensions, torch) is already in the image.
PKGS=(
  mani_skill==3.0.1 sapien==3.0.3
  gymnasium==1.2.3 farama-notifications==0.0.6
  dacite==1.9.2 defusedxml==0.7.1 transforms3d==0.4.2 trimesh==5.2.0
  gitpython==3.2.1 gitdb==4.0.12 smmap==5.0.3
  pytorch-kinematics==0.7.6 pytorch-seed==0.2.0 arm-pytorch-utilities==0.5.0
  tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 shtab==1.13.0
  pyperclip==1.11.0 importlib-resources==7.1.0
  # Tandem (actors, learner, tandem-* commands): what the GPU image lacks at import time.
  pyzmq==27.3.0 hydra-core==1.3.8 omegaconf==2.3.1
)
# lerobot and its dataset wheels (demos, Stage I, the real replay; av alone is 40 MB) join the same
# bundle, so that no call has to carry a 40 MB file next to the ~33 MB working tree.
N_LEROBOT_WHEELS=5   # prepare_lerobot.sh: lerobot datasets dill multiprocess av
# antlr4-python3-runtime 4.9.3 (hydra-core's pin) exists only as an sdist: built here as a wheel.
SDIST_PKGS=(antlr4-python3-runtime==4.9.3)
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"

rm -rf "$CACHE/bundle"; mkdir -p "$CACHE/bundle/wheels" "$CACHE/gl"
echo "[prepare] downloading ${#PKGS[@]} wheels"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT \
    -d "$CACHE/bundle/wheels" "${PKGS[@]}" 2>&1 | grep -v "is ignored: it is neither" || true
$PY -m pip wheel -q --no-deps -w "$CACHE/bundle/wheels" "${SDIST_PKGS[@]}"
PYTHON=$PY bash "$HERE/prepare_lerobot.sh" "$CACHE/bundle/wheels" >/dev/null
n=$(ls "$CACHE/bundle/wheels"/*.whl | wc -l)
want=$(( ${#PKGS[@]} + ${#SDIST_PKGS[@]} + N_LEROBOT_WHEELS ))
[ "$n" -eq "$want" ] || { echo "[prepare] expected $want wheels, got $n"; exit 1; }

echo "[prepare] downloading GL/Vulkan loader debs (amd64)"
o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
mkdir -p /tmp/amd64/partial
apt-get $o update >/dev/null
rm -f "$CACHE/gl"/*.deb
(cd "$CACHE/gl" && apt-get $o download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2 >/dev/null 2>&1)
[ "$(ls "$CACHE/gl"/*.deb | wc -l)" -eq 7 ] || { echo "[prepare] GL debs missing"; exit 1; }

# SAPIEN's GPU PhysX library (libPhysXGpu_64.so) is not on any package registry: SAPIEN downloads it
# at the first physx.enable_gpu(). Where it cannot be had, only sim_backend="physx_cpu" runs (one env
# per process; rendering still uses the GPU). A user who has the zip for PhysX 105.1-physx-5.3.1.patch0
# can pass it as PHYSX_ZIP=/path and it travels with the bundle.
PHYSX_VER=105.1-physx-5.3.1.patch0   # = sapien.physx.version() of sapien 3.0.3
mkdir -p "$CACHE/bundle/physx"
HAVE_PHYSX=0
if [ -n "${PHYSX_ZIP:-}" ]; then
  cp "$PHYSX_ZIP" "$CACHE/bundle/physx/linux-so.zip"
  python3 -m zipfile -l "$CACHE/bundle/physx/linux-so.zip" | grep -q libPhysXGpu_64.so \
    || { echo "[prepare] PHYSX_ZIP lacks libPhysXGpu_64.so"; exit 1; }
  HAVE_PHYSX=1; echo "[prepare] PhysX GPU zip included"
fi

echo "[prepare] packing + splitting (${CHUNK_MIB} MiB parts)"
tar -cf "$CACHE/bundle.tar" -C "$CACHE/bundle" wheels physx
SHA=$(sha256sum "$CACHE/bundle.tar" | cut -d' ' -f1)
rm -rf "$CACHE/parts"; mkdir -p "$CACHE/parts"
split -b "${CHUNK_MIB}m" -d -a 2 "$CACHE/bundle.tar" "$CACHE/parts/part."
NP=$(ls "$CACHE/parts" | wc -l)

rm -rf "$OUT"/chunk* "$OUT/gl"; mkdir -p "$OUT/gl"
cp "$CACHE/gl"/*.deb "$OUT/gl/"
i=1
for p in "$CACHE/parts"/part.*; do
  d="$OUT/chunk$i"; mkdir -p "$d"
  mv "$p" "$d/"
  printf 'NPARTS=%s\nSHA256=%s\nPHYSX_VER=%s\nHAVE_PHYSX=%s\n' "$NP" "$SHA" "$PHYSX_VER" "$HAVE_PHYSX" > "$d/MANIFEST"
  cp "$HERE/device_install.sh" "$d/"
  i=$((i+1))
done
rm -f "$CACHE/bundle.tar"
echo "[prepare] done: $NP chunks + gl in $OUT (bundle sha256 $SHA, GPU PhysX included: $HAVE_PHYSX)"
du -sh "$OUT"/chunk* "$OUT/gl"
