#!/usr/bin/env bash
# Keel demo: starts keeld with its state in a temporary directory, defines and boots a small VM from
# the guest kit, and attaches to its serial console. Leave the console with Ctrl+] ; the script then
# destroys the VM and stops keeld (state is removed unless KEEL_DEMO_KEEP=1).
#
#   src/hostd/demo.sh            (after building keeld and keel into ./build, e.g. `make`)
# Environment: KEEL_BUILD (default ./build), KEEL_DEMO_DIR (default a new /tmp/keel-demo.XXXX).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build="${KEEL_BUILD:-$root/build}"
keeld="$build/src/hostd/keeld"
keel="$build/src/cli/keel"
for b in "$keeld" "$keel"; do
  [[ -x "$b" ]] || { echo "demo: $b is missing; build first (ninja -C build keeld keel)" >&2; exit 1; }
done

"$root/guest/build.sh" kit >/dev/null
kit="${KEEL_GUEST_OUT:-$root/guest/out}"

dir="${KEEL_DEMO_DIR:-$(mktemp -d /tmp/keel-demo.XXXX)}"
chmod 711 "$dir"
export KEEL_CONNECT="unix:$dir/keeld.sock"
"$keeld" --state-dir "$dir/state" --socket "$dir/keeld.sock" >"$dir/keeld.log" 2>&1 &
keeld_pid=$!
cleanup() {
  "$keel" destroy demo >/dev/null 2>&1 || true
  kill "$keeld_pid" 2>/dev/null || true
  wait "$keeld_pid" 2>/dev/null || true
  if [[ "${KEEL_DEMO_KEEP:-0}" != 1 ]]; then rm -rf "$dir"; else echo "demo: state kept in $dir"; fi
}
trap cleanup EXIT

for _ in $(seq 100); do "$keel" list >/dev/null 2>&1 && break; sleep 0.05; done

cat >"$dir/demo.json" <<JSON
{
  "name": "demo",
  "memory": "256M",
  "vcpus": 1,
  "boot": {
    "kernel": "$kit/vmlinuz",
    "initrd": "$kit/initramfs.cpio.gz",
    "cmdline": "console=ttyS0 quiet",
    "firmware": "qboot"
  },
  "nics": [{"type": "user"}],
  "rng": true
}
JSON
"$keel" define "$dir/demo.json"
"$keel" start demo
"$keel" list
cat <<MSG

keeld is running with its state in $dir (log: $dir/keeld.log).
The VM 'demo' boots a busybox shell on its serial console (TCG: about 5 s).
  - leave the console:      Ctrl+]   (the script then destroys the VM and stops keeld)
  - power the guest off:    type 'poweroff' or, from another shell,
                            KEEL_CONNECT=$KEEL_CONNECT $keel shutdown demo
  - look around:            KEEL_CONNECT=$KEEL_CONNECT $keel dominfo demo

MSG
"$keel" console demo || true
