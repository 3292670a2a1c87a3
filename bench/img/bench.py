#!/usr/bin/env python3
"""keel-img against qemu-img (and keel-img serve against qemu-nbd), side by side on the same images.

Each case runs the peer and keel alternately, REPEAT times each, and reports the median wall time
and the ratio peer/keel (above 1: keel is faster). The working directory defaults to /dev/shm so
the page cache and the disk's writeback do not drown the tools' own cost; pass --dir to change it.

usage: bench.py [--keel PATH] [--size MiB] [--repeat N] [--dir DIR] [--sync-dir DIR] [--only NAME,...]
"""
import argparse
import os
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def make_disk(path, size):
    """A disk that looks used: ~20% incompressible, ~22% text-like, the rest never written."""
    rng = random.Random(11)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz ") for _ in range(rng.randint(2, 9))) for _ in range(2000)]
    with open(path, "wb") as f:
        f.truncate(size)
        pos = 0
        while pos < size:
            n = min(rng.choice([4096, 65536, 1 << 20, 4 << 20]), size - pos)
            k = rng.random()
            if k < 0.2:
                f.seek(pos)
                f.write(os.urandom(n))
            elif k < 0.42:
                f.seek(pos)
                f.write(b" ".join(rng.choice(words) for _ in range(n // 5))[:n].ljust(n, b"\n"))
            pos += n


CPU = {}
MEDIANS = {}  # case -> (peer wall, keel wall)


def timed(cmd, env=None, cpu_key=None):
    """Wall seconds; the child's CPU seconds (user + system) are added to CPU[cpu_key]."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if cpu_key:
        CPU.setdefault(cpu_key, []).append((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime))
    if p.returncode not in (0,):
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.decode()[-500:]}")
    return dt


def bench_pair(name, peer_cmd, keel_cmd, repeat, setup=None):
    peer, keel = [], []
    for _ in range(repeat):
        for which, cmd, out in (("peer", peer_cmd, peer), ("keel", keel_cmd, keel)):
            if setup:
                setup(which)
            out.append(timed(cmd, cpu_key=(name, which)))
    p, k = statistics.median(peer), statistics.median(keel)
    MEDIANS[name] = (p, k)
    pc, kc = statistics.median(CPU[(name, "peer")]), statistics.median(CPU[(name, "keel")])
    print(f"{name:<34} {p * 1000:9.1f} ms {k * 1000:9.1f} ms   {p / k:5.2f}x   "
          f"cpu {pc * 1000:8.1f} ms {kc * 1000:8.1f} ms   {pc / max(kc, 1e-6):5.2f}x", flush=True)
    return p / k


def wait_for_socket(path, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path):
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(path)
                s.close()
                return
            except OSError:
                pass
        time.sleep(0.02)
    raise RuntimeError(f"no server on {path}")


def server_cpu_seconds(pid):
    """user + system CPU of a running process, from /proc (the server is measured before it is killed)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_serve(keel, tmp, image, repeat):
    """The same NBD client (qemu-img convert from nbd+unix, then qemu-img bench over NBD) against
    qemu-nbd and keel-img serve on the same image. Wall time is the client's run; the servers' own
    CPU (user + system, read from /proc before each is stopped) is printed beside it, since with one
    client on two cores the client's side (its reads from the socket and its writes) bounds the wall."""
    results = []
    for label, client in (("serve: read whole disk (convert)", "convert"), ("serve: 4k reads (bench, depth 16)", "bench")):
        times = {"peer": [], "keel": []}
        cpu = {"peer": [], "keel": []}
        for _ in range(repeat):
            for which in ("peer", "keel"):
                sock = os.path.join(tmp, f"{which}.sock")
                if os.path.exists(sock):
                    os.unlink(sock)
                if which == "peer":
                    server = subprocess.Popen(["qemu-nbd", "-t", "-r", "-f", "qcow2", "-k", sock, "-x", "", image],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                else:
                    server = subprocess.Popen([keel, "serve", "-t", "--read-only", "--socket", sock, image],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    wait_for_socket(sock)
                    uri = f"nbd+unix:///?socket={sock}"
                    if client == "convert":
                        cmd = ["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, os.path.join(tmp, "nbd-out.raw")]
                    else:
                        cmd = ["qemu-img", "bench", "-f", "raw", "-c", "20000", "-d", "16", "-s", "4k", "-S", "1052672", uri]
                    times[which].append(timed(cmd))
                    cpu[which].append(server_cpu_seconds(server.pid))
                finally:
                    server.kill()  # our own child, by its pid
                    server.wait()
        p, k = statistics.median(times["peer"]), statistics.median(times["keel"])
        pc, kc = statistics.median(cpu["peer"]), statistics.median(cpu["keel"])
        print(f"{label:<34} {p * 1000:9.1f} ms {k * 1000:9.1f} ms   {p / k:5.2f}x   server cpu {pc * 1000:6.1f} ms "
              f"{kc * 1000:6.1f} ms  {pc / kc if kc else float('inf'):5.2f}x", flush=True)
        results.append(p / k)
    return results


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--keel", default=os.path.join(here, "..", "..", "build", "src", "disk", "keel-img"))
    ap.add_argument("--size", type=int, default=512, help="disk size in MiB")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    ap.add_argument("--only", default="")
    ap.add_argument("--sync-dir", default="/var/tmp", help="a directory on a real disk (flush-bound cases)")
    args = ap.parse_args()
    keel = os.path.abspath(args.keel)
    only = set(filter(None, args.only.split(",")))
    tmp = tempfile.mkdtemp(prefix="keel-img-bench-", dir=args.dir)
    try:
        raw = os.path.join(tmp, "disk.raw")
        make_disk(raw, args.size << 20)
        q = os.path.join(tmp, "disk.qcow2")
        qz = os.path.join(tmp, "disk-zlib.qcow2")
        qs = os.path.join(tmp, "disk-zstd.qcow2")
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, q], check=True)
        subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", raw, qz], check=True)
        subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", raw, qs], check=True)
        out = os.path.join(tmp, "out")
        print(f"disk: {args.size} MiB, ~42% allocated; median of {args.repeat}; ratio = qemu / keel (>1: keel faster)")
        print(f"{'case':<34} {'qemu':>12} {'keel':>12}   ratio   (cpu: user+sys of the tool)")
        ratios = {}

        def case(name, qargs, kargs, setup=None):
            if only and name not in only and not any(o in name for o in only):
                return
            ratios[name] = bench_pair(name, ["qemu-img"] + qargs, [keel] + kargs, args.repeat, setup)

        rm_out = lambda _which: os.path.exists(out) and os.unlink(out)
        case("convert raw->qcow2", ["convert", "-O", "qcow2", raw, out], ["convert", "-O", "qcow2", raw, out], rm_out)
        case("convert qcow2->raw", ["convert", "-O", "raw", q, out], ["convert", "-O", "raw", q, out], rm_out)
        case("convert zlib qcow2->raw", ["convert", "-O", "raw", qz, out], ["convert", "-O", "raw", qz, out], rm_out)
        case("convert zstd qcow2->raw", ["convert", "-O", "raw", qs, out], ["convert", "-O", "raw", qs, out], rm_out)
        case("convert -c raw->zlib qcow2", ["convert", "-c", "-O", "qcow2", raw, out],
             ["convert", "-c", "-O", "qcow2", raw, out], rm_out)
        case("compare raw qcow2", ["compare", raw, q], ["compare", raw, q])
        case("check", ["check", q], ["check", q])
        case("check zlib", ["check", qz], ["check", qz])
        case("info", ["info", q], ["info", q])
        case("map", ["map", "--output=json", q], ["map", "--output=json", q])
        # 4k requests scattered over the disk (a 1 MiB + 4 KiB stride), depth 16.
        bw = os.path.join(tmp, "bench.qcow2")
        reset_bench = lambda _which: shutil.copyfile(q, bw)
        case("bench 4k read", ["bench", "-c", "100000", "-d", "16", "-s", "4k", "-S", "1052672", q],
             ["bench", "-c", "100000", "-d", "16", "-s", "4k", "-S", "1052672", q])
        case("bench 4k write", ["bench", "-w", "-c", "50000", "-d", "16", "-s", "4k", "-S", "1052672", bw],
             ["bench", "-w", "-c", "50000", "-d", "16", "-s", "4k", "-S", "1052672", bw], reset_bench)
        # Allocating 4k writes with a flush every 16 requests, on a fresh image, with and without
        # lazy refcounts. Flushes cost real syncs only on a real disk, so these run in --sync-dir.
        sync_tmp = tempfile.mkdtemp(prefix="keel-img-bench-", dir=args.sync_dir)
        try:
            for lazy in ("off", "on"):
                bl = os.path.join(sync_tmp, "alloc.qcow2")
                fresh = lambda _which, lazy=lazy, bl=bl: subprocess.run(
                    ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"lazy_refcounts={lazy}", bl, "4G"], check=True)
                bargs = ["bench", "-w", "-c", "4000", "-d", "16", "-s", "4k", "-S", "1052672", "--flush-interval=16", bl]
                case(f"bench alloc write flush/16 lazy={lazy}", bargs, bargs, fresh)
            off, on = MEDIANS.get("bench alloc write flush/16 lazy=off"), MEDIANS.get("bench alloc write flush/16 lazy=on")
            if off and on:
                print(f"{'  lazy refcounts gain (off/on)':<34} qemu {off[0] / on[0]:5.2f}x   keel {off[1] / on[1]:5.2f}x")
        finally:
            shutil.rmtree(sync_tmp, ignore_errors=True)
        # cache=none (O_DIRECT): needs a file system that takes it (tmpfs does since Linux 6.6).
        case("convert -t none raw->qcow2", ["convert", "-t", "none", "-O", "qcow2", raw, out],
             ["convert", "-t", "none", "-O", "qcow2", raw, out], rm_out)
        case("convert -T none qcow2->raw", ["convert", "-T", "none", "-O", "raw", q, out],
             ["convert", "-T", "none", "-O", "raw", q, out], rm_out)
        case("bench 4k read -t none", ["bench", "-t", "none", "-c", "100000", "-d", "16", "-s", "4k", "-S", "1052672", q],
             ["bench", "-t", "none", "-c", "100000", "-d", "16", "-s", "4k", "-S", "1052672", q])
        case("bench 4k write -t none",
             ["bench", "-t", "none", "-w", "-c", "50000", "-d", "16", "-s", "4k", "-S", "1052672", bw],
             ["bench", "-t", "none", "-w", "-c", "50000", "-d", "16", "-s", "4k", "-S", "1052672", bw], reset_bench)
        # Extended L2: 4k writes into a fresh image with 64 KiB clusters allocate one subcluster
        # (2 KiB) pair each; copy-on-write is nothing (no backing file).
        xl = os.path.join(tmp, "xl.qcow2")
        fresh_xl = lambda _which: subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on",
                                                  xl, f"{args.size}M"], check=True)
        case("bench 4k write extended_l2", ["bench", "-w", "-c", "50000", "-d", "16", "-s", "4k", "-S", "1052672", xl],
             ["bench", "-w", "-c", "50000", "-d", "16", "-s", "4k", "-S", "1052672", xl], fresh_xl)
        if not only or any("serve" in o for o in only):
            if shutil.which("qemu-nbd"):
                for r in bench_serve(keel, tmp, q, args.repeat):
                    pass
            else:
                print("serve: qemu-nbd not installed, skipped")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
