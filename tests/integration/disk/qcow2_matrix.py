#!/usr/bin/env python3
"""qcow2 interoperability matrix against qemu-img 7.2.

Images made by qemu-img (every cluster size, refcount width, compression type, extended L2, v2,
backing chains, snapshots, preallocation) must read byte-identically through keel-img, and map and
check must agree with qemu-img. Images written by keel-img (the same variants) must pass
`qemu-img check` and `qemu-img compare`.
"""
import json
import os
import random
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imgtest import run, expect, finish  # noqa: E402

KEEL = sys.argv[1]
QEMU_IMG = "qemu-img"
QEMU_IO = "qemu-io"


def make_source(path, size):
    """A raw disk with data, zero runs, holes and partial-sector patterns."""
    rng = random.Random(42)
    with open(path, "wb") as f:
        f.truncate(size)
        pos = 0
        while pos < size:
            kind = rng.random()
            length = rng.choice([512, 4096, 65536, 200000, 1 << 20])
            length = min(length, size - pos)
            f.seek(pos)
            if kind < 0.35:
                f.write(rng.randbytes(length))
            elif kind < 0.5:
                f.write(bytes([rng.randrange(256)]) * length)  # compressible
            elif kind < 0.6:
                f.write(b"\0" * length)  # explicit zeros (allocated in the file)
            pos += length


