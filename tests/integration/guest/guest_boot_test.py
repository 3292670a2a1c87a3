#!/usr/bin/env python3
"""Boots Keel's guest kit under real QEMU and checks what the guest reports on its serial console.

  guest_boot_test.py --kit DIR --accel-cmd PATH run        devices visible, keel.run64 exit status
  guest_boot_test.py --kit DIR --accel-cmd PATH run-plain  keel.run with %XX escapes and kernel quotes
  guest_boot_test.py --kit DIR --accel-cmd PATH acpi       QMP system_powerdown powers the guest off
  guest_boot_test.py --kit DIR --accel-cmd PATH debian     debian.qcow2 boots to login:, then powerdown

QEMU is always ended by its pid (SIGKILL) on failure or timeout; temporary files go with the temp dir.
Prints "TIMING <what> <seconds>" lines so boot times show up in ctest's output.
"""
import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

QEMU = "qemu-system-x86_64"


def accelerator(accel_cmd):
    if os.environ.get("KEEL_ACCEL"):
        return os.environ["KEEL_ACCEL"]
    if not accel_cmd or not os.access(accel_cmd, os.X_OK):
        sys.exit(f"keel-accel not found at {accel_cmd!r}: build it (ninja -C build keel-accel) "
                 "or set KEEL_ACCEL")
    out = subprocess.run([accel_cmd, "-q"], check=True, capture_output=True, text=True).stdout.strip()
    if out not in ("kvm", "tcg"):
        sys.exit(f"keel-accel printed {out!r}")
    return out


class Guest:
    """One QEMU process; its serial console is read line by line from stdout."""

    def __init__(self, args, name):
        self.name = name
        self.lines = []
        self.marks = {}  # first time (seconds since start) a line containing each watched text appeared
        self.cond = threading.Condition()
        self.start = time.monotonic()
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait_for(self, text, timeout):
        """Seconds from QEMU's start until a console line contains text; None on timeout or exit."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self.cond:
            while True:
                for line in self.lines[seen:]:
                    if text in line:
                        self.marks[text] = time.monotonic() - self.start
                        return self.marks[text]
                seen = len(self.lines)
                if self.proc.poll() is not None and not self.reader.is_alive():
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(min(left, 0.5))

    def wait_exit(self, timeout):
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self.reader.join(5)
        return time.monotonic() - self.start

    def kill(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, 9)
            self.proc.wait()
        self.reader.join(5)

    def console(self):
        with self.cond:
            return "\n".join(self.lines)


def qemu_args(kit, accel, append, extra):
    return [QEMU, "-machine", "q35", "-accel", accel, "-bios", "/usr/share/qemu/qboot.rom",
            "-nodefaults", "-no-user-config", "-m", "256", "-display", "none", "-serial", "stdio",
            "-no-reboot", "-kernel", os.path.join(kit, "vmlinuz"),
            "-initrd", os.path.join(kit, "initramfs.cpio.gz"),
            "-append", "console=ttyS0 quiet panic=-1 " + append] + extra


def qmp(sock_path, commands, timeout=10):
    """Runs QMP commands over the unix socket; returns their replies."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(sock_path)
            break
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    with s, s.makefile("rw") as f:
        json.loads(f.readline())  # greeting
        replies = []
        for cmd in ["qmp_capabilities"] + commands:
            f.write(json.dumps({"execute": cmd}) + "\n")
            f.flush()
            while True:
                msg = json.loads(f.readline())
                if "return" in msg or "error" in msg:
                    replies.append(msg)
                    break
        return replies


class Failure(Exception):
    pass


def expect(cond, what, guest):
    if not cond:
        raise Failure(f"{what}\n--- {guest.name} console ---\n{guest.console()}\n---")


