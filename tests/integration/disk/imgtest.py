"""What the disk integration scripts share: running tools, counting checks, and the closing
'N passed, N failed' line."""
import os
import subprocess

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
