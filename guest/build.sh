#!/usr/bin/env bash
# Builds Keel's guest kit from Debian's packages (see guest/README.md).
#
#   guest/build.sh [kit]   guest/out/vmlinuz + guest/out/initramfs.cpio.gz        (seconds)
#   guest/build.sh debian  the kit + guest/out/debian.qcow2 (Debian 12 minbase)  (minutes, cached)
#   guest/build.sh clean   removes guest/out (not the cache)
#
# Idempotent: each product carries a stamp holding a hash of everything it is made from (this script,
# the files it packs, the Debian package versions, the mirror); a product whose stamp matches is kept.
# Environment:
#   KEEL_GUEST_OUT     output directory                    (default: guest/out next to this script)
#   KEEL_CACHE_DIR     cache root; images go to <it>/guest (default: /var/cache/keel)
#   KEEL_GUEST_KVER    kernel release to use               (default: the one linux-image-amd64 depends on)
#   KEEL_DEBIAN_MIRROR Debian mirror for debootstrap       (default: the first bookworm one in apt's sources)
#   KEEL_DEBIAN_SIZE   size of the root partition          (default: 2G)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
script="$here/build.sh"
out="${KEEL_GUEST_OUT:-$here/out}"
cache="${KEEL_CACHE_DIR:-/var/cache/keel}/guest"

# What the initramfs loads, by module name ('-' and '_' are the same). Their dependencies (modules.dep)
# and pre-soft-dependencies (modules.softdep) are added by resolve_modules.
WANTED_MODULES=(
  virtio_pci virtio_mmio virtio_blk virtio_net virtio_rng virtio_console virtio_balloon
  vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport
  ext4 vfat nls_cp437 nls_ascii nls_utf8 nls_iso8859_1
  button evdev
)
DEBIAN_SUITE=bookworm
DEBIAN_INCLUDE=systemd-sysv,udev,kmod,iproute2,ifupdown,procps,less
DEBIAN_HOSTNAME=keel-debian

CLEANUP=()
cleanup() { local d; for d in "${CLEANUP[@]}"; do rm -rf "$d"; done; }
trap cleanup EXIT

die() { echo "guest/build.sh: $*" >&2; exit 1; }
log() { echo "guest/build.sh: $*" >&2; }
need() { command -v "$1" >/dev/null || die "$1 is missing (install: ${2:-$1}; see scripts/setup.sh)"; }
pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || die "package $1 is not installed"; }

kernel_release() {
  if [[ -n "${KEEL_GUEST_KVER:-}" ]]; then echo "$KEEL_GUEST_KVER"; return; fi
  local dep
  dep="$(dpkg-query -W -f='${Depends}' linux-image-amd64 2>/dev/null)" ||
    die "linux-image-amd64 is not installed"
  dep="${dep%% *}"            # linux-image-6.1.0-56-amd64 (= 6.1.192-2)
  dep="${dep#linux-image-}"
  [[ -n "$dep" ]] || die "cannot tell the kernel release from linux-image-amd64"
  echo "$dep"
}

# --- kernel modules ----------------------------------------------------------------------------------

declare -A MOD_PATH=()     # name -> path relative to /lib/modules/<kver>, from modules.dep
declare -A MOD_DEPS=()     # name -> its dependencies' paths
declare -A MOD_SOFTPRE=()  # name -> soft pre-dependencies (names or aliases)
declare -A MOD_BUILTIN=()  # name -> 1
declare -A MOD_DONE=()
MOD_ORDER=()
MOD_DIR=""

# Sets MODNAME to the module name of a path or name: no directory, no .ko*, '-' as '_'.
mod_name() { MODNAME="${1##*/}"; MODNAME="${MODNAME%%.ko*}"; MODNAME="${MODNAME//-/_}"; }

