#!/usr/bin/env bash
# System packages ManiSkill3 (SAPIEN, Vulkan) and LeRobot (torchcodec, FFmpeg) need on a machine
# without a GPU. Idempotent; uses sudo when not root; skips what is already installed.
set -euo pipefail
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo

mesa_ok() {
  # SAPIEN rejects lavapipe older than Mesa 23
  local v; v=$(dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null || true)
  [ -n "$v" ] && dpkg --compare-versions "$v" ge 23 && dpkg -s libvulkan1 >/dev/null 2>&1
}
ffmpeg_ok() { ldconfig -p | grep -q 'libavcodec\.so\.' && ldconfig -p | grep -q 'libavfilter\.so\.'; }

if mesa_ok && ffmpeg_ok; then echo "[system-deps] present"; exit 0; fi
if ! command -v apt-get >/dev/null; then
  echo "[system-deps] no apt-get: install Mesa >= 23 Vulkan drivers (lavapipe) and FFmpeg libraries by hand" >&2
  exit 1
fi
. /etc/os-release
if ! mesa_ok && [ "${VERSION_CODENAME:-}" = bookworm ]; then
  src=/etc/apt/sources.list.d/backports.sources
  if [ ! -f "$src" ] && ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
    # copy the first stanza of the machine's own Debian source and switch its suite
    awk 'BEGIN{RS="";ORS="\n\n"} NR==1' /etc/apt/sources.list.d/debian.sources \
      | sed 's/^Suites:.*/Suites: bookworm-backports/' | $SUDO tee "$src" >/dev/null
  fi
fi
$SUDO apt-get update -qq
export DEBIAN_FRONTEND=noninteractive
if ! mesa_ok; then
  if [ "${VERSION_CODENAME:-}" = bookworm ]; then
    $SUDO apt-get install -y -qq -t bookworm-backports mesa-vulkan-drivers libvulkan1 >/dev/null
  else
    $SUDO apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
  fi
fi
ffmpeg_ok || $SUDO apt-get install -y -qq ffmpeg >/dev/null
mesa_ok && ffmpeg_ok && echo "[system-deps] installed"
