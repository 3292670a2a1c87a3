#!/usr/bin/env python3
"""keeld + keel vs libvirtd + virsh, side by side, with the same QEMU guest (the guest kit's kernel
and initramfs, 128 MiB, 1 vCPU, TCG).

Measures, alternating the two stacks in every iteration (2 cores: never one then the other):
  list       `keel list --all`            vs `virsh list --all`
  dominfo    `keel dominfo X`             vs `virsh dominfo X`
  define     `keel define X.json`         vs `virsh define X.xml`
  undefine   `keel undefine X`            vs `virsh undefine X`
  start      `keel start X` to running    vs `virsh start X` (both return once QEMU runs the guest)
  destroy    `keel destroy X`             vs `virsh destroy X`
and prints medians, p90s and the ratio keel/libvirt (lower is better) against the targets.

Usage: bench/hostd/bench.py --keeld build/src/hostd/keeld --keel build/src/cli/keel [--iterations 30]
Needs root (libvirtd's qemu:///system). Starts virtlogd and libvirtd itself if they are not running
and stops what it started, by pid.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

TARGETS = {"list": 1 / 3, "dominfo": 1 / 3, "define": 1 / 3, "undefine": 1 / 3, "start": 1 / 2, "destroy": 1 / 4}


def run(cmd, env=None, check=True):
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if check and p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
    return dt


def pid_of(name):
    p = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True)
    return [int(x) for x in p.stdout.split()]


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    ap = argparse.ArgumentParser()
    ap.add_argument("--keeld", default=os.path.join(root, "build/src/hostd/keeld"))
    ap.add_argument("--keel", default=os.path.join(root, "build/src/cli/keel"))
    ap.add_argument("--kit", default=os.path.join(root, "guest/out"))
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="keel-bench-", dir="/tmp")
    os.chmod(work, 0o755)
    started = []  # processes this script started, stopped by pid at the end
    keeld = None
    try:
        # The same kernel and initramfs for both, where libvirt's qemu user can read them.
        for f in ("vmlinuz", "initramfs.cpio.gz"):
            shutil.copy(os.path.join(args.kit, f), os.path.join(work, f))
            os.chmod(os.path.join(work, f), 0o644)
        kernel, initrd = os.path.join(work, "vmlinuz"), os.path.join(work, "initramfs.cpio.gz")
        cmdline = "console=ttyS0 quiet"

        # libvirt: virtlogd first, then libvirtd (as MACHINE-NOTES says).
        for daemon in ("virtlogd", "libvirtd"):
            if not pid_of(daemon):
                subprocess.run([daemon, "-d"], check=True)
                for _ in range(100):
                    if pid_of(daemon):
                        break
                    time.sleep(0.05)
                started += [(daemon, p) for p in pid_of(daemon)]
        virsh = ["virsh", "-q", "-c", "qemu:///system"]
        for _ in range(100):
            if subprocess.run(virsh + ["version"], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)

        state = os.path.join(work, "keel")
        sock = os.path.join(work, "keeld.sock")
        keeld = subprocess.Popen([args.keeld, "--state-dir", state, "--socket", sock, "--log-level", "warn"],
                                 stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "keeld.log"), "w"))
        env = dict(os.environ, KEEL_CONNECT="unix:" + sock)
        for _ in range(200):
            if subprocess.run([args.keel, "list"], env=env, capture_output=True).returncode == 0:
                break
            time.sleep(0.05)
        keel = [args.keel]

        name_k, name_l = "bench-keel", "bench-libvirt"
        kjson = os.path.join(work, "k.json")
        with open(kjson, "w") as f:
            json.dump({"name": name_k, "memory": "128M", "vcpus": 1, "machine": "q35",
                       "boot": {"kernel": kernel, "initrd": initrd, "cmdline": cmdline}}, f)
        lxml = os.path.join(work, "l.xml")
        with open(lxml, "w") as f:
            f.write(f"""<domain type='qemu'>
  <name>{name_l}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type><kernel>{kernel}</kernel><initrd>{initrd}</initrd>
      <cmdline>{cmdline}</cmdline></os>
  <features><acpi/></features>
  <devices>
    <serial type='pty'/>
    <memballoon model='none'/>
  </devices>
</domain>
""")
        # Leftovers of an interrupted run.
        subprocess.run(virsh + ["destroy", name_l], capture_output=True)
        subprocess.run(virsh + ["undefine", name_l], capture_output=True)

        results = {k: {"keel": [], "libvirt": []} for k in TARGETS}

        def both(op, keel_cmd, virsh_cmd, i):
            # Alternate which goes first so neither always runs on a warmer machine.
            order = [("keel", keel_cmd), ("libvirt", virsh_cmd)]
            if i % 2:
                order.reverse()
            for who, cmd in order:
                results[op][who].append(run(cmd, env=env))

        # A defined, running pair for list/dominfo, so those report a live domain.
        run(keel + ["define", kjson], env=env)
        run(virsh + ["define", lxml])
        for i in range(args.iterations):
            both("start", keel + ["start", name_k], virsh + ["start", name_l], i)
            both("list", keel + ["list", "--all"], virsh + ["list", "--all"], i)
            both("dominfo", keel + ["dominfo", name_k], virsh + ["dominfo", name_l], i)
            both("destroy", keel + ["destroy", name_k], virsh + ["destroy", name_l], i)
            both("undefine", keel + ["undefine", name_k], virsh + ["undefine", name_l], i)
            both("define", keel + ["define", kjson], virsh + ["define", lxml], i)
            print(f"\riteration {i + 1}/{args.iterations}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        run(keel + ["undefine", name_k], env=env, check=False)
        run(virsh + ["undefine", name_l], check=False)

        print(f"keeld+keel vs libvirtd+virsh, {args.iterations} iterations, same guest "
              f"(128 MiB, 1 vCPU, TCG); times in ms")
        print(f"{'operation':<10} {'keel p50':>9} {'keel p90':>9} {'virsh p50':>10} {'virsh p90':>10} "
              f"{'ratio':>7} {'target':>7}  ")
        summary = {}
        for op, target in TARGETS.items():
            k, l = results[op]["keel"], results[op]["libvirt"]
            kp50, lp50 = statistics.median(k) * 1000, statistics.median(l) * 1000
            kp90 = sorted(k)[int(len(k) * 0.9) - 1] * 1000
            lp90 = sorted(l)[int(len(l) * 0.9) - 1] * 1000
            ratio = kp50 / lp50
            summary[op] = {"keel_ms": kp50, "libvirt_ms": lp50, "ratio": ratio, "target": target}
            verdict = "met" if ratio <= target else "MISSED"
            print(f"{op:<10} {kp50:9.1f} {kp90:9.1f} {lp50:10.1f} {lp90:10.1f} {ratio:7.3f} {target:7.3f}  {verdict}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)
    finally:
        if keeld:
            subprocess.run([args.keel, "destroy", "bench-keel"], env=dict(os.environ, KEEL_CONNECT="unix:" + os.path.join(work, "keeld.sock")),
                           capture_output=True)
            keeld.send_signal(signal.SIGTERM)
            keeld.wait(10)
        subprocess.run(["virsh", "-c", "qemu:///system", "destroy", "bench-libvirt"], capture_output=True)
        subprocess.run(["virsh", "-c", "qemu:///system", "undefine", "bench-libvirt"], capture_output=True)
        for daemon, pid in reversed(started):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