load_module_tables() {
  local line path deps word module rest
  MOD_DIR="$1"
  [[ -r "$MOD_DIR/modules.dep" ]] || die "$MOD_DIR/modules.dep is missing"
  while IFS= read -r line; do
    path="${line%%:*}"; deps="${line#*:}"
    mod_name "$path"
    MOD_PATH[$MODNAME]="$path"; MOD_DEPS[$MODNAME]="$deps"
  done <"$MOD_DIR/modules.dep"
  if [[ -r "$MOD_DIR/modules.builtin" ]]; then
    while IFS= read -r path; do mod_name "$path"; MOD_BUILTIN[$MODNAME]=1; done <"$MOD_DIR/modules.builtin"
  fi
  if [[ -r "$MOD_DIR/modules.softdep" ]]; then
    while read -r word module rest; do
      [[ "$word" == softdep ]] || continue
      rest=" $rest "
      [[ "$rest" == *" pre: "* ]] || continue
      rest="${rest#* pre: }"; rest="${rest%% post:*}"
      mod_name "$module"
      MOD_SOFTPRE[$MODNAME]+=" $rest"
    done <"$MOD_DIR/modules.softdep"
  fi
}

# Modules that provide an alias (e.g. crypto-crc32c -> crc32c_intel crc32c_generic).
alias_targets() {
  awk -v a="$1" '$1 == "alias" && $2 == a { print $3 }' "$MOD_DIR/modules.alias"
}

# Depth-first, dependencies before the module: the order in which insmod must load them.
resolve_module() {
  local name soft dep cand found
  mod_name "$1"; name="$MODNAME"
  [[ -z "${MOD_DONE[$name]:-}" ]] || return 0
  MOD_DONE[$name]=1
  [[ -z "${MOD_BUILTIN[$name]:-}" ]] || return 0
  [[ -n "${MOD_PATH[$name]:-}" ]] || die "kernel module $name not found in modules.dep or modules.builtin"
  for soft in ${MOD_SOFTPRE[$name]:-}; do
    found=0
    for cand in $soft $(alias_targets "$soft"); do
      mod_name "$cand"; cand="$MODNAME"
      if [[ -n "${MOD_PATH[$cand]:-}" || -n "${MOD_BUILTIN[$cand]:-}" ]]; then
        resolve_module "$cand"; found=1
      fi
    done
    ((found)) || log "note: soft dependency $soft of $name is not in this kernel; skipped"
  done
  for dep in ${MOD_DEPS[$name]}; do resolve_module "$dep"; done
  MOD_ORDER+=("${MOD_PATH[$name]}")
}

# Copies one module into the staging tree, uncompressed (busybox insmod then needs no decompressor).
stage_module() {
  local src="$1" dst="$2"
  mkdir -p "$(dirname "$dst")"
  case "$src" in
    *.ko) cp "$src" "$dst" ;;
    *.ko.xz) need xz xz-utils; xz -dc "$src" >"$dst" ;;
    *.ko.zst) need zstd; zstd -qdc "$src" >"$dst" ;;
    *.ko.gz) gzip -dc "$src" >"$dst" ;;
    *) die "unknown module format: $src" ;;
  esac
}

# Stages the resolved modules under <root>/lib/modules/<kver>, with keel-load-order and a modules.dep
# of their own (depmod) so busybox modprobe can load more on demand (e.g. nls_* for vfat mounts).
stage_modules() {
  local root="$1" kver="$2" src="/lib/modules/$2" path dst
  MOD_PATH=(); MOD_DEPS=(); MOD_SOFTPRE=(); MOD_BUILTIN=(); MOD_DONE=(); MOD_ORDER=()
  load_module_tables "$src"
  for m in "${WANTED_MODULES[@]}"; do resolve_module "$m"; done
  mkdir -p "$root/lib/modules/$kver"
  : >"$root/lib/modules/$kver/keel-load-order"
  for path in "${MOD_ORDER[@]}"; do
    dst="${path%%.ko*}.ko"
    stage_module "$src/$path" "$root/lib/modules/$kver/$dst"
    echo "$dst" >>"$root/lib/modules/$kver/keel-load-order"
  done
  for f in modules.builtin modules.builtin.modinfo modules.order; do
    [[ ! -e "$src/$f" ]] || cp "$src/$f" "$root/lib/modules/$kver/"
  done
  depmod -b "$root" "$kver"
}

