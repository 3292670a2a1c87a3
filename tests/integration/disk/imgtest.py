"""What the disk integration scripts share: running tools, counting checks, and the closing
'N passed, N failed' line."""
import json
import os
import socket
import subprocess
import time

_failures = []
_passed = 0


def run(*args, check=True, timeout=None):
    p = subprocess.run(list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {p.returncode}: {p.stderr.strip()}")
    return p


def expect(cond, what):
    global _passed
    if cond:
        _passed += 1
    else:
        _failures.append(what)
        print("FAIL:", what, flush=True)


def raw_of(tmp, image):
    """The guest-visible bytes of an image, as qemu-img sees them, in a raw file under tmp."""
    out = os.path.join(tmp, "tmp.raw")
    run("qemu-img", "convert", "-O", "raw", image, out)
    with open(out, "rb") as f:
        return f.read()


def finish():
    """Prints the closing line and returns the exit code."""
    print(f"{_passed} passed, {len(_failures)} failed")
    return 1 if _failures else 0


def _takes_o_direct(directory):
    import mmap
    probe = os.path.join(directory, f".keel-odirect-probe-{os.getpid()}")
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT)
        try:
            os.pwrite(fd, mmap.mmap(-1, 4096), 0)
            return True
        finally:
            os.close(fd)
    except OSError:
        return False
    finally:
        if os.path.exists(probe):
            os.unlink(probe)


def direct_io_dir(tmp):
    """A directory for images opened with O_DIRECT (cache=none): tmp itself when its file system
    takes O_DIRECT, else /var/tmp, else a small ext4 loop mount made under tmp (root; unmounted at
    exit)."""
    import atexit
    import tempfile
    if _takes_o_direct(tmp):
        return tmp
    if _takes_o_direct("/var/tmp"):
        d = tempfile.mkdtemp(prefix="keel-direct-", dir="/var/tmp")
        atexit.register(lambda: subprocess.run(["rm", "-rf", d]))
        return d
    image = os.path.join(tmp, "ext4.img")
    mnt = os.path.join(tmp, "ext4")
    os.mkdir(mnt)
    with open(image, "wb") as f:
        f.truncate(256 << 20)
    run("mkfs.ext4", "-q", "-F", image)
    run("mount", "-o", "loop", image, mnt)
    atexit.register(lambda: subprocess.run(["umount", mnt]))
    return mnt


def wait_unix(path):
    """Waits until something accepts connections on a unix socket (5 s at most)."""
    for _ in range(250):
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.close()
            return True
        except OSError:
            time.sleep(0.02)
    return False


def qemu_io_through_serve(keel, tmp, image, commands):
    """Runs qemu-io COMMANDS against IMAGE served by `keel-img serve` on a unix socket in TMP (qemu-io's
    requests reach keel's driver over NBD), then stops the server (SIGTERM: it flushes and exits 0).
    Returns (qemu-io's CompletedProcess, or None when the server never listened; the server's exit
    code; the server's stderr)."""
    sock = os.path.join(tmp, "nbd.sock")
    server = subprocess.Popen([keel, "serve", "-t", "--socket", sock, image], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        if not wait_unix(sock):
            _, err = server.communicate(timeout=10)
            return None, server.returncode, err
        args = ["qemu-io", "-f", "raw"]
        for c in commands:
            args += ["-c", c]
        client = run(*args, f"nbd+unix:///?socket={sock}", check=False)
        server.terminate()
        _, err = server.communicate(timeout=30)
        return client, server.returncode, err
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def map_shape(map_json):
    """`map --output=json` text without host offsets, adjacent extents of one kind merged: what
    allocation looks like, whichever tool laid the image out."""
    out = []
    for e in json.loads(map_json):
        e.pop("offset", None)
        if out and all(out[-1][k] == e[k] for k in ("depth", "present", "zero", "data")) and \
                out[-1]["start"] + out[-1]["length"] == e["start"]:
            out[-1]["length"] += e["length"]
        else:
            out.append(e)
    return out
