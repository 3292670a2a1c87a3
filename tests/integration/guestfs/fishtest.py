"""Shared helpers for keel-fish's integration tests: the images, running keel-fish, comparing trees."""
import os
import shutil
import stat
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
FAILURES = []
PASSED = [0]


def keel_fish():
    return os.environ.get("KEEL_FISH", "keel-fish")


def run(argv, check=True, input=None, env=None):
    p = subprocess.run(argv, capture_output=True, input=input, env=env)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.decode(errors='replace')}")
    return p


def fish(*args, check=True, input=None):
    return run([keel_fish(), *args], check=check, input=input)


def check(cond, what):
    if cond:
        PASSED[0] += 1
        print(f"ok   {what}")
    else:
        print(f"FAIL {what}")
        FAILURES.append(what)


def finish():
    print(f"checks: {PASSED[0]} passed, {len(FAILURES)} failed")
    if FAILURES:
        print(f"{len(FAILURES)} check(s) failed:")
        for f in FAILURES:
            print("  " + f)
        sys.exit(1)
    print("all checks passed")


def make_images():
    """Builds the images once per test run into a private directory."""
    work = tempfile.mkdtemp(prefix="keel-fish-test-")
    run(["bash", os.path.join(HERE, "make_images.sh"), work])
    return work


def convert(work, name, fmt):
    """raw image -> qcow2 / compressed qcow2 / vmdk, by qemu-img."""
    src = os.path.join(work, name + ".raw")
    if fmt == "raw":
        return src
    dst = os.path.join(work, f"{name}.{fmt}")
    if not os.path.exists(dst):
        if fmt == "qcow2":
            run(["qemu-img", "convert", "-O", "qcow2", src, dst])
        elif fmt == "qcow2c":
            run(["qemu-img", "convert", "-c", "-O", "qcow2", src, dst])
        elif fmt == "vmdk":
            run(["qemu-img", "convert", "-O", "vmdk", "-o", "subformat=monolithicSparse", src, dst])
        else:
            raise ValueError(fmt)
    return dst


def local_tree(root, fat=False):
    """{relative path: (kind, size, mode, link target, bytes)} for a local tree, as keel-fish shows it."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", None, None, os.readlink(full), None)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", None, None if fat else stat.S_IMODE(st.st_mode), None, None)
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    data = f.read()
                out[rel] = ("file", st.st_size, None if fat else stat.S_IMODE(st.st_mode), None, data)
            # fifos and devices are not copied out
    return out


def expected_listing(root):
    """What `ls -R /` should print for a local tree: every path relative to the root, sorted."""
    names = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            names.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(names)


def tmpdir():
    return tempfile.mkdtemp(prefix="keel-fish-out-")


def rmtree(path):
    shutil.rmtree(path, ignore_errors=True)