# --- the kit: vmlinuz + initramfs -------------------------------------------------------------------

kit_inputs_hash() {
  local kver="$1"
  {
    sha256sum "$script" "$here"/initramfs/*
    echo "kernel $kver $(pkg_version "linux-image-$kver")"
    echo "busybox $(pkg_version busybox-static)"
  } | sha256sum | cut -c1-16
}

build_kit() {
  need busybox busybox-static; need cpio; need depmod kmod; need flock util-linux
  local kver hash stamp tmp
  kver="$(kernel_release)"
  [[ -r "/boot/vmlinuz-$kver" ]] || die "/boot/vmlinuz-$kver is missing or unreadable (linux-image-$kver)"
  [[ -d "/lib/modules/$kver" ]] || die "/lib/modules/$kver is missing"
  hash="$(kit_inputs_hash "$kver")"
  stamp="$out/.kit.stamp"
  if [[ -f "$out/vmlinuz" && -f "$out/initramfs.cpio.gz" && "$(cat "$stamp" 2>/dev/null)" == "$hash" ]]; then
    log "kit up to date ($kver, inputs $hash)"
    return 0
  fi
  log "building the kit: kernel $kver, inputs $hash"
  tmp="$(mktemp -d "$out/.kit.XXXXXX")"
  CLEANUP+=("$tmp")
  local root="$tmp/root"
  mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc/acpi/PWRF,proc,sys,dev,run,tmp,root,var/log,newroot}

  cp /bin/busybox "$root/bin/busybox"
  local applet
  while IFS= read -r applet; do
    [[ "$applet" == */* ]] || continue
    [[ -e "$root/$applet" ]] || ln -s /bin/busybox "$root/$applet"
  done < <(/bin/busybox --list-full)

  install -m 0755 "$here/initramfs/init" "$root/init"
  install -m 0755 "$here/initramfs/keel-poweroff" "$root/sbin/keel-poweroff"
  install -m 0755 "$here/initramfs/acpi-power-button" "$root/etc/acpi/PWRF/00000080"
  install -m 0755 "$here/initramfs/udhcpc.script" "$root/etc/udhcpc.script"
  printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
  printf 'root:x:0:\ntty:x:5:\n' >"$root/etc/group"
  printf 'export PS1='\''\\h:\\w# '\''\nexport PATH=/sbin:/bin:/usr/sbin:/usr/bin\n' >"$root/etc/profile"
  # The kernel opens /dev/console before /init runs; /init reopens it after mounting devtmpfs anyway.
  mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || log "note: cannot mknod /dev/console (not root)"

  stage_modules "$root" "$kver"

  # Reproducible archive: fixed timestamps and owners, sorted names.
  find "$root" -exec touch -h -d @0 {} +
  (cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
    cpio --quiet -o -H newc -R 0:0 --reproducible) | gzip -9n >"$tmp/initramfs.cpio.gz"
  cp "/boot/vmlinuz-$kver" "$tmp/vmlinuz"
  mv -f "$tmp/vmlinuz" "$out/vmlinuz"
  mv -f "$tmp/initramfs.cpio.gz" "$out/initramfs.cpio.gz"
  cp "$root/lib/modules/$kver/keel-load-order" "$out/modules.txt"
  echo "$kver" >"$out/kernel-release"
  echo "$hash" >"$stamp"
  log "kit ready: $out/vmlinuz, $out/initramfs.cpio.gz ($(du -k "$out/initramfs.cpio.gz" | cut -f1) KiB, ${#MOD_ORDER[@]} modules)"
}

# --- Debian 12 disk image ----------------------------------------------------------------------------