def qemu_io(image, *cmds, fmt="qcow2"):
    args = [QEMU_IO, "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run(*args, image)


def read_raw(path):
    with open(path, "rb") as f:
        return f.read()


def compare_read(tmp, image, label):
    """keel-img convert -O raw must equal qemu-img convert -O raw; map and check must agree."""
    ref = os.path.join(tmp, "ref.raw")
    out = os.path.join(tmp, "out.raw")
    run(QEMU_IMG, "convert", "-O", "raw", image, ref)
    p = run(KEEL, "convert", "-O", "raw", image, out, check=False)
    if p.returncode != 0:
        expect(False, f"{label}: keel-img convert failed: {p.stderr.strip()}")
        return
    expect(read_raw(ref) == read_raw(out), f"{label}: keel-img reads what qemu-img reads")
    qm = run(QEMU_IMG, "map", "--output=json", image).stdout
    km = run(KEEL, "map", "--output=json", image, check=False).stdout
    same = json.loads(qm) == json.loads(km) if km else False
    if not same and km:
        for a, b in zip(json.loads(qm), json.loads(km)):
            if a != b:
                print("  qemu:", a, "\n  keel:", b)
                break
    expect(same, f"{label}: map --output=json matches qemu-img")
    kc = run(KEEL, "check", image, check=False)
    expect(kc.returncode == 0, f"{label}: keel-img check is clean (rc {kc.returncode}: {kc.stderr.strip()[:200]})")
    qc = json.loads(run(QEMU_IMG, "check", "--output=json", image).stdout)
    kcj = run(KEEL, "check", "--output=json", image, check=False).stdout
    if kcj:
        kcj = json.loads(kcj)
        for key in ("allocated-clusters", "total-clusters", "compressed-clusters", "fragmented-clusters", "image-end-offset"):
            expect(qc.get(key) == kcj.get(key), f"{label}: check {key} {kcj.get(key)} == qemu's {qc.get(key)}")


def check_written(tmp, image, source, label):
    p = run(QEMU_IMG, "check", image, check=False)
    expect(p.returncode == 0, f"{label}: qemu-img check of keel's image is clean: {p.stdout.strip()[-300:]} {p.stderr.strip()[-300:]}")
    p = run(QEMU_IMG, "compare", source, image, check=False)
    expect(p.returncode == 0, f"{label}: qemu-img compare says identical: {p.stdout.strip()} {p.stderr.strip()}")


def main():
    with tempfile.TemporaryDirectory(prefix="keel-qcow2-matrix-") as tmp:
        src = os.path.join(tmp, "src.raw")
        size = 6 << 20
        make_source(src, size)
        img = os.path.join(tmp, "img.qcow2")
        mine = os.path.join(tmp, "mine.qcow2")

        variants = []
        for cs in [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1 << 20, 2 << 20]:
            variants.append((f"cluster_size={cs}", f"cluster_size={cs}"))
        for rb in [1, 2, 4, 8, 16, 32, 64]:
            variants.append((f"refcount_bits={rb}", f"refcount_bits={rb},cluster_size=4096"))
        variants.append(("compat=0.10", "compat=0.10"))
        variants.append(("lazy_refcounts", "lazy_refcounts=on"))
        variants.append(("zstd", "compression_type=zstd"))
        for cs in [16384, 65536, 2 << 20]:
            variants.append((f"extended_l2 cluster_size={cs}", f"extended_l2=on,cluster_size={cs}"))

        for label, opts in variants:
            # qemu-img writes it; keel-img reads it.
            run(QEMU_IMG, "convert", "-O", "qcow2", "-o", opts, src, img)
            # Partial writes, zero writes and discards on top, through qemu's own write path.
            qemu_io(img, "write -P 0x5a 3000 5000", "write -z 1048576 131072", "discard 2097152 65536",
                    "write -P 0x11 5242880 512")
            compare_read(tmp, img, f"read {label}")
            # Compressed, both types.
            if "extended_l2" not in opts and "compat=0.10" not in opts:
                for ctype in ["zlib", "zstd"]:
                    run(QEMU_IMG, "convert", "-c", "-O", "qcow2", "-o", f"{opts},compression_type={ctype}", src, img)
                    compare_read(tmp, img, f"read compressed {ctype} {label}")
            # keel-img writes it; qemu-img checks and compares it.
            p = run(KEEL, "convert", "-O", "qcow2", "-o", opts, src, mine, check=False)
            expect(p.returncode == 0, f"write {label}: keel-img convert: {p.stderr.strip()}")
            if p.returncode == 0:
                check_written(tmp, mine, src, f"write {label}")
            if "compat=0.10" not in opts:
                for ctype in ["zlib", "zstd"]:
                    p = run(KEEL, "convert", "-c", "-O", "qcow2", "-o", f"{opts},compression_type={ctype}", src, mine, check=False)
                    expect(p.returncode == 0, f"write compressed {ctype} {label}: {p.stderr.strip()}")
                    if p.returncode == 0:
                        check_written(tmp, mine, src, f"write compressed {ctype} {label}")
                        compare_read(tmp, mine, f"reread compressed {ctype} {label}")

        # Backing chains: base <- mid <- top, each layer with its own writes.
        base = os.path.join(tmp, "base.qcow2")
        mid = os.path.join(tmp, "mid.qcow2")
        top = os.path.join(tmp, "top.qcow2")
        run(QEMU_IMG, "convert", "-O", "qcow2", src, base)
        run(QEMU_IMG, "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid)
        qemu_io(mid, "write -P 0x22 0 70000", "write -z 4194304 65536")
        run(QEMU_IMG, "create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "mid.qcow2", "-F", "qcow2", top)
        qemu_io(top, "write -P 0x33 65536 8192", "write -P 0x44 6290000 500")
        compare_read(tmp, top, "read backing chain of 3")
        rawbase = os.path.join(tmp, "rawbase.raw")
        run(QEMU_IMG, "convert", "-O", "raw", src, rawbase)
        run(QEMU_IMG, "create", "-f", "qcow2", "-b", "rawbase.raw", "-F", "raw", top)
        qemu_io(top, "write -P 0x55 100000 300000")
        compare_read(tmp, top, "read raw backing")
        # A deep chain: 20 layers.
        prev = "base.qcow2"
        for i in range(20):
            layer = os.path.join(tmp, f"layer{i}.qcow2")
            run(QEMU_IMG, "create", "-f", "qcow2", "-b", prev, "-F", "qcow2", layer)
            qemu_io(layer, f"write -P {i + 1} {i * 300000} 4096")
            prev = os.path.basename(layer)
        compare_read(tmp, os.path.join(tmp, prev), "read 20-deep chain")

        # keel-img writes an overlay; its partial writes must pull in the backing data.
        ov = os.path.join(tmp, "ov.qcow2")
        p = run(KEEL, "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", ov, check=False)
        expect(p.returncode == 0, f"keel-img create overlay: {p.stderr.strip()}")
        p = run(KEEL, "convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", top, os.path.join(tmp, "ov2.qcow2"), check=False)
        expect(p.returncode == 0, f"keel-img convert -B: {p.stderr.strip()}")
        if p.returncode == 0:
            check_written(tmp, os.path.join(tmp, "ov2.qcow2"), top, "convert -B")
            info = json.loads(run(QEMU_IMG, "info", "--output=json", os.path.join(tmp, "ov2.qcow2")).stdout)
            expect(info.get("backing-filename") == "base.qcow2", "convert -B sets the backing file")

        # Snapshots made by qemu-img: the active layer reads right; keel-img lists them.
        run(QEMU_IMG, "convert", "-O", "qcow2", src, img)
        run(QEMU_IMG, "snapshot", "-c", "first", img)
        qemu_io(img, "write -P 0x66 0 1048576")
        run(QEMU_IMG, "snapshot", "-c", "second", img)
        qemu_io(img, "write -P 0x77 65536 4096")
        compare_read(tmp, img, "read image with snapshots")
        listing = run(KEEL, "snapshot", "-l", img).stdout
        expect("first" in listing and "second" in listing, "keel-img snapshot -l lists qemu's snapshots")
        qi = json.loads(run(QEMU_IMG, "info", "--output=json", img).stdout)
        ki = json.loads(run(KEEL, "info", "--output=json", img).stdout)
        for key in ("virtual-size", "cluster-size", "format", "format-specific", "dirty-flag"):
            expect(qi.get(key) == ki.get(key), f"info {key}: {ki.get(key)} == {qi.get(key)}")
        expect([s["name"] for s in qi["snapshots"]] == [s["name"] for s in ki["snapshots"]], "info snapshots")

        # Preallocation modes, made by qemu-img and by keel-img.
        for mode in ["metadata", "falloc", "full"]:
            run(QEMU_IMG, "create", "-f", "qcow2", "-o", f"preallocation={mode}", img, "3M")
            qemu_io(img, "write -P 0x12 4096 100000")
            compare_read(tmp, img, f"read preallocation={mode}")
            p = run(KEEL, "create", "-f", "qcow2", "-o", f"preallocation={mode}", mine, "3M", check=False)
            expect(p.returncode == 0, f"keel-img create preallocation={mode}: {p.stderr.strip()}")
            p = run(QEMU_IMG, "check", mine, check=False)
            expect(p.returncode == 0, f"qemu-img check of keel preallocation={mode}: {p.stdout.strip()[-200:]}")
            qemu_io(mine, "write -P 0x12 4096 100000")
            compare_read(tmp, mine, f"reread keel preallocation={mode}")

        # VMDK: what qemu-img writes, keel-img reads; what keel-img writes, qemu-img reads.
        for sub in ["monolithicSparse", "streamOptimized", "monolithicFlat", "twoGbMaxExtentSparse"]:
            vdir = os.path.join(tmp, f"vmdk-{sub}")
            os.mkdir(vdir)
            v = os.path.join(vdir, "disk.vmdk")
            run(QEMU_IMG, "convert", "-O", "vmdk", "-o", f"subformat={sub}", src, v)
            out = os.path.join(tmp, "vmdk.raw")
            p = run(KEEL, "convert", "-O", "raw", v, out, check=False)
            expect(p.returncode == 0, f"vmdk {sub}: keel-img reads it: {p.stderr.strip()}")
            if p.returncode == 0:
                expect(read_raw(out)[:size] == read_raw(src), f"vmdk {sub}: keel-img reads what was written")
            info = run(KEEL, "info", "--output=json", v, check=False).stdout
            expect(info and json.loads(info)["format-specific"]["data"]["create-type"] == sub, f"vmdk {sub}: create type")
        for sub in ["monolithicSparse", "streamOptimized"]:
            v = os.path.join(tmp, f"keel-{sub}.vmdk")
            p = run(KEEL, "convert", "-O", "vmdk", "-o", f"subformat={sub}", src, v, check=False)
            expect(p.returncode == 0, f"keel-img writes vmdk {sub}: {p.stderr.strip()}")
            q = run(QEMU_IMG, "check", v, check=False)
            expect(q.returncode == 0, f"qemu-img check of keel's vmdk {sub}: {q.stdout} {q.stderr}")
            q = run(QEMU_IMG, "compare", src, v, check=False)
            expect(q.returncode == 0, f"qemu-img compare of keel's vmdk {sub}: {q.stdout} {q.stderr}")
            info = json.loads(run(QEMU_IMG, "info", "--output=json", v).stdout)
            expect(info["format-specific"]["data"]["create-type"] == sub, f"qemu-img sees create type {sub}")

    return finish()


if __name__ == "__main__":
    sys.exit(main())
