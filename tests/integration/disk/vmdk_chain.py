#!/usr/bin/env python3
"""VMDK delta links (parentFileNameHint + parentCID) read as a backing chain.

Chains made by qemu-img (`create -f vmdk -b base.vmdk -F vmdk`, written by qemu-io; monolithicSparse
and twoGbMaxExtentSparse children, two levels) read through keel-img exactly as
`qemu-img convert -O raw` reads them, and map shows the same layers. A child keel-img creates takes
qemu-io's writes and passes qemu-img check. A parent whose CID changed, a missing parent, a parent
that is not a VMDK, a self-link and a two-image loop give clear errors. (qemu-img itself spins
forever on the loop, so it never sees that one.)
"""
import json
import os
import random
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imgtest import run, expect, finish, map_shape, qemu_io_through_serve  # noqa: E402

KEEL = sys.argv[1]
SIZE = 5 << 20


def qemu_io(image, *cmds):
    args = ["qemu-io", "-f", "vmdk"]
    for c in cmds:
        args += ["-c", c]
    run(*args, image)


def raw_bytes(tool, image, tmp):
    out = os.path.join(tmp, f"{os.path.basename(tool)}.raw")
    p = run(tool, "convert", "-O", "raw", image, out, check=False, timeout=60)
    if p.returncode != 0:
        return None, p.stderr.strip()
    with open(out, "rb") as f:
        return f.read(), ""


def reads_like_qemu(image, tmp, label):
    ref, _ = raw_bytes("qemu-img", image, tmp)
    mine, err = raw_bytes(KEEL, image, tmp)
    expect(mine is not None, f"{label}: keel-img reads it: {err}")
    if mine is not None:
        expect(mine == ref, f"{label}: keel-img reads what qemu-img reads")
    qm = run("qemu-img", "map", "--output=json", image).stdout
    km = run(KEEL, "map", "--output=json", image, check=False).stdout
    expect(km and map_shape(km) == map_shape(qm), f"{label}: map shows the same layers as qemu-img map")


def keel_writes(tmp, image, cmds):
    """qemu-io's commands reach keel's VMDK driver through keel-img serve (NBD); "" or the errors."""
    client, code, err = qemu_io_through_serve(KEEL, tmp, image, cmds)
    if client is None:
        return err.strip()
    return "" if client.returncode == 0 and code == 0 else (client.stderr + err).strip()


def fails_clearly(image, words, label):
    p = run(KEEL, "convert", "-O", "raw", image, image + ".raw", check=False, timeout=60)
    expect(p.returncode != 0 and all(w in p.stderr for w in words) and len(p.stderr) < 2000,
           f"{label}: clear error ({p.returncode}): {p.stderr.strip()[:400]}")


