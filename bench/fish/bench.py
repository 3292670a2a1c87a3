#!/usr/bin/env python3
"""keel-fish against libguestfs, side by side on the same images: `ls -R /`, `cat` of one file,
`copy-out` of a tree and `inspect`. Prints each one's median wall time, keel-fish's CPU time, and the
ratio peer/keel-fish.

  bench/fish/bench.py [--keel-fish PATH] [--runs 21] [--peer-runs 1] [--images DIR]

The images are built by tests/integration/guestfs/make_images.sh (a Debian-like guest with a
separate /boot, as qcow2). libguestfs boots an appliance under TCG for every command (10-70 s here),
so it runs fewer times; runs of the two alternate so machine load hits both alike."""
import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def timed(argv, env=None):
    """(wall seconds, child CPU seconds) of one run; output discarded."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    p = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed: {p.stderr.decode(errors='replace')}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keel-fish", default=os.path.join(ROOT, "build/src/guestfs/keel-fish"))
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--peer-runs", type=int, default=1)
    ap.add_argument("--images")
    ap.add_argument("--only", help="comma-separated subset: ls,cat,copy-out,inspect")
    args = ap.parse_args()
    kf = args.keel_fish
    work = tempfile.mkdtemp(prefix="keel-fish-bench-")
    try:
        images = args.images or work
        if not args.images:
            subprocess.run(["bash", os.path.join(ROOT, "tests/integration/guestfs/make_images.sh"), images],
                           check=True, stdout=subprocess.DEVNULL)
        img = os.path.join(images, "debian.qcow2")
        if not os.path.exists(img):
            subprocess.run(["qemu-img", "convert", "-O", "qcow2", os.path.join(images, "debian.raw"), img], check=True)
        env = dict(os.environ, LIBGUESTFS_BACKEND="direct", LIBGUESTFS_BACKEND_SETTINGS="force_tcg")
        out_k = os.path.join(work, "out-keel")
        out_p = os.path.join(work, "out-peer")

        def fresh(d):
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
            return d

        ops = [
            ("ls -R /", lambda: [kf, "ls", "-a", img, "-R", "/"], lambda: ["virt-ls", "-a", img, "-R", "/"]),
            ("cat /etc/hostname", lambda: [kf, "cat", "-a", img, "/etc/hostname"],
             lambda: ["virt-cat", "-a", img, "/etc/hostname"]),
            ("copy-out /usr", lambda: [kf, "copy-out", "-a", img, "/usr", fresh(out_k)],
             lambda: ["virt-copy-out", "-a", img, "/usr", fresh(out_p)]),
            ("inspect", lambda: [kf, "inspect", "-a", img], lambda: ["virt-inspector", "-a", img]),
        ]
        if args.only:
            keep = set(args.only.split(","))
            ops = [o for o in ops if o[0].split()[0] in keep]
        print(f"image: {img} ({os.path.getsize(img) >> 20} MiB qcow2); keel-fish runs: {args.runs}, "
              f"libguestfs runs: {args.peer_runs}")
        print(f"{'operation':<20} {'keel-fish wall':>15} {'keel-fish CPU':>14} {'libguestfs wall':>16} {'ratio':>9}")
        for name, keel_cmd, peer_cmd in ops:
            keel_wall, keel_cpu, peer_wall = [], [], []
            per_peer = max(1, args.runs // max(1, args.peer_runs))
            for i in range(args.runs):
                w, c = timed(keel_cmd())
                keel_wall.append(w)
                keel_cpu.append(c)
                if i % per_peer == 0 and len(peer_wall) < args.peer_runs:
                    peer_wall.append(timed(peer_cmd(), env)[0])
            kw, kc, pw = statistics.median(keel_wall), statistics.median(keel_cpu), statistics.median(peer_wall)
            print(f"{name:<20} {kw * 1000:>12.1f} ms {kc * 1000:>11.1f} ms {pw:>14.2f} s {pw / kw:>8.0f}x")
            sys.stdout.flush()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