# Runs inside the guest: every device the kit promises must be there and working.
GUEST_CHECKS = r"""
fail() { echo "CHECK-FAIL: $*"; exit 1; }
[ -e /sys/block/vda ] || fail "no /sys/block/vda"
[ -e /sys/block/vdb ] || fail "no /sys/block/vdb"
[ -e /sys/class/net/eth0 ] || fail "no /sys/class/net/eth0"
ip -4 addr show dev eth0 | grep -q 'inet 10.0.2.15/24' || fail "eth0 lacks 10.0.2.15/24"
ip route | grep -q 'default via 10.0.2.2' || fail "no default route via 10.0.2.2"
[ "$(hostname)" = keel-test ] || fail "hostname is $(hostname)"
for d in /sys/bus/virtio/devices/*; do
  [ -e "$d/driver" ] || fail "no driver bound to $d (device id $(cat "$d/device"))"
done
n=$(ls /sys/bus/virtio/devices | wc -l)
[ "$n" -ge 6 ] || fail "only $n virtio devices"
grep -q virtio /sys/class/misc/hw_random/rng_available || fail "virtio-rng is not a hw_random source"
grep -q '^vmw_vsock_virtio_transport ' /proc/modules || fail "vsock transport not loaded"
mkdir -p /mnt/ext4 /mnt/fat
mount -t ext4 -o ro /dev/vdb /mnt/ext4 || fail "cannot mount the ext4 disk"
[ "$(cat /mnt/ext4/hello.txt)" = "hello from the host" ] || fail "ext4 file content"
umount /mnt/ext4
mkdosfs /dev/vda >/dev/null || fail "mkdosfs"
mount -t vfat /dev/vda /mnt/fat || fail "cannot mount vfat"
echo written >/mnt/fat/Keel.txt && umount /mnt/fat || fail "vfat write"
echo CHECKS-OK
exit 7
"""


def test_run(args, accel, tmp):
    fat = os.path.join(tmp, "fat.raw")
    with open(fat, "wb") as f:
        f.truncate(16 << 20)
    tree = os.path.join(tmp, "tree")
    os.mkdir(tree)
    with open(os.path.join(tree, "hello.txt"), "w") as f:
        f.write("hello from the host\n")
    ext4 = os.path.join(tmp, "ext4.raw")
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", tree, ext4, "8M"], check=True)
    run64 = base64.b64encode(GUEST_CHECKS.encode()).decode()
    append = (f"keel.hostname=keel-test keel.ip=10.0.2.15/24 keel.gw=10.0.2.2 keel.run64={run64}")
    extra = ["-drive", f"file={fat},format=raw,if=none,id=d0", "-device", "virtio-blk-pci,drive=d0",
             "-drive", f"file={ext4},format=raw,if=none,id=d1,readonly=on",
             "-device", "virtio-blk-pci,drive=d1",
             "-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0",
             "-device", "virtio-rng-pci", "-device", "virtio-balloon-pci", "-device", "virtio-serial-pci"]
    g = Guest(qemu_args(args.kit, accel, append, extra), "run")
    try:
        ready = g.wait_for("KEEL-GUEST-READY", 120)
        expect(ready is not None, "no KEEL-GUEST-READY", g)
        done = g.wait_for("KEEL-EXIT", 120)
        expect(done is not None, "no KEEL-EXIT", g)
        expect("CHECK-FAIL" not in g.console(), "a check inside the guest failed", g)
        expect("CHECKS-OK" in g.console(), "the checks did not finish", g)
        expect("KEEL-EXIT 7" in g.console(), "exit status 7 was not reported", g)
        end = g.wait_exit(60)
        expect(end is not None, "QEMU did not exit after KEEL-EXIT", g)
        expect(g.proc.returncode == 0, f"QEMU exit status {g.proc.returncode}", g)
        print(f"TIMING ready {ready:.2f}\nTIMING keel-exit {done:.2f}\nTIMING qemu-exit {end:.2f}")
    finally:
        g.kill()


