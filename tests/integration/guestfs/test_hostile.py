"""Hostile images give clear errors, never a crash or a hang: a bad superblock, a directory that
loops back to its ancestor, extents beyond the filesystem, cross-linked and looping FAT chains,
corrupt GPT headers, an EBR chain that loops, garbage LVM metadata."""
import os
import shutil
import struct
import subprocess
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fishtest import *  # noqa: E402,F401,F403

work = tmpdir()
tree = os.path.join(work, "tree")
os.makedirs(os.path.join(tree, "a/b"))
with open(os.path.join(tree, "a/file.txt"), "w") as f:
    f.write("file\n")
with open(os.path.join(tree, "big.bin"), "wb") as f:
    f.write(os.urandom(200000))


def fish_bounded(*args):
    p = subprocess.run([keel_fish(), *args], capture_output=True, timeout=60)
    return p


def clean_failure(p, what, message=None):
    err = p.stderr.decode(errors="replace").strip()
    good = p.returncode == 1 and err.startswith("keel-fish") and (message is None or message in err)
    check(good, f"{what}: exit {p.returncode}, '{err[:160]}'")


def ext_image(name, fstype="ext4"):
    path = os.path.join(work, name)
    run(["truncate", "-s", "16M", path])
    run(["mke2fs", "-q", "-F", "-t", fstype, "-d", tree, path])
    return path


# A bad superblock: zero blocks per group.
img = ext_image("badsb.img")
with open(img, "r+b") as f:
    f.seek(1024 + 32)
    f.write(struct.pack("<I", 0))
p = fish_bounded("--ro", "-a", img, "-m", "/dev/sda", "ls", "/")
clean_failure(p, "bad superblock")

# A directory hard-linked into its own subdirectory: ls -R and find stop with an error.
img = ext_image("loop.img")
run(["debugfs", "-w", "-R", "link /a /a/b/loop", img])
p = fish_bounded("ls", "--ro", "-a", img, "-m", "/dev/sda", "-R", "/")
clean_failure(p, "looping directories (ls -R)", "nest too deeply")
p = fish_bounded("--ro", "-a", img, "-m", "/dev/sda", "find", "/")
clean_failure(p, "looping directories (find)", "nest too deeply")
p = fish_bounded("-a", img, "-m", "/dev/sda", "rm-rf", "/a")
clean_failure(p, "looping directories (rm-rf)")

# An extent that points far beyond the end of the filesystem.
img = ext_image("extent.img")
run(["debugfs", "-w", "-R", "sif /big.bin block[5] 0x7ffffff0", img])  # first extent start_lo
p = fish_bounded("cat", "--ro", "-a", img, "-m", "/dev/sda", "/big.bin")
clean_failure(p, "extent beyond the filesystem")
# ... and a file claiming an absurd size through a huge extent length.
img = ext_image("hugeext.img", "ext4")
run(["debugfs", "-w", "-R", "sif /big.bin block[4] 0x00007fff", img])  # first extent length
run(["debugfs", "-w", "-R", "sif /big.bin size 0x7fffffffff", img])
p = fish_bounded("--ro", "-a", img, "-m", "/dev/sda", "stat", "/big.bin", ":", "head", "/big.bin")
check(p.returncode in (0, 1) and p.returncode >= 0, f"huge extent: no crash (exit {p.returncode})")

# FAT: two files cross-linked to the same clusters; a chain that loops.
fat = os.path.join(work, "fat.img")
run(["truncate", "-s", "8M", fat])
run(["mkfs.fat", "-F", "16", "-s", "1", "-n", "HOSTILE", fat])
for name, size in [("ONE.BIN", 5000), ("TWO.BIN", 5000)]:
    local = os.path.join(work, name)
    with open(local, "wb") as f:
        f.write(os.urandom(size))
    run(["mcopy", "-i", fat, local, "::/" + name])
# Boot sector geometry, to find the root directory and the FAT.
with open(fat, "rb") as f:
    boot = f.read(512)
bps, spc, reserved, nfats, root_entries, _, _, fat_sectors = struct.unpack_from("<HBHBHHBH", boot, 11)
root_at = (reserved + nfats * fat_sectors) * bps
with open(fat, "r+b") as f:
    f.seek(root_at)
    root = bytearray(f.read(root_entries * 32))
    slots = {bytes(root[i:i + 11]): i for i in range(0, len(root), 32)}
    one, two = slots[b"ONE     BIN"], slots[b"TWO     BIN"]
    first_one = struct.unpack_from("<H", root, one + 26)[0]
    struct.pack_into("<H", root, two + 26, first_one)  # TWO now shares ONE's chain
    f.seek(root_at)
    f.write(root)
