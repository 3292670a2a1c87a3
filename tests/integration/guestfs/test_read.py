"""keel-fish reads what real tools wrote: ls -R, cat, stat and copy-out on ext2/3/4, FAT12/16/32 and
LVM, in GPT and MBR (logical) partitions, from raw, qcow2, compressed qcow2 and vmdk images."""
import os
import stat as pystat
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fishtest import *  # noqa: E402,F401,F403

work = make_images()
tree = os.path.join(work, "tree")
fattree = os.path.join(work, "fattree")

# image, device, source tree, is FAT
CASES = [
    ("gpt", "/dev/sda1", tree, False),
    ("gpt", "/dev/sda2", fattree, True),
    ("mbr", "/dev/sda5", tree, False),
    ("mbr", "/dev/sda6", fattree, True),
    ("lvm", "/dev/testvg/root", tree, False),
]

for fmt in ["raw", "qcow2", "qcow2c", "vmdk"]:
    for image, device, src, fat in CASES:
        path = convert(work, image, fmt)
        label = f"{image}.{fmt} {device}"
        p = fish("ls", "--ro", "-a", path, "-m", device, "-R", "/", check=False)
        check(p.returncode == 0, f"{label}: ls -R / runs ({p.stderr.decode(errors='replace').strip()})")
        got = [l for l in p.stdout.decode().splitlines() if not l.startswith("lost+found")]
        want = expected_listing(src)
        if fat:
            want = [w for w in want if not w.startswith("var/fifo")]
        else:
            want = [w for w in want]
        check(got == want, f"{label}: ls -R names match the source tree ({len(got)} vs {len(want)})")

        # cat: one file, byte for byte
        p = fish("cat", "--ro", "-a", path, "-m", device, "/usr/share/doc/pkg/big.bin")
        with open(os.path.join(src, "usr/share/doc/pkg/big.bin"), "rb") as f:
            check(p.stdout == f.read(), f"{label}: cat gives the file's bytes")

        # stat: size and mode of a few files
        for rel in ["etc/motd", "usr/share/doc/pkg/size-1", "usr/share/doc/pkg/size-4096", "etc/conf.d"]:
            p = fish("--ro", "-a", path, "-m", device, "stat", "/" + rel)
            fields = dict(l.split(": ", 1) for l in p.stdout.decode().splitlines())
            st = os.lstat(os.path.join(src, rel))
            if not pystat.S_ISDIR(st.st_mode):
                check(int(fields["size"]) == st.st_size, f"{label}: stat /{rel} size")
            if not fat:
                check(int(fields["mode"]) == st.st_mode, f"{label}: stat /{rel} mode {int(fields['mode']):o}")
                check(int(fields["mtime"]) == int(st.st_mtime), f"{label}: stat /{rel} mtime")
            else:
                check(pystat.S_IFMT(int(fields["mode"])) == pystat.S_IFMT(st.st_mode), f"{label}: stat /{rel} type")

        # copy-out of the whole tree, compared with the source
        out = tmpdir()
        fish("copy-out", "--ro", "-a", path, "-m", device, "/etc", "/usr", "/deep", out)
        for top in ["etc", "usr", "deep"]:
            a = local_tree(os.path.join(src, top), fat)
            b = local_tree(os.path.join(out, top), fat)
            if fat:
                a = {k: v for k, v in a.items()}
            check(a == b, f"{label}: copy-out /{top} matches the source (names, sizes, modes, links, bytes)")
            if a != b:
                for k in sorted(set(a) | set(b)):
                    if a.get(k) != b.get(k):
                        print(f"     differs: {k}: {str(a.get(k))[:80]} vs {str(b.get(k))[:80]}")
                        break
        rmtree(out)

# Partitions, filesystems, labels and UUIDs, as guestfish names them.
p = fish("--ro", "-a", convert(work, "gpt", "qcow2"), "list-partitions", ":", "list-filesystems", ":",
         "vfs-label", "/dev/sda1", ":", "vfs-uuid", "/dev/sda1", ":", "vfs-label", "/dev/sda2", ":",
         "vfs-uuid", "/dev/sda2", ":", "part-get-parttype", "/dev/sda")
check(p.stdout.decode().split("\n") == ["/dev/sda1", "/dev/sda2", "/dev/sda3", "/dev/sda1: ext4", "/dev/sda2: vfat",
                                        "/dev/sda3: ext2", "ROOTFS", "6c1a7d0e-1111-4a4a-9b9b-000000000001",
                                        "EFIPART", "1234-ABCD", "gpt", ""],
      "gpt: partitions, filesystems, labels, UUIDs " + repr(p.stdout.decode()))
p = fish("--ro", "-a", convert(work, "mbr", "raw"), "-m", "/dev/sda7", "list-filesystems", ":", "part-get-parttype",
         "/dev/sda", ":", "vfs-label", "/dev/sda7", ":", "cat", "/f12.txt")
check(p.stdout.decode() == "/dev/sda1: ext3\n/dev/sda5: ext4\n/dev/sda6: vfat\n/dev/sda7: vfat\nmsdos\nFAT12VOL\nfat12\n",
      "mbr: logical partitions, FAT12 " + repr(p.stdout.decode()))
p = fish("--ro", "-a", convert(work, "lvm", "qcow2"), "-m", "/dev/testvg/root", "-m", "/dev/testvg/home:/usr",
         "lvs", ":", "vgs", ":", "cat", "/usr/data.txt", ":", "cat", "/etc/motd")
check(p.stdout.decode() == "/dev/testvg/root\n/dev/testvg/home\n/dev/testvg/more\ntestvg\ndata\nhello, guest\n",
      "lvm: LVs, VG, two mounts " + repr(p.stdout.decode()))

# Symlinks are followed inside the guest: an absolute link resolves against the guest's root.
p = fish("--ro", "-a", convert(work, "gpt", "raw"), "-m", "/dev/sda1", "cat", "/etc/abs-link", ":", "cat",
         "/usr/motd-link", ":", "readlink", "/etc/dangling")
check(p.stdout.decode() == "keel-test\nhello, guest\ndoes-not-exist\n", "symlinks resolve inside the guest")

rmtree(work)
finish()