# The Debian mirror apt uses here: deb822 .sources files and one-line .list files.
find_debian_mirror() {
  if [[ -n "${KEEL_DEBIAN_MIRROR:-}" ]]; then echo "$KEEL_DEBIAN_MIRROR"; return; fi
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -r "$f" ]] || continue
    uri="$(awk -v suite="$DEBIAN_SUITE" '
      function flush() { if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && uris != "") { split(uris, u, " "); print u[1]; found = 1; exit } types = suites = uris = "" }
      /^[ \t]*$/ { flush(); next }
      /^Types:/ { sub(/^Types:[ \t]*/, ""); types = $0 }
      /^Suites:/ { sub(/^Suites:[ \t]*/, ""); suites = $0 }
      /^URIs:/ { sub(/^URIs:[ \t]*/, ""); uris = $0 }
      END { if (!found) flush() }' "$f")"
    [[ -z "$uri" ]] || { echo "$uri"; return; }
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -r "$f" ]] || continue
    uri="$(awk -v suite="$DEBIAN_SUITE" '$1 == "deb" {
      i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
      if ($(i + 1) == suite) { print $i; exit } }' "$f")"
    [[ -z "$uri" ]] || { echo "$uri"; return; }
  done
  die "no '$DEBIAN_SUITE' mirror in /etc/apt/sources.list*; set KEEL_DEBIAN_MIRROR"
}

