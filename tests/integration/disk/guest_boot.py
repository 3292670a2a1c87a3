#!/usr/bin/env python3
"""A QEMU guest boots from a qcow2 overlay that keel-img created over a backing file, directly and
through `keel-img serve`. The guest's writes must land in the overlay only (the base is unchanged),
and qemu-img check and keel-img check must both call the result clean.

The root filesystem is a small ext4 image (busybox + an init script) made with mke2fs -d; the guest
kit's kernel and initramfs switch to it (keel.root=/dev/vda). QEMU and the server are ended by pid.
"""
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imgtest import run, expect, finish  # noqa: E402

KEEL = sys.argv[1]
KIT = sys.argv[2]
ACCEL_CMD = sys.argv[3] if len(sys.argv) > 3 else ""

INIT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -o remount,rw /
echo "BASE-SAYS: $(/bin/busybox cat /etc/base.txt)"
echo "written by the guest" > /written.txt || echo "KEEL-DISK-WRITE-FAILED"
/bin/busybox dd if=/dev/urandom of=/blob bs=64k count=32 2>/dev/null || echo "KEEL-DISK-WRITE-FAILED"
/bin/busybox sync
/bin/busybox grep -q "written by the guest" /written.txt && echo KEEL-DISK-OK
/bin/busybox dmesg | /bin/busybox grep -iE "ext4|I/O error|blk_update" | /bin/busybox tail -5
/bin/busybox poweroff -f
"""


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def accel():
    if os.environ.get("KEEL_ACCEL"):
        return os.environ["KEEL_ACCEL"]
    if ACCEL_CMD and os.access(ACCEL_CMD, os.X_OK):
        return subprocess.run([ACCEL_CMD, "-q"], capture_output=True, text=True).stdout.strip() or "tcg"
    return "tcg"


def boot(drive_args, label, timeout=240, attempts=2):
    """Boots once; a kernel panic before the root is mounted (a TCG timing flake on a loaded
    machine) gets one more try, since nothing was written yet."""
    for attempt in range(attempts):
        ok, text = boot_once(drive_args, label, timeout)
        if ok or "Kernel panic" not in text or "switching to root" in text:
            break
        print(f"{label}: kernel panic before mounting the root, trying again", flush=True)
    expect(ok, f"{label}: the guest booted from the overlay, read the base and wrote\n--- console ---\n{text[-3000:]}")
    return text if ok else None


def boot_once(drive_args, label, timeout):
    args = ["qemu-system-x86_64", "-machine", "q35", "-accel", accel(), "-bios", "/usr/share/qemu/qboot.rom",
            "-nodefaults", "-no-user-config", "-m", "256", "-display", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", os.path.join(KIT, "vmlinuz"), "-initrd", os.path.join(KIT, "initramfs.cpio.gz"),
            "-append", "console=ttyS0 quiet panic=-1 no_timer_check keel.root=/dev/vda keel.rootfstype=ext4 init=/sbin/init",
            ] + drive_args + ["-device", "virtio-blk-pci,drive=d0"]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # our QEMU, by its pid
        out, _ = proc.communicate()
    text = out.decode("utf-8", "replace")
    ok = "KEEL-DISK-OK" in text and "BASE-SAYS: hello from the base" in text and "KEEL-DISK-WRITE-FAILED" not in text
    print(f"TIMING {label} {time.monotonic() - t0:.2f}", flush=True)
    return ok, text


def guest_file(flat):
    """What /written.txt holds in a raw ext4 image, as the guest's next mount would see it: the guest
    powered off without unmounting, so its last metadata may still be in the journal only.
    e2fsck replays the journal (exit 1: it changed the image) and must find the filesystem sound."""
    fsck = run("e2fsck", "-fy", flat, check=False)
    expect(fsck.returncode in (0, 1), f"e2fsck after the guest: exit {fsck.returncode}\n{fsck.stdout[-800:]}")
    got = run("debugfs", "-R", "cat /written.txt", flat, check=False)
    return got.stdout, got.stderr[-300:]


def check_overlay(tmp, overlay, base, base_sha, label, console):
    expect(sha(base) == base_sha, f"{label}: the base image is unchanged")
    q = run("qemu-img", "check", overlay, check=False)
    expect(q.returncode == 0, f"{label}: qemu-img check: {q.stdout[-400:]}{q.stderr[-400:]}")
    k = run(KEEL, "check", overlay, check=False)
    expect(k.returncode == 0, f"{label}: keel-img check: {k.stdout[-400:]}{k.stderr[-400:]}")
    # The guest's file is in the overlay's view of the disk, and not in the base's.
    flat = os.path.join(tmp, "flat.raw")
    run(KEEL, "convert", "-O", "raw", overlay, flat)
    got, err = guest_file(flat)
    expect("written by the guest" in got,
           f"{label}: the guest's file is in the overlay: {got!r} {err!r}\n--- console ---\n{console[-2000:]}")
    run(KEEL, "convert", "-O", "raw", base, flat)
    got, _ = guest_file(flat)
    expect("written by the guest" not in got, f"{label}: the base does not have the guest's file")
    m = run(KEEL, "map", "--output=json", overlay).stdout
    expect('"depth": 0, "present": true' in m, f"{label}: the overlay holds clusters of its own")


def main():
    for f in ("vmlinuz", "initramfs.cpio.gz"):
        if not os.path.exists(os.path.join(KIT, f)):
            print(f"guest kit missing {f} in {KIT}: run guest/build.sh kit")
            return 1
    with tempfile.TemporaryDirectory(prefix="keel-disk-guest-") as tmp:
        tree = os.path.join(tmp, "tree")
        for d in ("bin", "sbin", "etc", "proc", "dev"):
            os.makedirs(os.path.join(tree, d))
        shutil.copy("/bin/busybox", os.path.join(tree, "bin", "busybox"))
        with open(os.path.join(tree, "sbin", "init"), "w") as f:
            f.write(INIT)
        os.chmod(os.path.join(tree, "sbin", "init"), 0o755)
        with open(os.path.join(tree, "etc", "base.txt"), "w") as f:
            f.write("hello from the base\n")
        raw = os.path.join(tmp, "root.raw")
        run("mke2fs", "-q", "-F", "-t", "ext4", "-d", tree, raw, "64M")
        base = os.path.join(tmp, "base.qcow2")
        run(KEEL, "convert", "-O", "qcow2", raw, base)
        base_sha = sha(base)

        # 1. Directly: QEMU opens keel's overlay itself.
        overlay = os.path.join(tmp, "overlay.qcow2")
        run(KEEL, "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", overlay)
        console = boot(["-drive", f"file={overlay},format=qcow2,if=none,id=d0"], "direct")
        if console:
            check_overlay(tmp, overlay, base, base_sha, "direct", console)

        # 2. Through keel-img serve: QEMU is an NBD client, keel writes the overlay.
        overlay2 = os.path.join(tmp, "overlay2.qcow2")
        run(KEEL, "create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.qcow2", "-F", "qcow2", overlay2)
        sock = os.path.join(tmp, "nbd.sock")
        server = subprocess.Popen([KEEL, "serve", "-t", "--socket", sock, overlay2], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        try:
            for _ in range(250):
                if os.path.exists(sock):
                    break
                time.sleep(0.02)
            console = boot(["-drive", f"driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={sock},"
                                     "if=none,id=d0"], "serve")
        finally:
            server.send_signal(signal.SIGTERM)  # our server, by its pid
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        expect(server.returncode == 0, f"serve exits cleanly: {server.returncode} {server.stderr.read().decode()[-300:]}")
        if console:
            check_overlay(tmp, overlay2, base, base_sha, "serve", console)

    return finish()


if __name__ == "__main__":
    sys.exit(main())