def test_run_plain(args, accel, tmp):
    # %XX escapes in keel.run, and the kernel's own double quotes around a value with spaces.
    cases = [('keel.run=test%20-d%20/proc/1%20&&%20echo%20100%25%20ok&&exit%203', "KEEL-EXIT 3", "100% ok"),
             ('keel.run="echo quoted run; exit 5"', "KEEL-EXIT 5", "quoted run")]
    guests = [Guest(qemu_args(args.kit, accel, a, []), f"run-plain {i}") for i, (a, _, _) in enumerate(cases)]
    try:
        for g, (_, code, text) in zip(guests, cases):
            done = g.wait_for("KEEL-EXIT", 120)
            expect(done is not None, "no KEEL-EXIT", g)
            expect(code in g.console(), f"expected {code}", g)
            expect(any(l.strip() == text for l in g.lines), f"expected output {text!r}", g)
            expect(g.wait_exit(60) is not None, "QEMU did not exit", g)
            print(f"TIMING {g.name} keel-exit {done:.2f}")
    finally:
        for g in guests:
            g.kill()


def test_acpi(args, accel, tmp):
    sock = os.path.join(tmp, "qmp.sock")
    g = Guest(qemu_args(args.kit, accel, "", ["-qmp", f"unix:{sock},server=on,wait=off"]), "acpi")
    try:
        ready = g.wait_for("KEEL-GUEST-READY", 120)
        expect(ready is not None, "no KEEL-GUEST-READY", g)
        expect(g.wait_for("starting a shell", 30) is not None, "no shell", g)
        sent = time.monotonic()
        replies = qmp(sock, ["system_powerdown"])
        expect(all("return" in r for r in replies), f"QMP replies {replies}", g)
        end = g.wait_exit(30)
        expect(end is not None, "QEMU still runs 30 s after system_powerdown", g)
        expect("ACPI power button" in g.console(), "the guest did not see the power button", g)
        print(f"TIMING ready {ready:.2f}\nTIMING powerdown-to-exit {time.monotonic() - sent:.2f}")
    finally:
        g.kill()


def test_debian(args, accel, tmp):
    image = os.path.join(args.kit, "debian.qcow2")
    if not os.path.exists(image):
        sys.exit(f"{image} is missing: run guest/build.sh debian")
    sock = os.path.join(tmp, "qmp.sock")
    # snapshot=on: writes go to a temporary overlay, the image stays as built.
    extra = ["-drive", f"file={image},format=qcow2,if=none,id=d0,snapshot=on",
             "-device", "virtio-blk-pci,drive=d0",
             "-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0",
             "-qmp", f"unix:{sock},server=on,wait=off"]
    g = Guest(qemu_args(args.kit, accel, "keel.root=/dev/vda1", extra), "debian")
    try:
        switched = g.wait_for("switching to root", 120)
        expect(switched is not None, "the initramfs did not switch to /dev/vda1", g)
        login = g.wait_for("login:", args.login_timeout)
        expect(login is not None, f"no login: prompt within {args.login_timeout} s", g)
        expect(g.wait_for("keel-debian", 1) is not None, "hostname keel-debian not on the console", g)
        print(f"TIMING switch-root {switched:.2f}\nTIMING login-prompt {login:.2f}")
        sent = time.monotonic()
        qmp(sock, ["system_powerdown"])
        end = g.wait_exit(120)
        expect(end is not None, "Debian did not power off within 120 s of system_powerdown", g)
        print(f"TIMING powerdown-to-exit {time.monotonic() - sent:.2f}")
    finally:
        g.kill()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kit", required=True, help="directory holding vmlinuz, initramfs.cpio.gz")
    p.add_argument("--accel-cmd", help="keel-accel binary")
    p.add_argument("--login-timeout", type=int, default=400)
    p.add_argument("test", choices=["run", "run-plain", "acpi", "debian"])
    args = p.parse_args()
    for f in ("vmlinuz", "initramfs.cpio.gz"):
        if not os.path.exists(os.path.join(args.kit, f)):
            sys.exit(f"{args.kit}/{f} is missing: run guest/build.sh")
    accel = accelerator(args.accel_cmd)
    print(f"accelerator: {accel}")
    tests = {"run": test_run, "run-plain": test_run_plain, "acpi": test_acpi, "debian": test_debian}
    with tempfile.TemporaryDirectory(prefix="keel-guest-test.") as tmp:
        try:
            tests[args.test](args, accel, tmp)
        except Failure as e:
            print(f"FAIL: {e}", file=sys.stderr)
            return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
