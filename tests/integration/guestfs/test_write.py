"""keel-fish writes (copy-in of a tree, mkdir, rm-rf, write, chmod, mv, tar-in, ...) and e2fsck -fn /
fsck.fat -n find every filesystem clean afterwards; keel-fish reads the new content back, also through
qcow2. Writing to an ext filesystem whose journal needs recovery is refused with a clear message."""
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fishtest import *  # noqa: E402,F401,F403

work = make_images()
tree = os.path.join(work, "tree")
fattree = os.path.join(work, "fattree")

# A tree to copy in: many files (directory growth), long and unicode names, a big file.
src = os.path.join(work, "copyin")
os.makedirs(os.path.join(src, "many"))
for i in range(300):
    with open(os.path.join(src, "many", f"entry number {i:03d} with a long name.txt"), "w") as f:
        f.write(f"{i}\n" * (i % 7))
os.makedirs(os.path.join(src, "nested/one/two"))
with open(os.path.join(src, "nested/one/two/big.bin"), "wb") as f:
    f.write(os.urandom(3_000_000))
with open(os.path.join(src, "nested/Ünïcödé name.txt"), "w") as f:
    f.write("unicode\n")
tarball = os.path.join(work, "in.tar")
run(["tar", "-C", os.path.join(src, "nested"), "-cf", tarball, "."])

SCRIPT = """
mkdir /new
mkdir-p /a/b/c
write /a/b/c/f.txt "hello world"
write-append /a/b/c/f.txt " and more"
copy-in {src}/many /new
copy-in {src}/nested /new
rm-rf /etc
rm-rf /deep
chmod 0700 /new/many
touch /touched
mv /a/b/c/f.txt /a/moved.txt
cp /a/moved.txt /a/copied.txt
mkdir /untar
tar-in {tar} /untar
rm /UPPER.TXT
rmdir /var/empty
"""


def fsck(image_path, offset, length, fat):
    """Extracts one partition to a file and checks it with the real fsck."""
    part = os.path.join(work, "fsck.part")
    with open(image_path, "rb") as f, open(part, "wb") as o:
        f.seek(offset)
        remaining = length
        while remaining:
            chunk = f.read(min(remaining, 1 << 20))
            if not chunk:
                break
            o.write(chunk)
            remaining -= len(chunk)
    if fat:
        p = run(["fsck.fat", "-n", part], check=False)
    else:
        p = run(["e2fsck", "-fn", part], check=False)
    os.unlink(part)
    return p


def part_offsets(image_path):
    """(offset, length) of each partition, from sfdisk's JSON dump."""
    import json
    p = run(["sfdisk", "-J", image_path])
    table = json.loads(p.stdout)["partitiontable"]
    out = {}
    for entry in table["partitions"]:
        num = int(entry["node"].rsplit(image_path, 1)[1])
        out[num] = (entry["start"] * 512, entry["size"] * 512)
    return out


def verify(path, device, label):
    p = fish("--ro", "-a", path, "-m", device, "cat", "/a/moved.txt", ":", "cat", "/a/copied.txt", ":", "ls", "/untar",
             ":", "is-dir", "/etc", ":", "cat", "/untar/one/two/big.bin", check=False)
    out = p.stdout
    want_head = b"hello world and morehello world and moreone\n\xc3\x9cn\xc3\xafc\xc3\xb6d\xc3\xa9 name.txt\nfalse\n"
    with open(os.path.join(src, "nested/one/two/big.bin"), "rb") as f:
        big = f.read()
    check(p.returncode == 0 and out == want_head + big, f"{label}: reads back what it wrote "
          + repr(out[:120]) + p.stderr.decode(errors="replace"))
    p = fish("--ro", "-a", path, "-m", device, "find", "/new/many")
    check(len(p.stdout.decode().splitlines()) == 300, f"{label}: copy-in of 300 files")
    p = fish("--ro", "-a", path, "-m", device, "cat", "/new/many/entry number 123 with a long name.txt")
    check(p.stdout == b"123\n" * (123 % 7), f"{label}: a copied-in file's content")


