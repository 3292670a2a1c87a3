#!/usr/bin/env bash
# Builds the test images for keel-fish with real tools and no mounting:
#   gpt.raw     GPT (sgdisk): 1 ext4 "ROOTFS" (the tree), 2 FAT32 "EFIPART" (the FAT tree), 3 ext2 "DATA"
#   mbr.raw     MBR (sfdisk) with an extended partition: 1 ext3, 5 ext4, 6 FAT16, 7 FAT12
#   lvm.raw     MBR, 1 = LVM2 PV (from fixtures/, written by lvm): testvg/root ext4 (two
#               segments, the tree), testvg/home ext2, testvg/more FAT16
#   debian.raw  a Debian-12-like guest for inspection and sysprep: 1 /boot ext2, 2 / ext4
# and the source trees they were made from (tree/, fattree/, debtree/).
# Usage: make_images.sh OUTDIR
set -euo pipefail
out="$1"
here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$out"
cd "$out"
rm -rf tree fattree debtree parts
mkdir parts
export SOURCE_DATE_EPOCH=1700000000  # same timestamps every run

# ---- the source trees -------------------------------------------------------------------------------
make_tree() {
  local t="$1" symlinks="$2"
  mkdir -p "$t/etc/conf.d" "$t/usr/share/doc/pkg" "$t/var/empty" "$t/deep/a/b/c/d/e/f/g" "$t/Mixed Case Dir"
  printf 'hello, guest\n' >"$t/etc/motd"
  printf 'keel-test\n' >"$t/etc/hostname"
  : >"$t/etc/empty-file"
  head -c 4095 /dev/urandom >"$t/usr/share/doc/pkg/size-4095"
  head -c 4096 /dev/urandom >"$t/usr/share/doc/pkg/size-4096"
  head -c 1 /dev/urandom >"$t/usr/share/doc/pkg/size-1"
  head -c 300000 /dev/urandom >"$t/usr/share/doc/pkg/big.bin"
  head -c 2500000 /dev/urandom >"$t/usr/share/doc/pkg/bigger.bin"
  for i in $(seq 1 60); do printf 'conf %d\n' "$i" >"$t/etc/conf.d/setting-with-a-long-name-$i.conf"; done
  printf 'deep\n' >"$t/deep/a/b/c/d/e/f/g/leaf.txt"
  printf 'spaces\n' >"$t/Mixed Case Dir/File With Spaces.TXT"
  printf 'unicode\n' >"$t/etc/café-naïve.txt"
  printf 'upper\n' >"$t/UPPER.TXT"
  if [[ "$symlinks" == yes ]]; then
    chmod 0600 "$t/etc/motd"
    chmod 4755 "$t/usr/share/doc/pkg/size-1"
    chmod 0750 "$t/etc/conf.d"
    ln -s ../etc/motd "$t/usr/motd-link"
    ln -s /etc/hostname "$t/etc/abs-link"
    ln -s does-not-exist "$t/etc/dangling"
    ln -s "$(printf 'x%.0s' $(seq 1 200))" "$t/etc/long-link"
    mkfifo "$t/var/fifo" 2>/dev/null || true
  fi
}
make_tree tree yes
make_tree fattree no
find tree fattree -exec touch -h -d @$SOURCE_DATE_EPOCH {} +