p = fish_bounded("--ro", "-a", fat, "-m", "/dev/sda", "cat", "/TWO.BIN")
check(p.returncode == 0 and len(p.stdout) == 5000, "cross-linked FAT: reading still works")
p = fish_bounded("-a", fat, "-m", "/dev/sda", "rm", "/TWO.BIN")
clean_failure(p, "cross-linked FAT: writing is refused", "cross-linked")
with open(fat, "r+b") as f:
    # ONE's chain: make its last cluster point back to its first.
    f.seek(reserved * bps)
    table = bytearray(f.read(fat_sectors * bps))
    c = first_one
    while struct.unpack_from("<H", table, 2 * c)[0] < 0xfff8:
        c = struct.unpack_from("<H", table, 2 * c)[0]
    struct.pack_into("<H", table, 2 * c, first_one)
    f.seek(reserved * bps)
    f.write(table)
p = fish_bounded("--ro", "-a", fat, "-m", "/dev/sda", "cat", "/ONE.BIN")
check(p.returncode == 0 and len(p.stdout) == 5000, "looping FAT chain: the file's own clusters still read")
with open(fat, "r+b") as f:
    f.seek(root_at)
    root = bytearray(f.read(root_entries * 32))
    struct.pack_into("<I", root, one + 28, 50000)  # claims more than its (looping) chain
    f.seek(root_at)
    f.write(root)
p = fish_bounded("--ro", "-a", fat, "-m", "/dev/sda", "cat", "/ONE.BIN")
clean_failure(p, "looping FAT chain", "loops")

# GPT with both headers corrupt.
disk = os.path.join(work, "gpt.img")
run(["truncate", "-s", "8M", disk])
run(["sgdisk", "-n", "1:2048:0", disk])
with open(disk, "r+b") as f:
    for lba in (1, 8 * 2048 - 1):
        f.seek(lba * 512 + 16)
        f.write(b"\xde\xad\xbe\xef")
p = fish_bounded("--ro", "-a", disk, "list-partitions")
check(p.returncode == 0 and p.stdout == b"" , "corrupt GPT: no partitions, no crash")
p = fish_bounded("--ro", "-a", disk, "part-list", "/dev/sda")
clean_failure(p, "corrupt GPT: part-list says why", "neither GPT header is valid")
# Only the primary corrupt: the backup is used.
run(["sgdisk", "-Z", disk])
run(["sgdisk", "-n", "1:2048:0", disk])
with open(disk, "r+b") as f:
    f.seek(512 + 16)
    f.write(b"\xde\xad\xbe\xef")
p = fish_bounded("--ro", "-a", disk, "list-partitions")
check(p.stdout == b"/dev/sda1\n", "GPT with a corrupt primary header: the backup is used")

# An EBR that links to itself.
disk = os.path.join(work, "ebr.img")
run(["truncate", "-s", "8M", disk])
run(["sfdisk", "-q", disk], input=b"label: dos\nstart=2048, type=5\nstart=4096, size=2048, type=83\n")
with open(disk, "r+b") as f:
    f.seek(2048 * 512 + 446 + 16)  # the EBR's link entry -> itself (relative LBA 0 is "none"; use 2048-2048)
    f.write(bytes([0, 0, 0, 0, 0x05, 0, 0, 0]) + struct.pack("<II", 0, 2048))
    f.seek(2048 * 512 + 446 + 16 + 8)
    f.write(struct.pack("<II", 2, 2048))
    # A second EBR at extended+2 linking back to the first.
    f.seek((2048 + 2) * 512 + 446 + 16)
    f.write(bytes([0, 0, 0, 0, 0x05, 0, 0, 0]) + struct.pack("<II", 0, 2048))
    f.seek((2048 + 2) * 512 + 510)
    f.write(b"\x55\xaa")
p = fish_bounded("--ro", "-a", disk, "list-partitions")
check(p.returncode == 0, f"looping EBR chain: terminates (exit {p.returncode}) {p.stdout!r}")

# Garbage LVM metadata: the PV is recognised, its VG is not, and nothing crashes.
disk = os.path.join(work, "lvm.img")
run(["truncate", "-s", "64M", disk])
head = subprocess.run(["gzip", "-dc", os.path.join(HERE, "fixtures/lvm-pv-head.bin.gz")], capture_output=True).stdout
head = bytearray(head)
# Every copy of the metadata in the ring, mangled in place (same length: nothing moves).
at = head.find(b"testvg {")
while at >= 0:
    head[at:at + 200] = (b"testvg { {{{ [ \"unterminated " + b"x" * 200)[:200]
    at = head.find(b"testvg {", at + 200)
with open(disk, "r+b") as f:
    f.write(head)
p = fish_bounded("--ro", "-a", disk, "lvs", ":", "list-filesystems")
check(p.returncode == 0 and p.stdout == b"", f"garbage LVM metadata: no volumes, no crash {p.stdout!r}")

# Not an image at all, and a missing one.
junk = os.path.join(work, "junk.img")
with open(junk, "wb") as f:
    f.write(os.urandom(1 << 20))
p = fish_bounded("--ro", "-a", junk, "-m", "/dev/sda", "ls", "/")
clean_failure(p, "random bytes", "no filesystem")
p = fish_bounded("--ro", "-a", os.path.join(work, "missing.img"), "list-devices")
clean_failure(p, "missing image", "No such file")

rmtree(work)
finish()
