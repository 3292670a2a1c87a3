#!/usr/bin/env bash
# Keel's main job, for `make demo`. When keeld is built, hands over to its demo (start keeld with
# embedded state, define and boot a demo VM, attach to its console). Before that lands, boots the
# guest kit straight under QEMU with its serial console on this terminal.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${1:-build}"
[[ "$build" = /* ]] || build="$root/$build"

if [[ -x "$build/src/hostd/keeld" && -f "$root/src/hostd/demo.sh" ]]; then
  KEEL_BUILD="$build" exec bash "$root/src/hostd/demo.sh"
fi

accel=$("$build/src/qemu/keel-accel")
echo "Booting the Keel guest kit under QEMU (accelerator: $accel)."
echo "The guest's shell appears on this terminal. To quit: type 'poweroff', or press Ctrl-A then X."
exec qemu-system-x86_64 -accel "$accel" -machine q35 -bios /usr/share/qemu/qboot.rom -nodefaults \
  -m 256 -smp 1 -no-reboot -nographic -serial mon:stdio \
  -kernel "$root/guest/out/vmlinuz" -initrd "$root/guest/out/initramfs.cpio.gz" \
  -append "console=ttyS0 quiet keel.hostname=keel-demo"
