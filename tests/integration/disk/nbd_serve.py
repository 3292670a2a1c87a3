#!/usr/bin/env python3
"""keel-img serve against real NBD clients (qemu-img, qemu-io): handshake (GO, structured replies,
block status), reads, writes, holes, read-only, several clients, TCP on loopback, SIGTERM."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imgtest import run, expect, finish, wait_unix  # noqa: E402

KEEL = sys.argv[1]


def wait_tcp(port):
    for _ in range(250):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.02)
    return False


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def main():
    with tempfile.TemporaryDirectory(prefix="keel-nbd-") as tmp:
        rng = random.Random(9)
        src = os.path.join(tmp, "src.raw")
        with open(src, "wb") as f:
            f.write(rng.randbytes(1 << 20))
            f.seek(3 << 20)
            f.write(rng.randbytes(500000))
            f.truncate(8 << 20)
        img = os.path.join(tmp, "disk.qcow2")
        run("qemu-img", "convert", "-O", "qcow2", src, img)
        sock = os.path.join(tmp, "nbd.sock")
        uri = f"nbd+unix:///?socket={sock}"

        server = subprocess.Popen([KEEL, "serve", "-t", "--shared", "4", "--socket", sock, img],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            expect(wait_unix(sock), "server listens on its unix socket")
            # Reads and holes.
            out = os.path.join(tmp, "out.raw")
            run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, out)
            with open(out, "rb") as a, open(src, "rb") as b:
                expect(a.read() == b.read(), "whole disk reads identically over NBD")
            m = json.loads(run("qemu-img", "map", "-f", "raw", "--output=json", uri).stdout)
            holes = [e for e in m if e["zero"] and not e["data"]]
            expect(any(e["start"] <= (1 << 20) and e["start"] + e["length"] >= (3 << 20) for e in holes),
                   f"block status shows the hole between 1 MiB and 3 MiB: {m}")
            info = run("qemu-img", "info", "-f", "raw", "--output=json", uri).stdout
            expect(json.loads(info)["virtual-size"] == 8 << 20, "export size")
            # Writes, zeroes, discard, flush through qemu-io.
            p = run("qemu-io", "-f", "raw", "-c", "write -P 0x61 12345 100000", "-c", "write -z 2000000 300000",
                    "-c", "discard 5242880 1048576", "-c", "flush", "-c", "read -P 0x61 12345 100000",
                    "-c", "read -P 0 2000000 300000", uri, check=False)
            expect(p.returncode == 0 and "Pattern verification failed" not in p.stdout, f"qemu-io over NBD: {p.stdout[-400:]}{p.stderr[-400:]}")
            # Several clients at once.
            procs = [subprocess.Popen(["qemu-io", "-f", "raw", "-c", f"write -P {0x70 + i} {(6 << 20) + i * 65536} 65536",
                                       "-c", f"read -P {0x70 + i} {(6 << 20) + i * 65536} 65536", uri],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
            outs = [p.communicate(timeout=60) for p in procs]
            expect(all(p.returncode == 0 and "failed" not in o[0] for p, o in zip(procs, outs)), "three clients at once")
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        expect(server.returncode == 0, f"server exits cleanly on SIGTERM ({server.returncode}): {server.stderr.read().decode()[-300:]}")
        p = run("qemu-img", "check", img, check=False)
        expect(p.returncode == 0, f"image clean after serving writes: {p.stdout[-300:]}")
        p = run("qemu-io", "-f", "qcow2", "-c", "read -P 0x61 12345 100000", "-c", f"read -P 0x71 {(6 << 20) + 65536} 65536", img, check=False)
        expect(p.returncode == 0 and "failed" not in p.stdout, "writes landed in the image")

        # Read-only over TCP; the server exits after its client leaves (no -t).
        port = free_port()
        server = subprocess.Popen([KEEL, "serve", "--read-only", "--port", str(port), img],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            expect(wait_tcp(port), "server listens on 127.0.0.1")
            # wait_tcp's probe counts as the first client; serve again for the real one
        finally:
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        expect(server.returncode == 0, "non-persistent server exits after its client")
        server = subprocess.Popen([KEEL, "serve", "--read-only", "-t", "--port", str(port), img],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_tcp(port)
            turi = f"nbd://127.0.0.1:{port}"
            p = run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4096", turi, check=False)
            expect("failed" in (p.stdout + p.stderr).lower() or p.returncode != 0 or "read-only" in (p.stdout + p.stderr).lower(),
                   f"read-only export refuses writes: {p.stdout} {p.stderr}")
            p = run("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x61 12345 100000", turi, check=False)
            expect(p.returncode == 0 and "failed" not in p.stdout, "read-only export reads over TCP")
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=20)

        # Garbage from a client: the server drops it and keeps serving.
        server = subprocess.Popen([KEEL, "serve", "-t", "--socket", sock, img], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_unix(sock)
            for junk in (b"\0" * 100, os.urandom(4096), b"NBDMAGIC" * 10):
                s = socket.socket(socket.AF_UNIX)
                s.connect(sock)
                s.recv(18)
                try:
                    s.sendall(junk)
                except OSError:
                    pass
                s.close()
            p = run("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x61 12345 100000", uri, check=False)
            expect(p.returncode == 0 and "failed" not in p.stdout, "server survives garbage clients")
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=20)
            expect(server.returncode == 0, "server exits cleanly after garbage")

    return finish()


if __name__ == "__main__":
    sys.exit(main())
