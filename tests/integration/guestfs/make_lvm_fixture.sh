#!/usr/bin/env bash
# Regenerates fixtures/lvm-pv-head.bin.gz: the first MiB (label + metadata area) of a 64 MiB LVM2
# physical volume written by the real `lvm` tools, and fixtures/lvm-layout.txt (where each LV's
# segments lie). LVM cannot write to a plain file, so this needs a loop device and root; the
# kernel here has no device-mapper, so the LVs are created without being activated
# (--driverloaded n). The tests then rebuild the PV from the fixture without loop devices.
#
# Volume group "testvg": root (24 MiB in two segments: created at 20 MiB, then a 4 MiB LV "home"
# after it, then extended by 4 MiB), home (12 MiB), more (8 MiB).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
truncate -s 64M "$work/pv.img"
loop="$(losetup -f --show "$work/pv.img")"
trap 'losetup -d "$loop" 2>/dev/null || true; rm -rf "$work"' EXIT
C='devices{obtain_device_list_from_udev=0} activation{udev_sync=0 udev_rules=0}'
lvm_() { "$@" --config "$C" >/dev/null 2>&1; }
lvm_ pvcreate -y "$loop"
lvm_ vgcreate testvg "$loop"
lvm_ lvcreate --driverloaded n -an -Zn -L 20M -n root testvg
lvm_ lvcreate --driverloaded n -an -Zn -L 12M -n home testvg
lvm_ lvcreate --driverloaded n -an -Zn -L 8M -n more testvg
lvm_ lvextend --driverloaded n -L +4M testvg/root
pe_start=$(pvs --config "$C" --noheadings --units b --nosuffix -o pe_start "$loop" | tr -d ' ')
extent=$(vgs --config "$C" --noheadings --units b --nosuffix -o vg_extent_size testvg | tr -d ' ')
# lines: LV  LV-start-extent  extent-count  PV-start-extent
lvs --config "$C" --noheadings --segments -o lv_name,seg_start_pe,seg_size_pe,seg_pe_ranges testvg |
  awk -v pe="$pe_start" -v ext="$extent" '{split($4, r, ":"); split(r[2], a, "-");
       print $1, $2, $3, a[1], pe, ext}' >"$here/fixtures/lvm-layout.txt"
vgchange --config "$C" -an testvg >/dev/null 2>&1 || true
losetup -d "$loop"
trap 'rm -rf "$work"' EXIT
head -c 1M "$work/pv.img" | gzip -9n >"$here/fixtures/lvm-pv-head.bin.gz"
cat "$here/fixtures/lvm-layout.txt"
