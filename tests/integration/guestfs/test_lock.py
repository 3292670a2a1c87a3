"""Two writers never touch one image: keel-fish takes an OFD lock; an image that QEMU (or another
keel-fish) holds is opened read-only by default and refused with --rw."""
import fcntl
import os
import signal
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fishtest import *  # noqa: E402,F401,F403

work = tmpdir()
img = os.path.join(work, "disk.img")
run(["truncate", "-s", "16M", img])
run(["mke2fs", "-q", "-F", "-t", "ext4", img])

# Another writer (a whole-file OFD write lock, as keel-fish's own) holds the image.
F_OFD_SETLK = 37
fd = os.open(img, os.O_RDWR)
fcntl.fcntl(fd, F_OFD_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0))
p = fish("--rw", "-a", img, "-m", "/dev/sda", "write", "/x", "y", check=False)
check(p.returncode == 1 and b"in use" in p.stderr, "--rw on a locked image is refused: " + p.stderr.decode().strip())
p = fish("-a", img, "-m", "/dev/sda", "write", "/x", "y", check=False)
check(p.returncode == 1 and b"being written by another process" in p.stderr,
      "a reader cannot open an image another process is writing: " + p.stderr.decode().strip())
os.close(fd)

# A keel-fish writer holds the image: a second writer is refused, and falls back to read-only.
writer = subprocess.Popen([keel_fish(), "--rw", "-a", img, "-m", "/dev/sda"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
writer.stdin.write(b"write /from-first hello\nsync\n")
writer.stdin.flush()
time.sleep(0.5)
p = fish("--rw", "-a", img, "-m", "/dev/sda", "ls", "/", check=False)
check(p.returncode == 1 and b"in use" in p.stderr, "a second keel-fish writer is refused")
writer.stdin.close()
writer.wait(timeout=30)
check(writer.returncode == 0, "the first writer finishes")
p = fish("--ro", "-a", img, "-m", "/dev/sda", "cat", "/from-first")
check(p.stdout == b"hello", "the first writer's data is there")

# QEMU holds the image (its own locks): keel-fish opens it read-only by default, refuses --rw.
qemu = subprocess.Popen(["qemu-system-x86_64", "-S", "-nodefaults", "-display", "none", "-machine", "accel=tcg",
                         "-drive", f"file={img},format=raw,if=virtio"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
try:
    deadline = time.time() + 20
    locked = False
    while time.time() < deadline and not locked:
        time.sleep(0.2)
        p = fish("--rw", "-a", img, "-m", "/dev/sda", "ls", "/", check=False)
        locked = p.returncode == 1 and b"in use" in p.stderr
    check(locked, "--rw on an image QEMU is running is refused")
    p = fish("-a", img, "-m", "/dev/sda", "cat", "/from-first", check=False)
    check(p.returncode == 0 and p.stdout == b"hello" and b"opened read-only" in p.stderr,
          "by default an image in use is opened read-only, with a warning: " + p.stderr.decode().strip())
    p = fish("-a", img, "-m", "/dev/sda", "write", "/x", "y", check=False)
    check(p.returncode == 1 and b"read-only" in p.stderr, "and writing to it is refused")
finally:
    qemu.send_signal(signal.SIGTERM)
    try:
        qemu.wait(timeout=10)
    except subprocess.TimeoutExpired:
        qemu.kill()
        qemu.wait()

rmtree(work)
finish()
