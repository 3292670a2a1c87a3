"""OS inspection on a Debian-12-like guest (fstab layout with a separate /boot, a real dpkg status
file), guestfish's inspect-* commands, -i, and sysprep (each operation checked, e2fsck clean)."""
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fishtest import *  # noqa: E402,F401,F403

work = make_images()
image = convert(work, "debian", "qcow2")
status = open(os.path.join(work, "debtree/var/lib/dpkg/status")).read()
want_packages = sorted(block.split("\n", 1)[0][len("Package: "):] for block in status.strip().split("\n\n"))

p = fish("inspect", "-a", image, "--output", "json")
info = json.loads(p.stdout)
check(len(info) == 1, "inspect: one operating system")
os_ = info[0]
for key, want in [("root", "/dev/sda2"), ("distro", "debian"), ("major_version", 12), ("minor_version", 5),
                  ("hostname", "keel-debian"), ("arch", "x86_64"), ("package_format", "deb"),
                  ("package_management", "apt"), ("osinfo", "debian12"), ("type", "linux")]:
    check(os_.get(key) == want, f"inspect: {key} = {os_.get(key)!r} (want {want!r})")
check(os_["mountpoints"] == {"/": "/dev/sda2", "/boot": "/dev/sda1"}, f"inspect: mountpoints {os_['mountpoints']}")
check([a["name"] for a in os_["applications"]] == want_packages, "inspect: the package list is the dpkg status's")
check(os_["kernels"] == ["/boot/vmlinuz-6.1.0-13-amd64", "/boot/vmlinuz-6.1.0-10-amd64"], f"inspect: kernels {os_['kernels']}")
p = fish("inspect", "-a", image)
check(p.stdout.startswith(b"<?xml") and b"<distro>debian</distro>" in p.stdout, "inspect: XML like virt-inspector's")

p = fish("--ro", "-a", image, "inspect-os", ":", "inspect-get-distro", "/dev/sda2", ":", "inspect-get-hostname",
         "/dev/sda2", ":", "inspect-get-major-version", "/dev/sda2", ":", "inspect-get-product-name", "/dev/sda2",
         ":", "inspect-get-mountpoints", "/dev/sda2")
check(p.stdout.decode() == "/dev/sda2\ndebian\nkeel-debian\n12\n12.5\n/: /dev/sda2\n/boot: /dev/sda1\n",
      "inspect-* commands " + repr(p.stdout.decode()))
p = fish("--ro", "-a", image, "inspect-os", ":", "inspect-list-applications", "/dev/sda2")
names = [l.split(": ", 1)[1] for l in p.stdout.decode().splitlines() if l.startswith("  app2_name: ")]
check(names == want_packages, "inspect-list-applications lists the packages")
p = fish("--ro", "-a", image, "-i", "cat", "/etc/hostname", ":", "ls", "/boot", ":", "cat", "/etc/os-release")
check(p.stdout.decode().startswith("keel-debian\ninitrd.img-6.1.0-13-amd64\nlost+found\nvmlinuz-6.1.0-10-amd64\n"),
      "-i mounts / and /boot from the guest's fstab")
check(b'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"' in p.stdout, "-i: /etc/os-release (a symlink) reads")

# sysprep
p = fish("sysprep", "--list-operations")
ops = [l.split()[0] for l in p.stdout.decode().splitlines()]
check({"machine-id", "ssh-hostkeys", "hostname", "logfiles", "dhcp-client-state", "root-password"} <= set(ops),
      "sysprep --list-operations " + " ".join(ops))
clone = os.path.join(work, "clone.qcow2")
shutil.copy(image, clone)
before = fish("--ro", "-a", clone, "-i", "cat", "/etc/machine-id").stdout
p = fish("sysprep", "-a", clone, "--dry-run")
after = fish("--ro", "-a", clone, "-i", "cat", "/etc/machine-id").stdout
check(p.returncode == 0 and before == after and b"machine-id" in p.stdout, "sysprep --dry-run changes nothing")
p = fish("sysprep", "-a", clone, "--operations", "ssh-hostkeys")
p2 = fish("--ro", "-a", clone, "-i", "ls", "/etc/ssh", ":", "cat", "/etc/machine-id")
check(p2.stdout == b"sshd_config\n" + before, "sysprep --operations ssh-hostkeys does only that")
p = fish("sysprep", "-a", clone, "--hostname", "clone-01", "--root-password", "password:s3cret")
check(p.returncode == 0, "sysprep runs " + p.stderr.decode())
p = fish("--ro", "-a", clone, "-i", "cat", "/etc/machine-id", ":", "cat", "/etc/hostname", ":", "cat", "/etc/hosts",
         ":", "ls", "/var/lib/dhcp", ":", "find", "/var/log", ":", "exists", "/root/.bash_history", ":",
         "exists", "/home/user/.bash_history", ":", "ls", "/tmp", ":", "ls", "/var/cache/apt/archives", ":",
         "exists", "/etc/udev/rules.d/70-persistent-net.rules", ":", "cat", "/etc/shadow", ":", "filesize",
         "/var/log/syslog")