mkext() {  # mkext FILE SIZE_MIB TYPE LABEL TREE [UUID]
  local uuid_opt=()
  [[ -n "${6:-}" ]] && uuid_opt=(-U "$6")
  truncate -s "$2M" "$1"
  mke2fs -q -F -t "$3" -L "$4" "${uuid_opt[@]}" -E root_owner=0:0 -d "$5" "$1" >/dev/null
}
mkfat() {  # mkfat FILE SIZE_MIB BITS LABEL TREE
  truncate -s "$2M" "$1"
  local spc=1
  [[ "$3" == 12 ]] && spc=4  # FAT12 allows fewer than 4085 clusters
  mkfs.fat -F "$3" -s "$spc" -n "$4" -i 1234ABCD "$1" >/dev/null
  if [[ -n "$5" ]]; then
    (cd "$5" && mcopy -s -p -m -i "$1" ./* ::/)
  fi
}
place() {  # place PART_FILE DISK START_SECTOR
  dd if="$1" of="$2" bs=512 seek="$3" conv=notrunc,sparse status=none
}

# ---- GPT --------------------------------------------------------------------------------------------
rm -f gpt.raw && truncate -s 160M gpt.raw
sgdisk -n 1:2048:+64M -t 1:8300 -c 1:rootfs -n 2:0:+40M -t 2:ef00 -c 2:"EFI system" \
  -n 3:0:+16M -t 3:8300 -c 3:data gpt.raw >/dev/null
start() { sgdisk -i "$2" "$1" | awk '/First sector/ {print $3}'; }
mkext parts/g1 64 ext4 ROOTFS tree 6c1a7d0e-1111-4a4a-9b9b-000000000001
mkfat "$out/parts/g2" 40 32 EFIPART fattree
mkdir -p parts/datatree && printf 'data\n' >parts/datatree/data.txt
mkext parts/g3 16 ext2 DATA parts/datatree
place parts/g1 gpt.raw "$(start gpt.raw 1)"
place parts/g2 gpt.raw "$(start gpt.raw 2)"
place parts/g3 gpt.raw "$(start gpt.raw 3)"

# ---- MBR with logical partitions ----------------------------------------------------------------------
rm -f mbr.raw && truncate -s 96M mbr.raw
sfdisk -q mbr.raw >/dev/null <<'SF'
label: dos
label-id: 0x4b45454c
start=2048, size=40960, type=83, bootable
start=43008, type=5
start=45056, size=40960, type=83
start=88064, size=40960, type=6
start=131072, size=8192, type=1
SF
mkext parts/m1 20 ext3 MBR1 parts/datatree
mkext parts/m5 20 ext4 LOGICAL5 tree
mkfat "$out/parts/m6" 20 16 FAT16VOL fattree
mkdir -p parts/small && printf 'fat12\n' >parts/small/f12.txt
mkfat "$out/parts/m7" 4 12 FAT12VOL parts/small
place parts/m1 mbr.raw 2048
place parts/m5 mbr.raw 45056
place parts/m6 mbr.raw 88064
place parts/m7 mbr.raw 131072

# ---- LVM ----------------------------------------------------------------------------------------------
rm -f lvm.raw && truncate -s 70M lvm.raw
printf 'label: dos\nstart=2048, size=131072, type=8e\n' | sfdisk -q lvm.raw >/dev/null
truncate -s 64M parts/pv
gzip -dc "$here/fixtures/lvm-pv-head.bin.gz" | dd of=parts/pv conv=notrunc status=none
mkext parts/lv-root 24 ext4 LVROOT tree
mkext parts/lv-home 12 ext2 LVHOME parts/datatree
mkfat "$out/parts/lv-more" 8 16 LVMORE parts/small
# fixtures/lvm-layout.txt: LV LV-start-extent extent-count PV-start-extent pe_start(bytes) extent(bytes)
while read -r lv lv_start count pv_start pe_start extent; do
  mib=$((1024 * 1024))  # pe_start and the extent size are whole MiB
  dd if="parts/lv-$lv" of=parts/pv bs=1M skip="$((lv_start * extent / mib))" count="$((count * extent / mib))" \
    seek="$(((pe_start + pv_start * extent) / mib))" conv=notrunc status=none
done <"$here/fixtures/lvm-layout.txt"
place parts/pv lvm.raw 2048

# ---- a Debian-like guest ------------------------------------------------------------------------------
d=debtree
mkdir -p $d/etc/ssh $d/etc/apt $d/bin $d/usr/bin $d/usr/lib $d/var/lib/dpkg $d/var/log/apt $d/var/lib/dhcp \
  $d/root $d/home/user $d/tmp $d/var/tmp $d/boot $d/var/cache/apt/archives $d/etc/udev/rules.d
cat >$d/usr/lib/os-release <<'OS'
PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
HOME_URL="https://www.debian.org/"
OS
ln -s ../usr/lib/os-release $d/etc/os-release
printf '12.5\n' >$d/etc/debian_version
printf 'keel-debian\n' >$d/etc/hostname
printf '127.0.0.1\tlocalhost\n127.0.1.1\tkeel-debian\n' >$d/etc/hosts
printf '0123456789abcdef0123456789abcdef\n' >$d/etc/machine-id
cat >$d/etc/fstab <<'FS'
# /etc/fstab: static file system information.
UUID=6c1a7d0e-2222-4a4a-9b9b-000000000002 /     ext4 errors=remount-ro 0 1
UUID=6c1a7d0e-3333-4a4a-9b9b-000000000003 /boot ext2 defaults          0 2
/dev/sr0 /media/cdrom0 udf,iso9660 user,noauto 0 0
proc /proc proc defaults 0 0
FS
printf 'root:*:19000:0:99999:7:::\nuser:!:19000:0:99999:7:::\n' >$d/etc/shadow
chmod 0640 $d/etc/shadow
for k in rsa ecdsa ed25519; do
  printf 'PRIVATE %s\n' $k >$d/etc/ssh/ssh_host_${k}_key
  printf 'PUBLIC %s\n' $k >$d/etc/ssh/ssh_host_${k}_key.pub
done
printf 'Port 22\n' >$d/etc/ssh/sshd_config
cp /bin/ls $d/bin/ls
cp /bin/ls $d/usr/bin/ls
printf 'syslog line\n' >$d/var/log/syslog
printf 'old\n' >$d/var/log/syslog.1
printf 'history\n' >$d/var/log/apt/history.log
printf 'lease {}\n' >$d/var/lib/dhcp/dhclient.eth0.leases
printf 'ls\nexit\n' >$d/root/.bash_history
printf 'ls\n' >$d/home/user/.bash_history
printf 'junk\n' >$d/tmp/junk
printf 'deb\n' >$d/var/cache/apt/archives/foo_1.0_amd64.deb
printf 'rule\n' >$d/etc/udev/rules.d/70-persistent-net.rules
# The package list: the first 25 installed packages of this machine's own (real) dpkg database.
awk 'BEGIN {RS=""; ORS="\n\n"} /Status: install ok installed/ {print; if (++n == 25) exit}' \
  /var/lib/dpkg/status >$d/var/lib/dpkg/status
mkdir -p parts/boottree
head -c 70000 /dev/urandom >parts/boottree/vmlinuz-6.1.0-13-amd64
head -c 60000 /dev/urandom >parts/boottree/vmlinuz-6.1.0-10-amd64
head -c 50000 /dev/urandom >parts/boottree/initrd.img-6.1.0-13-amd64
rm -f debian.raw && truncate -s 112M debian.raw
printf 'label: dos\nstart=2048, size=65536, type=83, bootable\nstart=67584, size=161792, type=83\n' |
  sfdisk -q debian.raw >/dev/null
mkext parts/d1 32 ext2 boot parts/boottree 6c1a7d0e-3333-4a4a-9b9b-000000000003
mkext parts/d2 79 ext4 debroot debtree 6c1a7d0e-2222-4a4a-9b9b-000000000002
place parts/d1 debian.raw 2048
place parts/d2 debian.raw 67584
rm -rf parts
echo "images ready in $out"
