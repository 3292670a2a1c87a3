#!/usr/bin/env python3
"""Crash consistency: SIGKILL a keel-img writer at random moments during heavy random writes.

After every kill `qemu-img check` must report a clean image or leaks only (exit 0 or 3, never 2),
and `keel-img check -r leaks` must give every leak back (qemu-img check then exits 0).
"""
import os
import random
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
    print(f"{passed} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
