#!/usr/bin/env python3
"""Crash consistency: SIGKILL a keel-img writer at random moments during heavy random writes.

After every kill `qemu-img check` must report a clean image or leaks only (exit 0 or 3, never 2),
and `keel-img check -r leaks` must give every leak back (qemu-img check then exits 0).

Lazy refcounts: the writer (keel-img, or now and then qemu-io) first writes and flushes a known
pattern, then writes at random above it until killed. qemu-img check may then find refcount errors
only, and only in a dirty image; after keel-img repairs it (`check -r all`, or simply opening it
read-write) qemu-img check is clean, the dirty bit is clear, the guest-visible data is what it was
before the repair, and the flushed pattern is intact.
"""
import filecmp
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imgtest import direct_io_dir  # noqa: E402

KEEL = sys.argv[1]
ITERATIONS = int(os.environ.get("KEEL_CRASH_ITERATIONS", "300"))


def main():
    rng = random.Random(int(os.environ.get("KEEL_CRASH_SEED", "7")))
    failures = 0
    passed = 0
    leaks_seen = 0
    configs = [
        ("cluster_size=65536", "16k"),
        ("cluster_size=4096,refcount_bits=4", "8k"),
        ("cluster_size=512,refcount_bits=64", "2k"),
        ("cluster_size=65536,compression_type=zstd,refcount_bits=1", "64k"),
        ("cluster_size=32768,extended_l2=on", "3k"),  # subclusters of 1 KiB
        ("cluster_size=4096,refcount_bits=8", "6k", "none"),  # O_DIRECT: metadata through aligned I/O
        ("cluster_size=16384,extended_l2=on", "1k", "none"),
    ]
    with tempfile.TemporaryDirectory(prefix="keel-crash-") as tmp:
        img = os.path.join(direct_io_dir(tmp), "crash.qcow2")
        for i in range(ITERATIONS):
            opts, req, *cache = configs[(i // 25) % len(configs)]
            cache_args = ["-t", cache[0]] if cache else []
            if i % 25 == 0:
                subprocess.run([KEEL, "create", "-f", "qcow2", "-o", opts, img, "48M"], check=True,
                               stdout=subprocess.DEVNULL)
            flush = rng.choice(["1", "7", "50", "1000000"])
            writer = subprocess.Popen([KEEL, "bench", "--mixed", *cache_args, "-c", "100000000", "-d", "2", "-s", req,
                                       f"--flush-interval={flush}", img],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(rng.uniform(0.005, 0.12))
            writer.send_signal(signal.SIGKILL)
            _, err = writer.communicate()
            if writer.returncode != -signal.SIGKILL:
                print(f"iteration {i}: writer ended by itself ({writer.returncode}): {err.decode()[-300:]}")
                failures += 1
                continue
            q = subprocess.run(["qemu-img", "check", img], capture_output=True, text=True)
            if q.returncode not in (0, 3):
                print(f"iteration {i} ({opts} {cache_args}, flush every {flush}): qemu-img check exit {q.returncode}\n"
                      f"{q.stdout[-1500:]}{q.stderr[-1500:]}")
                failures += 1
                subprocess.run(["cp", img, f"/tmp/keel-crash-failed-{i}.qcow2"])
                subprocess.run([KEEL, "create", "-f", "qcow2", "-o", opts, img, "48M"], check=True,
                               stdout=subprocess.DEVNULL)
                continue
            if q.returncode == 3:
                leaks_seen += 1
                r = subprocess.run([KEEL, "check", "-r", "leaks", img], capture_output=True, text=True)
                q2 = subprocess.run(["qemu-img", "check", img], capture_output=True, text=True)
                if r.returncode != 0 or q2.returncode != 0:
                    print(f"iteration {i}: repair failed: keel {r.returncode} {r.stdout[-500:]} {r.stderr[-500:]}; "
                          f"qemu-img then {q2.returncode}: {q2.stdout[-800:]}{q2.stderr[-800:]}")
                    failures += 1
                    continue
            passed += 1
    print(f"crash test: {ITERATIONS} kills, {leaks_seen} left leaks (all repaired)")
    lazy_passed, lazy_failed, lazy_damaged = lazy_rounds(rng)
    passed += lazy_passed
    failures += lazy_failed
    print(f"lazy refcounts: {LAZY_ITERATIONS} kills, {lazy_damaged} left refcount errors (all repaired)")
    print(f"{passed} passed, {failures} failed")
    return 1 if failures else 0


LAZY_ITERATIONS = int(os.environ.get("KEEL_CRASH_LAZY_ITERATIONS", "50"))
PREFILL = 8 << 20
# What qemu-img check may say about a dirty lazy-refcounts image: refcounts behind the L2 tables.
LAZY_ALLOWED = re.compile(r"^(ERROR cluster \d+ refcount=\d+ reference=\d+|Leaked cluster \d+ refcount=\d+ reference=\d+|"
                          r"ERROR OFLAG_COPIED (data|L2) cluster: .*)$")


def qemu_io_script(rng):
    """A qemu-io run that writes the known pattern, flushes, writes at random above it, and kills itself."""
    cmds = ["write -P 0x5a 0 %d" % PREFILL, "flush"]
    for _ in range(rng.randrange(5, 40)):
        off = rng.randrange(PREFILL // 512, (48 << 20) // 512 - 256) * 512
        kind = rng.random()
        if kind < 0.7:
            cmds.append(f"write -P {rng.randrange(1, 255)} {off} {rng.randrange(1, 256) * 512}")
        elif kind < 0.85:
            cmds.append(f"write -z {off} {rng.randrange(1, 256) * 512}")
        else:
            cmds.append(f"discard {off // 65536 * 65536 + 65536} 65536")
        if rng.random() < 0.2:
            cmds.append("flush")
    cmds.append("sigraise 9")
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    return args


def lazy_rounds(rng):
    passed = failed = damaged = 0
    configs = ["cluster_size=65536", "cluster_size=4096,refcount_bits=4", "cluster_size=512,refcount_bits=64",
               "cluster_size=65536,refcount_bits=1"]
    with tempfile.TemporaryDirectory(prefix="keel-crash-lazy-") as tmp:
        img = os.path.join(tmp, "lazy.qcow2")
        before, after = os.path.join(tmp, "before.raw"), os.path.join(tmp, "after.raw")

        def fail(i, what):
            nonlocal failed
            failed += 1
            print(f"lazy iteration {i}: {what}")
            subprocess.run(["cp", img, f"/tmp/keel-crash-lazy-failed-{i}.qcow2"])

        for i in range(LAZY_ITERATIONS):
            opts = "lazy_refcounts=on," + configs[i % len(configs)]
            subprocess.run([KEEL, "create", "-f", "qcow2", "-o", opts, img, "48M"], check=True, stdout=subprocess.DEVNULL)
            by_qemu = i % 5 == 4
            if by_qemu:
                w = subprocess.run(qemu_io_script(rng) + [img], capture_output=True, text=True)
                if w.returncode != -signal.SIGKILL:
                    fail(i, f"qemu-io ended with {w.returncode}: {w.stderr[-300:]}")
                    continue
            else:
                flush = rng.choice(["1", "7", "50", "1000000"])
                writer = subprocess.Popen([KEEL, "bench", "--mixed", "-c", "100000000", "-d", "2", "-s", "16k",
                                           "-o", str(PREFILL), f"--flush-interval={flush}", img],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                line = writer.stdout.readline()
                while line and not line.startswith("prefilled"):
                    line = writer.stdout.readline()
                time.sleep(rng.uniform(0.005, 0.15))
                writer.send_signal(signal.SIGKILL)
                _, err = writer.communicate()
                if not line or writer.returncode != -signal.SIGKILL:
                    fail(i, f"writer ended by itself ({writer.returncode}) or never prefilled: {err[-300:]}")
                    continue
            q = subprocess.run(["qemu-img", "check", img], capture_output=True, text=True)
            dirty = json.loads(subprocess.run(["qemu-img", "info", "--output=json", img], capture_output=True,
                                              text=True).stdout)["dirty-flag"]
            if q.returncode not in (0, 2, 3):
                fail(i, f"qemu-img check exit {q.returncode}: {q.stdout[-500:]}{q.stderr[-500:]}")
                continue
            if q.returncode != 0:
                damaged += 1
                bad = [ln for ln in q.stderr.splitlines() if ln and not LAZY_ALLOWED.match(ln)]
                if bad or not dirty:
                    fail(i, f"errors other than lagging refcounts (dirty={dirty}): {bad[:5]}")
                    continue
            subprocess.run(["qemu-img", "convert", "-O", "raw", img, before], check=True)
            # Half the images are repaired by check -r all, half by a plain read-write open.
            if i % 2:
                r = subprocess.run([KEEL, "check", "-r", "all", img], capture_output=True, text=True)
            else:
                r = subprocess.run([KEEL, "bench", "-w", "-c", "0", img], capture_output=True, text=True)
            q2 = subprocess.run(["qemu-img", "check", img], capture_output=True, text=True)
            dirty = json.loads(subprocess.run(["qemu-img", "info", "--output=json", img], capture_output=True,
                                              text=True).stdout)["dirty-flag"]
            if r.returncode != 0 or q2.returncode != 0 or dirty:
                fail(i, f"repair ({'check -r all' if i % 2 else 'read-write open'}) exit {r.returncode} "
                        f"{r.stderr[-300:]}; qemu-img check then {q2.returncode} {q2.stderr[-300:]}; dirty={dirty}")
                continue
            subprocess.run(["qemu-img", "convert", "-O", "raw", img, after], check=True)
            if not filecmp.cmp(before, after, shallow=False):
                fail(i, "the repair changed guest-visible data")
                continue
            with open(after, "rb") as f:
                if f.read(PREFILL) != b"\x5a" * PREFILL:
                    fail(i, f"data flushed before the kill is not intact ({'qemu-io' if by_qemu else 'keel-img'})")
                    continue
            passed += 1
    return passed, failed, damaged


if __name__ == "__main__":
    sys.exit(main())
