#!/usr/bin/env python3
"""Refcount structure damage, made by hand in images qemu-img wrote: keel-img check reports it as
qemu-img check does (same counts, same exit code), `keel-img check -r all` rebuilds the refcount
structure, and then qemu-img check is clean and the data compares identical to the original."""
import json
import os
import shutil
import struct
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imgtest import run, expect, finish  # noqa: E402

KEEL = sys.argv[1]
COUNTS = ("corruptions", "leaks", "check-errors", "image-end-offset", "allocated-clusters")


def header(path):
    with open(path, "rb") as f:
        h = f.read(104)
    cluster_size = 1 << struct.unpack(">I", h[20:24])[0]
    rt_offset, rt_clusters = struct.unpack(">QI", h[48:60])
    return cluster_size, rt_offset, rt_clusters


def set_reftable_entry(path, index, value):
    _, rt_offset, _ = header(path)
    with open(path, "r+b") as f:
        f.seek(rt_offset + index * 8)
        f.write(struct.pack(">Q", value))


def set_reftable_clusters(path, clusters):
    with open(path, "r+b") as f:
        f.seek(56)
        f.write(struct.pack(">I", clusters))


def check_json(tool, image):
    p = run(tool, "check", "--output=json", image, check=False)
    try:
        return p.returncode, json.loads(p.stdout)
    except json.JSONDecodeError:
        return p.returncode, {"stderr": p.stderr[-300:]}


def damaged_copy_checked(tmp, name, original, damage, counts=COUNTS):
    """A copy of `original` with `damage` done to it, whose check report (exit code and `counts`)
    must be qemu-img's. Returns the copy's path."""
    image = os.path.join(tmp, f"{name}.qcow2")
    shutil.copy(original, image)
    damage(image)
    krc, kj = check_json(KEEL, image)
    qrc, qj = check_json("qemu-img", image)
    expect(krc == qrc and krc != 0, f"{name}: check exit codes keel {krc}, qemu-img {qrc}")
    for key in counts:
        expect(kj.get(key) == qj.get(key), f"{name}: {key}: keel {kj.get(key)}, qemu-img {qj.get(key)}")
    return image


def scenario(tmp, name, original, damage, same_repair=True):
    image = damaged_copy_checked(tmp, name, original, damage)
    repaired_by_qemu = os.path.join(tmp, f"{name}-qemu.qcow2")
    shutil.copy(image, repaired_by_qemu)
    p = run(KEEL, "check", "-r", "all", "--output=json", image, check=False)
    expect(p.returncode == 0, f"{name}: keel-img check -r all exit {p.returncode}: {p.stderr[-400:]}")
    q = run("qemu-img", "check", image, check=False)
    expect(q.returncode == 0, f"{name}: qemu-img check after the repair exit {q.returncode}: {q.stderr[-400:]}")
    c = run("qemu-img", "compare", original, image, check=False)
    expect(c.returncode == 0, f"{name}: data identical after the repair: {c.stdout.strip()}")
    if same_repair:
        # qemu-img's own repair of the same damage ends at the same place (same counts fixed).
        qr = run("qemu-img", "check", "-r", "all", "--output=json", repaired_by_qemu, check=False)
        try:
            mine, theirs = json.loads(p.stdout), json.loads(qr.stdout)
            for key in ("corruptions-fixed", "leaks-fixed", "image-end-offset"):
                expect(mine.get(key) == theirs.get(key), f"{name}: -r all {key}: keel {mine.get(key)}, qemu-img {theirs.get(key)}")
        except json.JSONDecodeError:
            expect(False, f"{name}: -r all JSON: {p.stdout[-200:]} / {qr.stdout[-200:]}")


def set_subcluster_bitmap(path, l2_index, bitmap):
    """Overwrites the bitmap of entry l2_index in the first L2 table of an extended-L2 image."""
    with open(path, "r+b") as f:
        h = f.read(104)
        l1_offset = struct.unpack(">Q", h[40:48])[0]
        f.seek(l1_offset)
        l2_offset = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
        f.seek(l2_offset + l2_index * 16 + 8)
        f.write(struct.pack(">Q", bitmap))


