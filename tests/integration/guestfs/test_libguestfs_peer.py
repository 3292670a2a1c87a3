"""keel-fish and libguestfs agree: virt-ls -R and virt-cat list and read what keel-fish does (qcow2);
after keel-fish writes (copy-in, mkdir, write, chmod, rm-rf, sysprep) libguestfs reads the new
content; keel-fish inspect's XML equals virt-inspector's. libguestfs boots an appliance for each
command (tens of seconds here), so this test makes four calls."""
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fishtest import *  # noqa: E402,F401,F403

env = dict(os.environ, LIBGUESTFS_BACKEND="direct", LIBGUESTFS_BACKEND_SETTINGS="force_tcg")
work = make_images()
gpt = convert(work, "gpt", "qcow2")

ours = fish("ls", "--ro", "-a", gpt, "-m", "/dev/sda1", "-R", "/").stdout
theirs = run(["virt-ls", "-a", gpt, "-m", "/dev/sda1", "-R", "/"], env=env).stdout
check(ours == theirs, f"virt-ls -R / and keel-fish ls -R / agree ({len(ours.splitlines())} paths)")

files = ["/usr/share/doc/pkg/bigger.bin", "/etc/café-naïve.txt", "/usr/motd-link"]
ours = fish("cat", "--ro", "-a", gpt, "-m", "/dev/sda1", *files).stdout
theirs = run(["virt-cat", "-a", gpt, "-m", "/dev/sda1", *files], env=env).stdout
check(ours == theirs and len(ours) > 2_500_000, "virt-cat and keel-fish cat give the same bytes")

# keel-fish writes to the Debian guest's root (ext4), then libguestfs reads it.
deb = os.path.join(work, "deb-written.qcow2")
shutil.copy(convert(work, "debian", "qcow2"), deb)
p = fish("-a", deb, "-i", "mkdir-p", "/srv/new", ":", "copy-in", f"{work}/tree/etc", "/srv/new", ":",
         "write", "/srv/new/note.txt", "written by keel-fish", ":", "chmod", "0600", "/srv/new/note.txt", ":",
         "rm-rf", "/srv/new/etc/conf.d")
p = fish("sysprep", "-a", deb, "--hostname", "peer-check", "-q")
script = """
cat /srv/new/note.txt
echo
stat /srv/new/note.txt
ls /srv/new/etc
cat /etc/hostname
ls /etc/ssh
statvfs /
statvfs /boot
"""
theirs = run(["guestfish", "--ro", "-a", deb, "-i"], input=script.encode(), env=env).stdout.decode()
check(theirs.startswith("written by keel-fish\n"), "libguestfs reads a file keel-fish wrote")
check("mode: 33152\n" in theirs, "libguestfs sees keel-fish's chmod 0600")
check("conf.d" not in theirs and "motd\n" in theirs, "libguestfs sees the copied-in tree, without the removed part")
check("peer-check\n" in theirs and "sshd_config\nssh_host" not in theirs, "libguestfs sees sysprep's changes")

# Free-space figures: the kernel's statfs (through libguestfs) against keel-fish's.
def statvfs_blocks(text):
    out = []
    for block in text.split("bsize: ")[1:]:
        fields = dict(l.split(": ", 1) for l in ("bsize: " + block).splitlines() if ": " in l)
        out.append({k: int(fields[k]) for k in ("bsize", "blocks", "bfree", "bavail", "files", "ffree")})
    return out
ours_stat = fish("--ro", "-a", deb, "-i", "statvfs", "/", ":", "statvfs", "/boot").stdout.decode()
check(statvfs_blocks(ours_stat) == statvfs_blocks(theirs),
      f"statvfs / and /boot agree with the kernel's: {statvfs_blocks(ours_stat)} vs {statvfs_blocks(theirs)}")

# The guest's XML, after those writes: keel-fish inspect against virt-inspector.
ours = fish("inspect", "-a", deb).stdout
theirs = run(["virt-inspector", "-a", deb], env=env).stdout
check(ours == theirs, "keel-fish inspect's XML is virt-inspector's, byte for byte")
if ours != theirs:
    import difflib
    for line in list(difflib.unified_diff(theirs.decode().splitlines(), ours.decode().splitlines(), lineterm=""))[:20]:
        print("    " + line)
rmtree(work)
finish()