def main():
    with tempfile.TemporaryDirectory(prefix="keel-vmdk-chain-") as tmp:
        rng = random.Random(5)
        src = os.path.join(tmp, "src.raw")
        with open(src, "wb") as f:
            f.truncate(SIZE)
            for _ in range(20):
                f.seek(rng.randrange(0, SIZE - 200000))
                f.write(rng.randbytes(rng.choice([1000, 65536, 150000])))
        base = os.path.join(tmp, "base.vmdk")
        run("qemu-img", "convert", "-O", "vmdk", src, base)

        # qemu-made chains: base <- child <- grandchild, children in both sparse subformats.
        for sub in ["monolithicSparse", "twoGbMaxExtentSparse"]:
            d = os.path.join(tmp, sub)
            os.mkdir(d)
            shutil.copy(base, os.path.join(d, "base.vmdk"))
            child = os.path.join(d, "child.vmdk")
            grand = os.path.join(d, "grand.vmdk")
            run("qemu-img", "create", "-q", "-f", "vmdk", "-o", f"subformat={sub}", "-b", "base.vmdk", "-F", "vmdk",
                child)
            qemu_io(child, "write -P 0x31 70000 100000", "write -P 0x32 3000000 512", "write -z 4194304 65536")
            reads_like_qemu(child, tmp, f"{sub} child")
            run("qemu-img", "create", "-q", "-f", "vmdk", "-b", "child.vmdk", "-F", "vmdk", grand)
            qemu_io(grand, "write -P 0x41 0 4096", "write -P 0x42 3000100 70000")
            reads_like_qemu(grand, tmp, f"{sub} grandchild")
            info = json.loads(run(KEEL, "info", "--output=json", grand).stdout)
            expect(info.get("backing-filename") == "child.vmdk", f"{sub}: info names the parent: {info}")
            # convert flattens the chain.
            out = os.path.join(d, "flat.qcow2")
            p = run(KEEL, "convert", "-O", "qcow2", grand, out, check=False)
            expect(p.returncode == 0, f"{sub}: convert the chain to qcow2: {p.stderr.strip()}")
            p = run("qemu-img", "compare", grand, out, check=False)
            expect(p.returncode == 0, f"{sub}: flattened chain is identical: {p.stdout.strip()}")

        # keel-img creates a delta link; qemu-io writes into it; both tools read it alike.
        mine = os.path.join(tmp, "mine.vmdk")
        p = run(KEEL, "create", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", mine, check=False)
        expect(p.returncode == 0, f"keel-img create -f vmdk -b: {p.stderr.strip()}")
        qi = json.loads(run("qemu-img", "info", "--output=json", mine).stdout)
        bi = json.loads(run("qemu-img", "info", "--output=json", base).stdout)
        expect(qi.get("backing-filename") == "base.vmdk" and qi.get("virtual-size") == SIZE,
               f"qemu-img sees keel's child with its parent: {qi}")
        expect(qi["format-specific"]["data"]["parent-cid"] == bi["format-specific"]["data"]["cid"],
               "keel's child records the parent's CID")
        reads_like_qemu(mine, tmp, "keel-made child, empty")
        qemu_io(mine, "write -P 0x51 123456 7000", "write -P 0x52 5000000 4096")
        p = run("qemu-img", "check", mine, check=False)
        expect(p.returncode == 0, f"qemu-img check of keel's child: {p.stdout.strip()} {p.stderr.strip()}")
        reads_like_qemu(mine, tmp, "keel-made child, written by qemu-io")
        p = run(KEEL, "create", "-f", "vmdk", "-b", "src.raw", "-F", "raw", os.path.join(tmp, "x.vmdk"), check=False)
        expect(p.returncode != 0 and "VMDK" in p.stderr, f"a raw parent is refused: {p.stderr.strip()}")

        # keel-img writes into deltas (qemu's and its own) as qemu-io writes into copies of them.
        writes = ["write -P 0x71 1000 3000", "write -P 0x72 65536 65536", "write -P 0x73 100000 300000",
                  "write -z 1048576 70000", f"write -P 0x74 {SIZE - 4304} 4304"]
        for name, source in [("qemu-made delta", os.path.join(tmp, "monolithicSparse", "child.vmdk")), ("keel-made delta", mine)]:
            d = os.path.dirname(source)
            ref = os.path.join(d, "wref.vmdk")
            out = os.path.join(d, "wkeel.vmdk")
            shutil.copy(source, ref)
            shutil.copy(source, out)
            qemu_io(ref, *writes)
            err = keel_writes(tmp, out, writes)
            expect(err == "", f"{name}: keel-img serve takes the writes: {err}")
            p = run("qemu-img", "check", out, check=False)
            expect(p.returncode == 0, f"{name}: qemu-img check after keel's writes: {p.stdout.strip()} {p.stderr.strip()}")
            p = run("qemu-img", "compare", ref, out, check=False)
            expect(p.returncode == 0, f"{name}: identical to qemu-io's writes: {p.stdout.strip()}")
            reads_like_qemu(out, tmp, f"{name} written by keel")
            cids = [json.loads(run("qemu-img", "info", "--output=json", x).stdout)["format-specific"]["data"]["cid"]
                    for x in (source, out)]
            expect(cids[0] != cids[1], f"{name}: the first write gives the image a new CID, as qemu does")
        # qemu writes CIDs with "%x": a CID with a leading zero nibble is only 7 digits long. The
        # line is rewritten whole, so the parentCID line after it survives keel's CID renewal.
        short = os.path.join(tmp, "short-cid.vmdk")
        with open(mine, "rb") as f:
            data = bytearray(f.read())
        start = data.index(b"# Disk DescriptorFile")
        line = data.index(b"\nCID=", start) + 1
        eol = data.index(b"\n", line)
        end = data.index(b"\0", start)
        text = bytes(data[start:line]) + b"CID=1234567" + bytes(data[eol:end])
        data[start:end] = text + b"\0" * (end - start - len(text))
        with open(short, "wb") as f:
            f.write(data)
        err = keel_writes(tmp, short, ["write -P 0x75 0 4096"])
        expect(err == "", f"write into a delta whose CID has 7 digits: {err}")
        reads_like_qemu(short, tmp, "delta whose 7-digit CID keel renewed")
        p = run("qemu-img", "check", short, check=False)
        expect(p.returncode == 0, f"7-digit CID renewed: qemu-img check: {p.stdout.strip()} {p.stderr.strip()}")

        stream = os.path.join(tmp, "stream.vmdk")
        run("qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", src, stream)
        err = keel_writes(tmp, stream, ["write 0 512"])
        expect("monolithicSparse" in err, f"a streamOptimized image is refused for writing, clearly: {err}")

        # Hostile chains.
        with open(mine, "rb") as f:
            child_bytes = f.read()

        def variant(name, old, new):
            path = os.path.join(tmp, name)
            data = child_bytes.replace(old.encode(), new.encode(), 1)
            with open(path, "wb") as f:
                f.write(data)
            return path

        cid = bi["format-specific"]["data"]["cid"]
        bad_cid = variant("badcid.vmdk", f"parentCID={cid:08x}", "parentCID=0badc0de")
        fails_clearly(bad_cid, ["CID", "0badc0de"], "parent CID mismatch")
        p = run("qemu-img", "convert", "-O", "raw", bad_cid, bad_cid + ".q", check=False, timeout=60)
        expect(p.returncode != 0, "qemu-img refuses the CID mismatch too")
        fails_clearly(variant("self.vmdk", 'parentFileNameHint="base.vmdk"', 'parentFileNameHint="self.vmdk"'),
                      ["itself"], "a self-link")
        variant("loop-a.vmdk", 'parentFileNameHint="base.vmdk"', 'parentFileNameHint="loop-b.vmdk"')
        variant("loop-b.vmdk", 'parentFileNameHint="base.vmdk"', 'parentFileNameHint="loop-a.vmdk"')
        fails_clearly(os.path.join(tmp, "loop-a.vmdk"), ["loop"], "a two-image loop")
        fails_clearly(variant("missing.vmdk", 'parentFileNameHint="base.vmdk"', 'parentFileNameHint="gone.vmdk"'),
                      ["gone.vmdk"], "a missing parent")
        run("qemu-img", "create", "-q", "-f", "qcow2", os.path.join(tmp, "q.qcow2"), str(SIZE))
        fails_clearly(variant("qparent.vmdk", 'parentFileNameHint="base.vmdk"', 'parentFileNameHint="q.qcow2"'),
                      ["q.qcow2"], "a qcow2 parent")
        # The parent changes after the child was made: its CID changes, reads stop, as in qemu;
        # whether qemu-io or keel-img wrote it.
        keel_base = os.path.join(tmp, "monolithicSparse", "base.vmdk")
        err = keel_writes(tmp, keel_base, ["write -P 0x62 0 512"])
        expect(err == "", f"keel-img writes the base: {err}")
        fails_clearly(os.path.join(tmp, "monolithicSparse", "child.vmdk"), ["CID"], "parent written by keel-img")
        p = run("qemu-img", "convert", "-O", "raw", os.path.join(tmp, "monolithicSparse", "child.vmdk"),
                os.path.join(tmp, "x.raw"), check=False, timeout=60)
        expect(p.returncode != 0, "qemu-img too sees that keel-img changed the parent")
        qemu_io(base, "write -P 0x61 0 512")
        fails_clearly(mine, ["CID"], "parent written after the child was made")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
