#!/usr/bin/env python3
"""keel-img writes qcow2 images with extended L2 entries (subclusters) the way qemu does.

For several cluster sizes, with and without a backing file, the same random small writes,
write-zeroes and discards go to two images: a reference through qemu-io, and keel's through
`keel-img serve` (qemu-io over NBD, so every request reaches keel's qcow2 driver). Then
`qemu-img check` must be clean, `qemu-img compare` identical, and `qemu-img map` must show the same
subcluster-granular allocation (host offsets aside). `create` and `convert -o extended_l2=on` too.
"""
import json
import os
import random
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imgtest import run, expect, finish, map_shape, qemu_io_through_serve  # noqa: E402

KEEL = sys.argv[1]
SIZE = 5 << 20 | 3 << 9  # not a multiple of any cluster size: the short last cluster counts too


def random_ops(rng, cluster_size, count):
    """qemu-io commands. Zeroes and discards are 512-aligned: qemu's NBD client pads anything else
    into a read-modify-write of data, which would not be the same request any more."""
    ops = []
    sub = cluster_size // 32
    for _ in range(count):
        kind = rng.random()
        if kind < 0.55:
            length = rng.choice([1, 100, 511, 4096, sub, sub + 700, 3 * sub, cluster_size, 2 * cluster_size + 5])
            length = min(length, 3 << 20)
            start = rng.randrange(0, SIZE - length)
            if rng.random() < 0.3:
                start -= start % sub
            ops.append(f"write -P {rng.randrange(1, 256)} {start} {length}")
        elif kind < 0.8:
            length = min(rng.choice([512, 1024, sub, 2 * sub, cluster_size, 3 * cluster_size]), 1 << 20)
            start = rng.randrange(0, (SIZE - length) // 512) * 512
            if rng.random() < 0.4:
                start -= start % sub
            ops.append(f"write -z {start} {length}")
        else:
            length = min(rng.choice([512, sub, cluster_size, 2 * cluster_size]), 1 << 20)
            start = rng.randrange(0, (SIZE - length) // 512) * 512
            if rng.random() < 0.5:
                start -= start % cluster_size
            ops.append(f"discard {start} {length}")
    # The short last cluster and the very last bytes of the disk.
    ops.append(f"write -P 0x7e {SIZE - 700} 700")
    ops.append(f"write -z {SIZE - 1024} 1024")
    return ops


def qemu_io(target, ops, fmt):
    args = ["qemu-io", "-f", fmt]
    for c in ops:
        args += ["-c", c]
    run(*args, target)


def keel_io(tmp, image, ops):
    client, code, err = qemu_io_through_serve(KEEL, tmp, image, ops)
    if client is None:
        raise RuntimeError(f"keel-img serve did not listen: {err.strip()}")
    if client.returncode != 0:
        raise RuntimeError(f"qemu-io through keel-img serve exited {client.returncode}: {client.stderr.strip()}")
    expect(code == 0, f"keel-img serve exits cleanly ({code}: {err.strip()[-200:]})")


def same_image(mine, ref, label):
    p = run("qemu-img", "check", mine, check=False)
    expect(p.returncode == 0, f"{label}: qemu-img check clean: {p.stdout.strip()[-300:]} {p.stderr.strip()[-200:]}")
    p = run(KEEL, "check", mine, check=False)
    expect(p.returncode == 0, f"{label}: keel-img check clean: {p.stdout.strip()[-300:]} {p.stderr.strip()[-200:]}")
    p = run("qemu-img", "compare", mine, ref, check=False)
    expect(p.returncode == 0, f"{label}: qemu-img compare identical: {p.stdout.strip()} {p.stderr.strip()}")
    a = map_shape(run("qemu-img", "map", "--output=json", mine).stdout)
    b = map_shape(run("qemu-img", "map", "--output=json", ref).stdout)
    if a != b:
        for x, y in zip(a, b):
            if x != y:
                print("  keel:", x, "\n  qemu:", y)
                break
    expect(a == b, f"{label}: qemu-img map shows the same subcluster allocation")
    for image in (mine, ref):
        km = run(KEEL, "map", "--output=json", image, check=False).stdout
        qm = run("qemu-img", "map", "--output=json", image).stdout
        expect(km and json.loads(km) == json.loads(qm), f"{label}: keel-img map of {os.path.basename(image)} == qemu-img's")
    info = json.loads(run("qemu-img", "info", "--output=json", mine).stdout)
    expect(info["format-specific"]["data"].get("extended-l2") is True, f"{label}: extended-l2 in qemu-img info")


def main():
    with tempfile.TemporaryDirectory(prefix="keel-subclusters-") as tmp:
        rng = random.Random(int(os.environ.get("KEEL_TEST_SEED", "2026")))
        src = os.path.join(tmp, "src.raw")
        with open(src, "wb") as f:
            f.truncate(SIZE)
            for _ in range(40):
                f.seek(rng.randrange(0, SIZE - 100000))
                f.write(rng.randbytes(rng.choice([700, 5000, 70000])))
        base = os.path.join(tmp, "base.qcow2")
        run("qemu-img", "convert", "-O", "qcow2", "-o", "cluster_size=4096", src, base)
        qemu_io(base, ["write -z 1048576 131072"], "qcow2")

        for cs in [16384, 65536, 524288, 2 << 20]:
            for backing in [False, True]:
                label = f"cluster_size={cs}{' over a backing file' if backing else ''}"
                ref = os.path.join(tmp, "ref.qcow2")
                mine = os.path.join(tmp, "mine.qcow2")
                opts = ["-o", f"extended_l2=on,cluster_size={cs}"]
                chain = ["-b", "base.qcow2", "-F", "qcow2"] if backing else []
                run("qemu-img", "create", "-q", "-f", "qcow2", *opts, *chain, ref, str(SIZE))
                p = run(KEEL, "create", "-f", "qcow2", *opts, *chain, mine, str(SIZE), check=False)
                expect(p.returncode == 0, f"{label}: keel-img create: {p.stderr.strip()}")
                if p.returncode != 0:
                    continue
                ops = random_ops(rng, cs, 150)
                qemu_io(ref, ops, "qcow2")
                keel_io(tmp, mine, ops)
                same_image(mine, ref, label)
                # Overwrites in place and across subclusters, a second session on the same images.
                ops = random_ops(rng, cs, 60)
                qemu_io(ref, ops, "qcow2")
                keel_io(tmp, mine, ops)
                same_image(mine, ref, f"{label}, second session")

        # Internal snapshots: writes into clusters a snapshot shares copy every allocated subcluster
        # (qemu's rule), and reverting brings the old bitmaps back.
        for label, cs in [("snapshot, 64 KiB clusters", 65536), ("snapshot, 16 KiB clusters", 16384)]:
            ref = os.path.join(tmp, "ref.qcow2")
            mine = os.path.join(tmp, "mine.qcow2")
            opts = ["-o", f"extended_l2=on,cluster_size={cs}", "-b", "base.qcow2", "-F", "qcow2"]
            run("qemu-img", "create", "-q", "-f", "qcow2", *opts, ref, str(SIZE))
            run(KEEL, "create", "-f", "qcow2", *opts, mine, str(SIZE))
            ops = random_ops(rng, cs, 60)
            qemu_io(ref, ops, "qcow2")
            keel_io(tmp, mine, ops)
            run("qemu-img", "snapshot", "-c", "s", ref)
            p = run(KEEL, "snapshot", "-c", "s", mine, check=False)
            expect(p.returncode == 0, f"{label}: keel-img snapshot -c: {p.stderr.strip()}")
            ops = random_ops(rng, cs, 60)
            qemu_io(ref, ops, "qcow2")
            keel_io(tmp, mine, ops)
            same_image(mine, ref, f"{label}: writes over the snapshot")
            run("qemu-img", "snapshot", "-a", "s", ref)
            p = run(KEEL, "snapshot", "-a", "s", mine, check=False)
            expect(p.returncode == 0, f"{label}: keel-img snapshot -a: {p.stderr.strip()}")
            same_image(mine, ref, f"{label}: reverted")

        # convert writes every cluster whole; the result reads like its source.
        out = os.path.join(tmp, "conv.qcow2")
        for extra in ["", ",compression_type=zstd"]:
            p = run(KEEL, "convert", "-O", "qcow2", "-o", f"extended_l2=on,cluster_size=32768{extra}", src, out,
                    check=False)
            expect(p.returncode == 0, f"convert -o extended_l2=on{extra}: {p.stderr.strip()}")
            if p.returncode == 0:
                p = run("qemu-img", "compare", src, out, check=False)
                expect(p.returncode == 0, f"convert{extra}: qemu-img compare identical: {p.stdout.strip()}")
                p = run("qemu-img", "check", out, check=False)
                expect(p.returncode == 0, f"convert{extra}: qemu-img check clean: {p.stdout.strip()[-200:]}")
        p = run(KEEL, "convert", "-c", "-O", "qcow2", "-o", "extended_l2=on", src, out, check=False)
        expect(p.returncode == 0, f"convert -c -o extended_l2=on: {p.stderr.strip()}")
        if p.returncode == 0:
            # Partial writes into compressed clusters copy the whole cluster.
            ops = ["write -P 9 70000 100", "write -z 131072 4096", "write -P 8 1000000 70000"]
            ref = os.path.join(tmp, "ref.qcow2")
            run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "extended_l2=on", src, ref)
            qemu_io(ref, ops, "qcow2")
            keel_io(tmp, out, ops)
            p = run("qemu-img", "compare", ref, out, check=False)
            expect(p.returncode == 0, f"writes into compressed clusters: identical: {p.stdout.strip()}")
            p = run("qemu-img", "check", out, check=False)
            expect(p.returncode == 0, f"writes into compressed clusters: check clean: {p.stdout.strip()[-200:]}")

        # measure counts 16-byte L2 entries.
        for opts in ["extended_l2=on", "extended_l2=on,cluster_size=16k", "extended_l2=on,cluster_size=2M"]:
            for size in ["10G", "1T"]:
                q = json.loads(run("qemu-img", "measure", "-O", "qcow2", "-o", opts, "--size", size, "--output=json").stdout)
                k = json.loads(run(KEEL, "measure", "-O", "qcow2", "-o", opts, "--size", size, "--output=json").stdout)
                expect(all(q[x] == k.get(x) for x in q), f"measure -o {opts} --size {size}: {k} == qemu's {q}")

        # Clusters too small for subclusters are refused clearly, as qemu-img refuses them.
        p = run(KEEL, "create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=8192", out, "1M", check=False)
        expect(p.returncode != 0 and "16 KiB" in p.stderr, f"8 KiB clusters refused: {p.stderr.strip()}")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
