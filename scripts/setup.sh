#!/usr/bin/env bash
# Installs every Debian package that Keel's build, tests, benchmarks and guest kit need.
# Idempotent: packages already present are skipped, so a second run takes well under a second.
set -euo pipefail

PACKAGES=(
  # build
  cmake ninja-build g++ clang pkg-config ccache
  nlohmann-json3-dev libcli11-dev libspdlog-dev libfmt-dev libexpected-dev
  zlib1g-dev libzstd-dev libsqlite3-dev libssl-dev libseccomp-dev libcap-ng-dev
  libgtest-dev libgmock-dev libext2fs-dev libpugixml-dev libcpp-httplib-dev
  libclang-rt-14-dev
  # peers and the guest kit
  qemu-system-x86 qemu-utils e2fsprogs dosfstools mtools busybox-static
  linux-image-amd64 cpio gdisk fdisk debootstrap
)

# Each component lists the extra packages its tests and benchmarks need in scripts/packages/*.txt
# (one name per line, # comments allowed).
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
for list in "$here"/packages/*.txt; do
  [[ -e "$list" ]] || continue
  while read -r line; do
    line="${line%%#*}"
    for word in $line; do PACKAGES+=("$word"); done
  done <"$list"
done

missing=()
for p in "${PACKAGES[@]}"; do
  # dpkg-query exits non-zero or prints something other than "install ok installed" when absent.
  if [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]]; then
    missing+=("$p")
  fi
done

if ((${#missing[@]} == 0)); then
  exit 0
fi

echo "setup: installing ${missing[*]}"
SUDO=""
if [[ $(id -u) != 0 ]]; then SUDO=sudo; fi
export DEBIAN_FRONTEND=noninteractive
# Only refresh the package lists when an install from the current lists fails.
if ! $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"; then
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