# ext4 (GPT), FAT32 (GPT), ext4 logical + FAT16 logical (MBR): raw and qcow2.
for image, device, partnum, fat in [("gpt", "/dev/sda1", 1, False), ("gpt", "/dev/sda2", 2, True),
                                     ("mbr", "/dev/sda5", 5, False), ("mbr", "/dev/sda6", 6, True)]:
    for fmt in ["raw", "qcow2"]:
        label = f"{image}.{fmt} {device}"
        base = convert(work, image, "raw")
        path = os.path.join(work, f"w-{image}-{partnum}.{'qcow2' if fmt == 'qcow2' else 'raw'}")
        if fmt == "raw":
            shutil.copy(base, path)
        else:
            run(["qemu-img", "convert", "-O", "qcow2", base, path])
        p = fish("-a", path, "-m", device, check=False,
                 input=SCRIPT.format(src=src, tar=tarball).encode())
        check(p.returncode == 0, f"{label}: write script runs " + p.stderr.decode(errors="replace"))
        verify(path, device, label)
        raw_path = path
        if fmt == "qcow2":
            raw_path = path + ".raw"
            run(["qemu-img", "convert", "-O", "raw", path, raw_path])
            p = run(["qemu-img", "check", path], check=False)
            check(p.returncode == 0, f"{label}: qemu-img check is clean after the writes")
        offset, length = part_offsets(raw_path)[partnum]
        p = fsck(raw_path, offset, length, fat)
        check(p.returncode == 0, f"{label}: {'fsck.fat -n' if fat else 'e2fsck -fn'} reports clean: "
              + (p.stdout.decode(errors='replace') + p.stderr.decode(errors='replace'))[-600:])

# LVM ext4 on a two-segment LV.
path = os.path.join(work, "w-lvm.raw")
shutil.copy(convert(work, "lvm", "raw"), path)
p = fish("-a", path, "-m", "/dev/testvg/root", check=False, input=SCRIPT.format(src=src, tar=tarball).encode())
check(p.returncode == 0, "lvm: write script runs " + p.stderr.decode(errors="replace"))
verify(path, "/dev/testvg/root", "lvm /dev/testvg/root")
# Reassemble the LV from the layout to fsck it.
lv = os.path.join(work, "lv-root.img")
with open(path, "rb") as disk, open(lv, "wb") as out:
    for line in open(os.path.join(HERE, "fixtures/lvm-layout.txt")):
        name, lv_start, count, pv_start, pe_start, extent = line.split()
        if name != "root":
            continue
        disk.seek(1048576 + int(pe_start) + int(pv_start) * int(extent))
        out.seek(int(lv_start) * int(extent))
        out.write(disk.read(int(count) * int(extent)))
p = run(["e2fsck", "-fn", lv], check=False)
check(p.returncode == 0, "lvm /dev/testvg/root: e2fsck -fn reports clean " + p.stdout.decode()[-300:])

# FAT12 (small, fixed root directory): fill the root directory until it is full, then a clear error.
path = os.path.join(work, "w-fat12.raw")
shutil.copy(convert(work, "mbr", "raw"), path)
script = "".join(f"write /file-with-a-long-name-{i}.txt {i}\n" for i in range(200))
p = fish("-a", path, "-m", "/dev/sda7", check=False, input=script.encode())
check(p.returncode != 0 and b"root directory is full" in p.stderr, "FAT12: a full root directory is a clear error "
      + p.stderr.decode(errors="replace").strip())
offset, length = part_offsets(path)[7]
p = fsck(path, offset, length, True)
check(p.returncode == 0, "FAT12: fsck.fat -n clean after filling the root " + p.stdout.decode()[-300:])

# A journal that needs recovery: reading works, writing is refused with a clear message.
ext3 = os.path.join(work, "needs-recovery.img")
run(["truncate", "-s", "20M", ext3])
run(["mke2fs", "-q", "-F", "-t", "ext3", "-d", os.path.join(tree, "etc"), ext3])
run(["debugfs", "-w", "-R", "feature needs_recovery", ext3])
p = fish("--ro", "-a", ext3, "-m", "/dev/sda", "cat", "/motd", check=False)
check(p.returncode == 0 and p.stdout == b"hello, guest\n", "needs_recovery: read-only access works")
p = fish("--rw", "-a", ext3, "-m", "/dev/sda", "write", "/x", "y", check=False)
check(p.returncode != 0 and b"journal needs recovery" in p.stderr,
      "needs_recovery: writing is refused: " + p.stderr.decode(errors="replace").strip())

rmtree(work)
finish()
