#!/usr/bin/env python3
"""cache=none (O_DIRECT) through keel-img: convert -t none / -T none with qcow2 on both sides and a
backing chain, bench -t none and --nocache (-n) writes, serve --cache=none under qemu-io; qemu-img
check is clean and compare identical. A file system without O_DIRECT gives a clear error."""
import os
import random
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imgtest import run, expect, finish, wait_unix, direct_io_dir  # noqa: E402

KEEL = sys.argv[1]


def clean_and_same(image, reference, label):
    p = run("qemu-img", "check", image, check=False)
    expect(p.returncode == 0, f"{label}: qemu-img check clean: {p.stdout.strip()[-300:]} {p.stderr.strip()[-200:]}")
    if reference:
        p = run("qemu-img", "compare", reference, image, check=False)
        expect(p.returncode == 0, f"{label}: qemu-img compare identical: {p.stdout.strip()} {p.stderr.strip()}")


def main():
    with tempfile.TemporaryDirectory(prefix="keel-direct-") as tmp:
        d = direct_io_dir(tmp)
        rng = random.Random(11)
        size = (6 << 20) + 1536  # a virtual size that is not a multiple of 4 KiB
        src = os.path.join(d, "src.raw")
        with open(src, "wb") as f:
            f.truncate(size)
            for _ in range(30):
                f.seek(rng.randrange(0, size - 80000))
                f.write(rng.randbytes(rng.choice([333, 4096, 70001])))
        # A chain: base (qemu) <- top (qemu, small clusters, unaligned writes).
        base = os.path.join(d, "base.qcow2")
        top = os.path.join(d, "top.qcow2")
        run("qemu-img", "convert", "-O", "qcow2", src, base)
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b", "base.qcow2", "-F", "qcow2",
            top)
        run("qemu-io", "-f", "qcow2", "-c", "write -P 7 1000 5000", "-c", "write -z 70000 3000", top)

        # convert, every combination of source and destination cache modes.
        out = os.path.join(d, "out.qcow2")
        for t in ["none", "writeback"]:
            for T in ["none", "writeback"]:
                for opts in ["cluster_size=65536", "cluster_size=512,refcount_bits=1", "extended_l2=on,cluster_size=16k"]:
                    label = f"convert -t {t} -T {T} -o {opts}"
                    p = run(KEEL, "convert", "-t", t, "-T", T, "-O", "qcow2", "-o", opts, top, out, check=False)
                    expect(p.returncode == 0, f"{label}: {p.stderr.strip()}")
                    if p.returncode == 0:
                        clean_and_same(out, top, label)
        p = run(KEEL, "convert", "-t", "none", "-c", "-O", "qcow2", src, out, check=False)
        expect(p.returncode == 0, f"convert -c -t none: {p.stderr.strip()}")
        clean_and_same(out, src, "convert -c -t none (compressed clusters packed at byte offsets)")
        p = run(KEEL, "convert", "-T", "none", "-O", "raw", out, os.path.join(d, "back.raw"), check=False)
        expect(p.returncode == 0, f"convert -T none of a compressed image: {p.stderr.strip()}")
        p = run("qemu-img", "compare", src, os.path.join(d, "back.raw"), check=False)
        expect(p.returncode == 0, f"compressed image read with O_DIRECT is identical: {p.stdout.strip()}")

        # bench writes with O_DIRECT, on an overlay (reads of the backing file go direct too).
        for flag, opts in [(["-t", "none"], "cluster_size=65536"), (["-n"], "cluster_size=4096,extended_l2=off"),
                           (["-t", "none"], "extended_l2=on,cluster_size=32768")]:
            ov = os.path.join(d, "ov.qcow2")
            run(KEEL, "create", "-f", "qcow2", "-o", opts, "-b", "base.qcow2", "-F", "qcow2", ov)
            label = f"bench {' '.join(flag)} -o {opts}"
            p = run(KEEL, "bench", *flag, "-w", "-c", "3000", "-d", "4", "-s", "3000", "--pattern=random", ov,
                    check=False)
            expect(p.returncode == 0, f"{label}: {p.stderr.strip()}")
            clean_and_same(ov, None, label)
            p = run(KEEL, "check", ov, check=False)
            expect(p.returncode == 0, f"{label}: keel-img check clean: {p.stdout.strip()[-200:]}")

        # serve --cache=none: qemu-io's writes land through O_DIRECT; compared with the same writes
        # done by qemu-io on a copy.
        mine = os.path.join(d, "served.qcow2")
        ref = os.path.join(d, "ref.qcow2")
        run(KEEL, "create", "-f", "qcow2", "-o", "cluster_size=1024", "-b", "base.qcow2", "-F", "qcow2", mine)
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", ref)
        ops = []
        for _ in range(60):
            start = rng.randrange(0, size - 70000)
            ops += ["-c", f"write -P {rng.randrange(256)} {start} {rng.choice([1, 700, 4096, 65536])}"]
        ops += ["-c", "write -z 1048576 8192", "-c", "discard 2097152 65536", "-c", "flush"]
        for mode in [["--cache=none"], ["-n"]]:
            sock = os.path.join(tmp, "nbd.sock")
            server = subprocess.Popen([KEEL, "serve", "-t", *mode, "--socket", sock, mine],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                expect(wait_unix(sock), f"serve {mode[0]} listens")
                run("qemu-io", "-f", "raw", *ops, f"nbd+unix:///?socket={sock}")
                server.terminate()
                _, err = server.communicate(timeout=30)
                expect(server.returncode == 0, f"serve {mode[0]} exits cleanly: {err.strip()[-200:]}")
            finally:
                if server.poll() is None:
                    server.kill()
                    server.wait()
            run("qemu-io", "-f", "qcow2", *ops, ref)
            clean_and_same(mine, ref, f"serve {mode[0]}")

        # A file system without O_DIRECT (ramfs): a clear error, not a crash or silent fallback.
        ramfs = os.path.join(tmp, "ramfs")
        os.mkdir(ramfs)
        run("mount", "-t", "ramfs", "keel-test-ramfs", ramfs)
        try:
            img = os.path.join(ramfs, "x.qcow2")
            run(KEEL, "create", "-f", "qcow2", img, "1M")
            p = run(KEEL, "bench", "-t", "none", "-c", "10", img, check=False)
            expect(p.returncode != 0 and "does not support O_DIRECT" in p.stderr,
                   f"bench -t none on ramfs: clear error: {p.stderr.strip()}")
            p = run(KEEL, "convert", "-t", "none", "-O", "qcow2", src, img, check=False)
            expect(p.returncode != 0 and "does not support O_DIRECT" in p.stderr,
                   f"convert -t none onto ramfs: clear error: {p.stderr.strip()}")
            p = run(KEEL, "convert", "-O", "qcow2", src, img, check=False)
            expect(p.returncode == 0, f"convert through the page cache onto ramfs works: {p.stderr.strip()}")
        finally:
            run("umount", ramfs, check=False)
    return finish()


if __name__ == "__main__":
    sys.exit(main())