lines = p.stdout.decode().splitlines()
new_id = lines[0]
check(len(new_id) == 32 and new_id != before.decode().strip(), f"sysprep: new machine-id {new_id}")
check(lines[1] == "clone-01", "sysprep: hostname set")
check(lines[2:4] == ["127.0.0.1\tlocalhost", "127.0.1.1\tclone-01"], f"sysprep: /etc/hosts follows {lines[2:4]}")
rest = lines[4:]
check(rest[:3] == ["/apt", "/apt/history.log", "/syslog"], f"sysprep: leases gone, rotated logs removed {rest[:3]}")
check(rest[3:5] == ["false", "false"], "sysprep: bash history removed (root and user)")
shadow = [l for l in rest if l.startswith("root:")]
check(len(shadow) == 1 and shadow[0].startswith("root:$6$"), "sysprep: root password set (SHA-512 crypt)")
check(rest[-1] == "0", "sysprep: logs truncated")
check("false" in rest[5:7], "sysprep: persistent net rules removed")
# Check the password hash with the system's own crypt.
import warnings  # noqa: E402
warnings.simplefilter("ignore", DeprecationWarning)
import crypt  # noqa: E402 (deprecated, but in Debian 12's Python)
h = shadow[0].split(":")[1]
check(crypt.crypt("s3cret", h) == h, "sysprep: the hash verifies with crypt(3)")
raw = os.path.join(work, "clone.raw")
run(["qemu-img", "convert", "-O", "raw", clone, raw])
for num, (start, size) in {1: (2048, 65536), 2: (67584, 161792)}.items():
    part = os.path.join(work, "p.img")
    run(["dd", f"if={raw}", f"of={part}", "bs=512", f"skip={start}", f"count={size}", "status=none"])
    p = run(["e2fsck", "-fn", part], check=False)
    check(p.returncode == 0, f"sysprep: e2fsck -fn clean on partition {num}")

# An rpm-based guest: the package list comes from rpmdb.sqlite (header blobs, as rpm 4.16+ keeps them).
import sqlite3  # noqa: E402
import struct  # noqa: E402


def rpm_header(tags):
    """An rpm header blob: index entries (tag, type, offset, count) then the data store."""
    index, store = b"", b""
    for tag, value in tags:
        if isinstance(value, int):
            while len(store) % 4:
                store += b"\0"
            index += struct.pack(">IIII", tag, 4, len(store), 1)
            store += struct.pack(">I", value)
        else:
            index += struct.pack(">IIII", tag, 6, len(store), 1)
            store += value.encode() + b"\0"
    return struct.pack(">II", len(tags), len(store)) + index + store


fed = os.path.join(work, "fedtree")
os.makedirs(os.path.join(fed, "etc"))
os.makedirs(os.path.join(fed, "var/lib/rpm"))
os.makedirs(os.path.join(fed, "usr/bin"))
with open(os.path.join(fed, "etc/os-release"), "w") as f:
    f.write('NAME="Fedora Linux"\nVERSION_ID=39\nID=fedora\nPRETTY_NAME="Fedora Linux 39"\n')
with open(os.path.join(fed, "etc/hostname"), "w") as f:
    f.write("fedora-guest\n")
with open(os.path.join(fed, "etc/fstab"), "w") as f:
    f.write("LABEL=fedroot / ext4 defaults 0 1\n")
shutil.copy("/bin/ls", os.path.join(fed, "usr/bin/ls"))
db = sqlite3.connect(os.path.join(fed, "var/lib/rpm/rpmdb.sqlite"))
db.execute("CREATE TABLE Packages (hnum INTEGER PRIMARY KEY AUTOINCREMENT, blob BLOB NOT NULL)")
for name, epoch, version, release in [("bash", 0, "5.2.21", "1.fc39"), ("kernel", 0, "6.5.6", "300.fc39"),
                                       ("gpg-pubkey", 0, "abc", "1"), ("openssl", 1, "3.1.1", "4.fc39")]:
    tags = [(1000, name), (1001, version), (1002, release), (1022, "x86_64"), (1004, name + " summary")]
    if epoch:
        tags.append((1003, epoch))
    db.execute("INSERT INTO Packages (blob) VALUES (?)", (rpm_header(tags),))
db.commit()
db.close()
fimg = os.path.join(work, "fedora.img")
run(["truncate", "-s", "32M", fimg])
run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "fedroot", "-d", fed, fimg])
info = json.loads(fish("inspect", "-a", fimg, "--output", "json").stdout)[0]
check((info["distro"], info["major_version"], info["package_format"], info["package_management"],
       info["hostname"]) == ("fedora", 39, "rpm", "dnf", "fedora-guest"), f"rpm guest: {info['distro']} {info['major_version']}")
apps = [(a["name"], a["epoch"], a["version"], a["release"], a["arch"]) for a in info["applications"]]
check(apps == [("bash", 0, "5.2.21", "1.fc39", "x86_64"), ("kernel", 0, "6.5.6", "300.fc39", "x86_64"),
               ("openssl", 1, "3.1.1", "4.fc39", "x86_64")], f"rpm guest: packages from rpmdb.sqlite {apps}")

rmtree(work)
finish()