debian_inputs_hash() {
  local kver="$1" mirror="$2"
  {
    sha256sum "$script" "$here"/initramfs/*
    echo "kernel $kver $(pkg_version "linux-image-$kver")"
    echo "debootstrap $(pkg_version debootstrap)"
    echo "mirror $mirror suite $DEBIAN_SUITE include $DEBIAN_INCLUDE size ${KEEL_DEBIAN_SIZE:-2G}"
  } | sha256sum | cut -c1-16
}

# A UUID made from the inputs hash and a purpose, so rebuilding the same inputs gives the same ids.
uuid_from() {
  local h; h="$(echo "$1" | sha256sum)"
  echo "${h:0:8}-${h:8:4}-4${h:13:3}-8${h:17:3}-${h:20:12}"
}

make_debian_image() {
  local kver="$1" mirror="$2" hash="$3" image="$4"
  [[ $(id -u) == 0 ]] || die "debootstrap needs root to build the Debian image"
  need debootstrap; need mke2fs e2fsprogs; need sgdisk gdisk; need qemu-img qemu-utils
  local work root fs_uuid part_uuid disk_uuid machine_id size_mib
  work="$(mktemp -d "$cache/.work.XXXXXX")"
  CLEANUP+=("$work")
  root="$work/root"
  mkdir -p "$cache/debs"
  log "debootstrap $DEBIAN_SUITE (minbase + $DEBIAN_INCLUDE) from $mirror"
  debootstrap --variant=minbase --arch=amd64 --include="$DEBIAN_INCLUDE" --cache-dir="$cache/debs" \
    "$DEBIAN_SUITE" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 ||
    { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap failed"; }

  fs_uuid="$(uuid_from "$hash fs")"; part_uuid="$(uuid_from "$hash part")"
  disk_uuid="$(uuid_from "$hash disk")"; machine_id="$(echo "$hash machine-id" | sha256sum | cut -c1-32)"

  echo "$DEBIAN_HOSTNAME" >"$root/etc/hostname"
  printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' \
    "$DEBIAN_HOSTNAME" >"$root/etc/hosts"
  echo "$machine_id" >"$root/etc/machine-id"
  printf '# <file system>\t<mount point>\t<type>\t<options>\t<dump>\t<pass>\nUUID=%s\t/\text4\terrors=remount-ro\t0\t1\n' \
    "$fs_uuid" >"$root/etc/fstab"
  # A login prompt on the serial console (systemd would also add one for console=ttyS0 by itself).
  mkdir -p "$root/etc/systemd/system/getty.target.wants"
  ln -sf /lib/systemd/system/serial-getty@.service \
    "$root/etc/systemd/system/getty.target.wants/serial-getty@ttyS0.service"
  # DHCP on the first NIC, so the image is reachable when booted on a network.
  printf 'auto lo\niface lo inet loopback\n\nallow-hotplug eth0\niface eth0 inet dhcp\n' \
    >"$root/etc/network/interfaces"
  # A test image: root logs in on the console without a password.
  chroot "$root" passwd -d root >/dev/null
  # The modules the kit's initramfs loads, so udev in the image finds them too (same kernel).
  local modroot="$root"
  [[ ! -L "$root/lib" ]] || modroot="$root/usr"
  mkdir -p "$work/mods"
  stage_modules "$work/mods" "$kver"
  mkdir -p "$modroot/lib/modules"
  cp -a "$work/mods/lib/modules/$kver" "$modroot/lib/modules/"
  depmod -b "$root" "$kver"
  # Downloaded packages and index files are not part of the system; dpkg's database stays intact.
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/bootstrap.log

  local used_mib
  used_mib=$(du -sm "$root" | cut -f1)
  size_mib=$(numfmt --from=iec "${KEEL_DEBIAN_SIZE:-2G}")
  size_mib=$((size_mib / 1048576))
  ((size_mib > used_mib * 3 / 2)) || die "KEEL_DEBIAN_SIZE too small: the root tree is ${used_mib} MiB"
  log "root tree ${used_mib} MiB; making a ${size_mib} MiB ext4 partition"
  # ext4 straight from the directory tree: nothing is mounted.
  mke2fs -q -t ext4 -L keel-root -U "$fs_uuid" -E lazy_itable_init=0,lazy_journal_init=0 \
    -d "$root" "$work/part.img" "${size_mib}M"
  # GPT disk: 1 MiB before the partition, 1 MiB after it for the backup table.
  local disk="$work/disk.img"
  truncate -s $(((size_mib + 2) * 1048576)) "$disk"
  sgdisk --clear -U "$disk_uuid" -n "1:2048:+${size_mib}M" -t 1:8300 -c 1:keel-root -u "1:$part_uuid" \
    "$disk" >/dev/null
  dd if="$work/part.img" of="$disk" bs=1M seek=1 conv=notrunc,sparse status=none
  qemu-img convert -f raw -O qcow2 "$disk" "$work/debian.qcow2"
  mv -f "$work/debian.qcow2" "$image"
  log "image cached: $image ($(du -m "$image" | cut -f1) MiB allocated)"
}

build_debian() {
  local kver mirror hash image stamp
  kver="$(kernel_release)"
  mirror="$(find_debian_mirror)"
  hash="$(debian_inputs_hash "$kver" "$mirror")"
  image="$cache/debian-$hash.qcow2"
  stamp="$out/.debian.stamp"
  if [[ -f "$out/debian.qcow2" && "$(cat "$stamp" 2>/dev/null)" == "$hash" && -f "$image" ]]; then
    log "debian.qcow2 up to date (inputs $hash)"
    return 0
  fi
  mkdir -p "$cache"
  exec 8>"$cache/.lock"
  flock 8
  if [[ ! -f "$image" ]]; then
    make_debian_image "$kver" "$mirror" "$hash" "$image"
  else
    log "using cached $image"
  fi
  # A copy, not a link: booting guest/out/debian.qcow2 writable must not change the cached image.
  cp --reflink=auto --sparse=always "$image" "$out/.debian.qcow2.tmp"
  mv -f "$out/.debian.qcow2.tmp" "$out/debian.qcow2"
  echo "$hash" >"$stamp"
  log "debian ready: $out/debian.qcow2"
}

main() {
  local what="${1:-kit}"
  case "$what" in
    kit | debian) ;;
    clean) rm -rf "$out"; return 0 ;;
    -h | --help) sed -n '2,16p' "$script" | sed 's/^# \{0,1\}//'; return 0 ;;
    *) die "unknown target '$what' (kit, debian, clean)" ;;
  esac
  mkdir -p "$out"
  exec 9>"$out/.lock"
  flock 9
  build_kit
  [[ "$what" != debian ]] || build_debian
}

main "$@"