def report_only(tmp, name, original, damage):
    """Damage no tool repairs (qemu-img 7.2 only reports it): the same report, line for line."""
    image = damaged_copy_checked(tmp, name, original, damage, COUNTS + ("compressed-clusters", "fragmented-clusters"))
    k = run(KEEL, "check", image, check=False)
    q = run("qemu-img", "check", image, check=False)
    errors = [line for line in (q.stdout + q.stderr).splitlines() if line.startswith("ERROR")]
    expect(errors and all(line in k.stdout + k.stderr for line in errors),
           f"{name}: qemu-img says {errors}; keel-img says {(k.stdout + k.stderr)[-400:]}")


def main():
    with tempfile.TemporaryDirectory(prefix="keel-repair-") as tmp:
        # Extended L2 subcluster bitmaps that contradict their entries (checked as qemu-img 7.2 does).
        xl = os.path.join(tmp, "orig-xl.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k", xl, "8M")
        run("qemu-io", "-c", "write -P 1 0 4k", "-c", "write -c -P 2 128k 64k", xl)
        report_only(tmp, "xl-allocated-and-zero", xl, lambda p: set_subcluster_bitmap(p, 0, (1 << 32) | 1))
        report_only(tmp, "xl-unallocated-with-alloc-bit", xl, lambda p: set_subcluster_bitmap(p, 1, 1))
        report_only(tmp, "xl-compressed-with-bitmap", xl, lambda p: set_subcluster_bitmap(p, 2, 5))

        big = os.path.join(tmp, "orig64k.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", big, "64M")
        run("qemu-io", "-c", "write -P 0x11 0 2M", "-c", "write -P 0x22 30M 1M", "-c", "write -c -P 0x33 40M 64k", big)
        cluster_size, _, _ = header(big)
        first_data = int(json.loads(run("qemu-img", "map", "--output=json", big).stdout)[0]["offset"])

        scenario(tmp, "reftable-entry-zero", big, lambda p: set_reftable_entry(p, 0, 0))
        scenario(tmp, "reftable-entry-data", big, lambda p: set_reftable_entry(p, 0, first_data))
        # qemu-img grows the file to cover a block past its end (to 1 TiB here); keel-img rebuilds
        # without growing it, so only the no-repair report is compared.
        scenario(tmp, "reftable-entry-past-eof", big, lambda p: set_reftable_entry(p, 0, 1 << 40), same_repair=False)
        # qemu-img cannot repair this one (it marks the image corrupt and fails); keel-img rebuilds.
        scenario(tmp, "reftable-entry-unaligned", big, lambda p: set_reftable_entry(p, 0, 2 * cluster_size + 512),
                 same_repair=False)
        # (qemu-img's rebuild trips over its own overlap check here and fails.)
        scenario(tmp, "reftable-entry-reserved-bits", big, lambda p: set_reftable_entry(p, 0, 2 * cluster_size | 1),
                 same_repair=False)

        # Other refcount widths and qcow2 v2: the rebuilt blocks are encoded in each width.
        for opts in ("compat=0.10", "refcount_bits=1", "refcount_bits=4", "refcount_bits=64"):
            other = os.path.join(tmp, f"orig-{opts.replace('=', '')}.qcow2")
            run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size=4096,{opts}", other, "32M")
            run("qemu-io", "-c", "write -P 0x66 0 3M", "-c", "write -P 0x77 20M 256k", other)
            scenario(tmp, f"reftable-entry-zero-{opts.replace('=', '')}", other, lambda p: set_reftable_entry(p, 0, 0))

        # 512-byte clusters: 12 MiB of data needs a two-cluster refcount table; cut it to one.
        small = os.path.join(tmp, "orig512.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", small, "64M")
        run("qemu-io", "-c", "write -P 0x44 0 12M", "-c", "write -P 0x55 20M 512k", small)
        _, _, rt_clusters = header(small)
        expect(rt_clusters >= 2, f"the refcount table of the 512-byte-cluster image spans {rt_clusters} clusters")
        scenario(tmp, "reftable-truncated", small, lambda p: set_reftable_clusters(p, 1))
        # Refcount block of the second range pointing at the first refcount block.
        scenario(tmp, "refblock-shared", small,
                 lambda p: set_reftable_entry(p, 1, struct.unpack(">Q", open(p, "rb").read()[header(p)[1]:header(p)[1] + 8])[0]))
    return finish()


if __name__ == "__main__":
    sys.exit(main())
