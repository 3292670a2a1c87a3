#!/usr/bin/env python3
"""keel-img's other subcommands against qemu-img: snapshot, resize, commit, rebase, measure, info,
check exit codes and repairs, compare."""
import json
import os
import shutil
import random
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imgtest import run, expect, raw_of, finish  # noqa: E402

KEEL = sys.argv[1]


def qcheck(image, label):
    p = run("qemu-img", "check", image, check=False)
    expect(p.returncode == 0, f"{label}: qemu-img check clean ({p.returncode}): {p.stdout[-300:]}{p.stderr[-300:]}")


def qio(image, *cmds):
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    run(*args, image)


def main():
    with tempfile.TemporaryDirectory(prefix="keel-img-cli-") as tmp:
        img = os.path.join(tmp, "a.qcow2")
        rng = random.Random(3)
        src = os.path.join(tmp, "src.raw")
        with open(src, "wb") as f:
            f.write(rng.randbytes(3 << 20))
            f.truncate(8 << 20)

        # Snapshots: create, write, list, apply, delete; qemu-img agrees at every step.
        run(KEEL, "convert", "-O", "qcow2", src, img)
        before = raw_of(tmp, img)
        run(KEEL, "snapshot", "-c", "snap1", img)
        qcheck(img, "after snapshot -c")
        qio(img, "write -P 0x99 0 200000", "write -P 0x98 5000000 70000")
        qcheck(img, "after writes over a snapshot")
        ql = run("qemu-img", "snapshot", "-l", img).stdout
        expect("snap1" in ql, "qemu-img lists keel's snapshot")
        # keel writes over the snapshot too (copy-on-write of shared clusters and L2 tables).
        p = run(KEEL, "convert", "-O", "raw", img, os.path.join(tmp, "x.raw"), check=False)
        expect(p.returncode == 0, "read after snapshot")
        p = run(KEEL, "bench", "-w", "-c", "200", "-d", "2", "-s", "4096", "--pattern=random", img, check=False)
        expect(p.returncode == 0, f"keel writes over a snapshot: {p.stderr}")
        qcheck(img, "keel writes over a snapshot")
        run(KEEL, "snapshot", "-a", "snap1", img)
        qcheck(img, "after snapshot -a")
        expect(raw_of(tmp, img) == before, "snapshot -a restores the content")
        run("qemu-img", "snapshot", "-c", "qsnap", img)
        run(KEEL, "snapshot", "-d", "snap1", img)
        qcheck(img, "after snapshot -d")
        kl = run(KEEL, "snapshot", "-l", img).stdout
        expect("snap1" not in kl and "qsnap" in kl, "snapshot -d removes only that snapshot")
        run(KEEL, "snapshot", "-a", "qsnap", img)
        qcheck(img, "apply qemu's snapshot")
        expect(raw_of(tmp, img) == before, "applying qemu's snapshot restores the content")
        run(KEEL, "snapshot", "-d", "qsnap", img)
        qcheck(img, "delete qemu's snapshot")

        # Resize: grow across L1 growth, shrink with --shrink.
        run(KEEL, "create", "-f", "qcow2", "-o", "cluster_size=512", img, "1M")
        qio(img, "write -P 0x10 0 1048576")
        run(KEEL, "resize", img, "64M")
        qcheck(img, "resize grow (L1 grows)")
        info = json.loads(run("qemu-img", "info", "--output=json", img).stdout)
        expect(info["virtual-size"] == 64 << 20, "grown size")
        qio(img, "write -P 0x11 60000000 4096")
        p = run(KEEL, "resize", img, "2M", check=False)
        expect(p.returncode != 0 and "--shrink" in p.stderr, "shrink needs --shrink")
        run(KEEL, "resize", "--shrink", img, "2M")
        qcheck(img, "resize shrink")
        info = json.loads(run("qemu-img", "info", "--output=json", img).stdout)
        expect(info["virtual-size"] == 2 << 20, "shrunk size")
        data = raw_of(tmp, img)
        expect(data[:1 << 20] == b"\x10" * (1 << 20) and data[1 << 20:] == b"\0" * (1 << 20), "content after resizes")

        # Commit and rebase.
        base = os.path.join(tmp, "base.qcow2")
        top = os.path.join(tmp, "top.qcow2")
        run(KEEL, "convert", "-O", "qcow2", src, base)
        run(KEEL, "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
        qio(top, "write -P 0x42 100000 300000", "write -z 0 4096")
        want = raw_of(tmp, top)
        run(KEEL, "commit", top)
        qcheck(base, "commit base")
        qcheck(top, "commit top")
        expect(raw_of(tmp, base) == want, "commit writes the top layer into the base")
        expect(raw_of(tmp, top) == want, "top still reads the same after commit")

        other = os.path.join(tmp, "other.qcow2")
        run(KEEL, "create", "-f", "qcow2", other, "8M")
        qio(other, "write -P 0x77 0 1000000")
        qio(top, "write -P 0x43 6000000 1000")
        want = raw_of(tmp, top)
        run(KEEL, "rebase", "-b", "other.qcow2", "-F", "qcow2", top)
        qcheck(top, "rebase (safe)")
        expect(raw_of(tmp, top) == want, "safe rebase keeps the content")
        info = json.loads(run("qemu-img", "info", "--output=json", top).stdout)
        expect(info.get("backing-filename") == "other.qcow2", "rebase sets the backing file")
        run(KEEL, "rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", top)
        info = json.loads(run("qemu-img", "info", "--output=json", top).stdout)
        expect(info.get("backing-filename") == "base.qcow2", "rebase -u sets the backing file")
        qcheck(top, "rebase -u")
        run(KEEL, "rebase", "-b", "", top)
        info = json.loads(run("qemu-img", "info", "--output=json", top).stdout)
        expect("backing-filename" not in info, "rebase -b '' removes the backing file")
        qcheck(top, "rebase to nothing")

        # info --backing-chain, human and JSON.
        run(KEEL, "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
        kj = json.loads(run(KEEL, "info", "--output=json", "--backing-chain", top).stdout)
        qj = json.loads(run("qemu-img", "info", "--output=json", "--backing-chain", top).stdout)
        expect(len(kj) == len(qj) == 2, "backing chain length")
        for key in ("virtual-size", "cluster-size", "format", "backing-filename", "backing-filename-format", "format-specific"):
            expect(kj[0].get(key) == qj[0].get(key), f"info --backing-chain {key}: {kj[0].get(key)} vs {qj[0].get(key)}")
        human = run(KEEL, "info", top).stdout
        expect("backing file: base.qcow2" in human and "virtual size: 8 MiB" in human, "human info")

        # measure matches qemu-img for new images and for existing ones.
        for args in (["--size", "1G"], ["--size", "100G", "-o", "cluster_size=4096"], [src], [base]):
            k = run(KEEL, "measure", "-O", "qcow2", *args).stdout
            q = run("qemu-img", "measure", "-O", "qcow2", *args).stdout
            expect(k.splitlines()[:2] == q.splitlines()[:2], f"measure {args}: {k!r} vs {q!r}")

        # compare: identical, mismatch (exit 1 with the offset), size mismatch.
        run(KEEL, "convert", "-O", "qcow2", src, img)
        p = run(KEEL, "compare", src, img, check=False)
        expect(p.returncode == 0 and "identical" in p.stdout, "compare identical")
        qio(img, "write -P 0x01 1048576 1")
        p = run(KEEL, "compare", src, img, check=False)
        q = run("qemu-img", "compare", src, img, check=False)
        expect(p.returncode == 1 and p.stdout == q.stdout, f"compare mismatch: {p.stdout!r} vs {q.stdout!r}")
        p = run(KEEL, "compare", src, os.path.join(tmp, "missing"), check=False)
        expect(p.returncode == 2, "compare error exit 2")

        # check: leaks (exit 3), repair, corruption (exit 2), raw (63).
        run(KEEL, "create", "-f", "qcow2", img, "8M")
        qio(img, "write -P 0x10 0 1M")
        with open(img, "r+b") as f:  # leak: one more cluster at the end, counted but unused
            f.seek(0, 2)
            end_cluster = f.tell() // 65536
            f.write(b"\0" * 65536)
            # the refcount block is cluster 2 (16-bit entries)
            f.seek(2 * 65536 + end_cluster * 2)
            f.write(b"\0\1")
        p = run(KEEL, "check", img, check=False)
        q = run("qemu-img", "check", img, check=False)
        expect(p.returncode == 3 and q.returncode == 3, f"leak detected by both ({p.returncode}, {q.returncode})")
        kj = json.loads(run(KEEL, "check", "--output=json", img, check=False).stdout)
        qj = json.loads(run("qemu-img", "check", "--output=json", img, check=False).stdout)
        expect(kj.get("leaks") == qj.get("leaks") == 1, f"leak count {kj.get('leaks')} {qj.get('leaks')}")
        p = run(KEEL, "check", "-r", "leaks", img, check=False)
        expect(p.returncode == 0, f"repair leaks exit 0: {p.stdout}")
        qcheck(img, "after keel repair")
        with open(img, "r+b") as f:  # corruption: refcount of a data cluster dropped to 0
            f.seek(2 * 65536 + 5 * 2)
            f.write(b"\0\0")
        p = run(KEEL, "check", img, check=False)
        q = run("qemu-img", "check", img, check=False)
        expect(p.returncode == 2 and q.returncode == 2, f"corruption detected by both ({p.returncode}, {q.returncode})")
        p = run(KEEL, "check", "-r", "all", img, check=False)
        expect(p.returncode == 0, f"repair all: {p.returncode} {p.stdout}")
        qcheck(img, "after keel -r all")
        p = run(KEEL, "check", src, check=False)
        expect(p.returncode == 63, "check of raw: 63")

        # A lazy-refcounts image left dirty by a killed qemu-io: check reports it as qemu-img does,
        # -r leaks cannot fix it (exit 1, as qemu-img), a read-write open repairs it first.
        lz = os.path.join(tmp, "lazy.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", lz, "16M")
        subprocess.run(["qemu-io", "-c", "write -P 1 0 1M", "-c", "write -P 2 8M 64k", "-c", "sigraise 9", lz],
                       capture_output=True)
        info = json.loads(run(KEEL, "info", "--output=json", lz).stdout)
        expect(info["dirty-flag"] is True, "keel-img info: dirty flag of a killed qemu-io's image")
        expect("cleanly shut down: no" in run(KEEL, "info", lz).stdout, "keel-img info: not cleanly shut down")
        kj = json.loads(run(KEEL, "check", "--output=json", lz, check=False).stdout)
        qj = json.loads(run("qemu-img", "check", "--output=json", lz, check=False).stdout)
        p = run(KEEL, "check", lz, check=False)
        q = run("qemu-img", "check", lz, check=False)
        expect(p.returncode == q.returncode == 2 and kj.get("corruptions") == qj.get("corruptions") > 0,
               f"dirty image: check counts as qemu-img ({p.returncode} {kj.get('corruptions')}, "
               f"{q.returncode} {qj.get('corruptions')})")
        p = run(KEEL, "check", "-r", "leaks", lz, check=False)
        expect(p.returncode == 1 and "need to rebuild" in p.stderr, f"-r leaks on a dirty image: {p.returncode} {p.stderr[-200:]}")
        lz2 = os.path.join(tmp, "lazy2.qcow2")
        shutil.copy(lz, lz2)
        p = run(KEEL, "resize", lz, "32M", check=False)
        expect(p.returncode == 0 and "not closed cleanly" in p.stderr, f"read-write open repairs first: {p.stderr}")
        qcheck(lz, "after the automatic repair of a dirty image")
        info = json.loads(run("qemu-img", "info", "--output=json", lz).stdout)
        expect(info["dirty-flag"] is False and info["virtual-size"] == 32 << 20, "repaired, resized, clean")
        q = run("qemu-io", "-r", "-c", "read -P 1 0 1M", "-c", "read -P 2 8M 64k", lz, check=False)
        expect(q.returncode == 0 and "Pattern verification failed" not in q.stdout, f"data intact after repair: {q.stdout}")
        p = run(KEEL, "check", "-r", "all", lz2, check=False)
        expect(p.returncode == 0 and "Rebuilding refcount structure" in p.stderr, f"check -r all rebuilds: {p.stdout}")
        qcheck(lz2, "after -r all on a dirty image")
        expect(json.loads(run("qemu-img", "info", "--output=json", lz2).stdout)["dirty-flag"] is False,
               "the dirty bit is cleared")

        # keel-img writing a lazy-refcounts image: dirty while open, clean after close.
        lk = os.path.join(tmp, "keel-lazy.qcow2")
        run(KEEL, "create", "-f", "qcow2", "-o", "lazy_refcounts=on", lk, "64M")
        run(KEEL, "bench", "-w", "-c", "3000", "-d", "4", "-s", "4k", "--pattern=random", "--flush-interval=100", lk)
        qcheck(lk, "lazy-refcount writes, clean close")
        info = json.loads(run("qemu-img", "info", "--output=json", lk).stdout)
        expect(info["dirty-flag"] is False and info["format-specific"]["data"]["lazy-refcounts"] is True,
               "lazy image clean after keel-img closed it")

        # Errors name the file and what is wrong.
        with open(os.path.join(tmp, "bad.qcow2"), "wb") as f:
            f.write(b"QFI\xfb" + b"\0\0\0\x03" + b"\0" * 100)
        p = run(KEEL, "info", os.path.join(tmp, "bad.qcow2"), check=False)
        expect(p.returncode == 1 and "bad.qcow2" in p.stderr, f"bad header error: {p.stderr.strip()}")

    return finish()


if __name__ == "__main__":
    sys.exit(main())
