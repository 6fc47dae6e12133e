#!/usr/bin/env bash
# scripts/device/prepare_lerobot.sh [OUTDIR=.whl]
# The wheels the GPU image lacks for LeRobot datasets (demos, Stage I, the real replay): lerobot and
# what its dataset code imports, pinned to this project's venv versions, for Python 3.12.
# prepare.sh puts them into the device bundle; alone, a call carrying OUTDIR installs them with
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site OUTDIR/*.whl
set -euo pipefail
OUT=${1:-.whl}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
mkdir -p "$OUT"
version() { "$PY" -m pip show "$1" 2>/dev/null | awk '/^Version/{print $2}'; }
for pkg in lerobot datasets dill multiprocess av; do
  v=$(version "$pkg"); [ -n "$v" ] || { echo "[prepare_lerobot] $pkg is not in the venv: run make install"; exit 1; }
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$OUT" "$pkg==$v"
done
du -sh "$OUT"
