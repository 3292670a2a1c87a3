#!/usr/bin/env python3
"""Real QEMU against Keel's vhost-user virtio-net back-end.

  vhost_qemu_test.py --kit DIR --responder PATH [--accel-cmd PATH] server
      keel-vhost-responder listens; QEMU connects (-chardev socket,path=...). The guest pings the
      responder through the back-end; QEMU is killed; a new QEMU connects to the same back-end and
      pings again.
  vhost_qemu_test.py ... client
      QEMU listens (server=on); the back-end connects, and reconnects to the second QEMU after the
      first is killed. This case runs two queue pairs (queues=2, mq=on, -smp 2).

Every process is ended by its pid. Frames only move between QEMU's shared memory and the
responder: no host network is involved.
"""
import argparse
import base64
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "lib"))
from console_process import ConsoleProcess as Process, accelerator  # noqa: E402

QEMU = "qemu-system-x86_64"
GUEST_IP = "10.0.2.15"
RESPONDER_IP = "10.0.2.2"


def start_qemu(name, kit, accel, sock, qemu_listens, command, reconnect=False, queues=1):
    chardev = f"socket,id=c0,path={sock}" + (",server=on" if qemu_listens else "")
    if reconnect:
        chardev += ",reconnect=1"
    run64 = base64.b64encode(command.encode()).decode()
    append = (f"console=ttyS0 quiet panic=-1 keel.hostname={name} keel.ip={GUEST_IP}/24 "
              f"keel.run64={run64}")
    netdev = "vhost-user,id=n0,chardev=c0"
    device = "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,romfile=,vectors=0"
    if queues > 1:
        netdev += f",queues={queues}"
        device += ",mq=on"
    args = [QEMU, "-machine", "q35", "-accel", accel, "-smp", str(queues),
            "-bios", "/usr/share/qemu/qboot.rom",
            "-nodefaults", "-no-user-config", "-m", "256", "-display", "none", "-serial", "stdio",
            "-no-reboot",
            "-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-numa", "node,memdev=mem",
            "-kernel", os.path.join(kit, "vmlinuz"), "-initrd", os.path.join(kit, "initramfs.cpio.gz"),
            "-append", append,
            # vectors=0 (INTx): QEMU 7.2 under TCG segfaults in msix_set_vector_notifiers when a
            # vhost-user virtio-net-pci with MSI-X starts (before it sends SET_FEATURES).
            "-chardev", chardev, "-netdev", netdev, "-device", device]
    return Process(name, args)


def fail(what, *procs):
    print(f"FAIL: {what}")
    for p in procs:
        print(f"--- {p.name} (last lines) ---\n{p.output()}")
    sys.exit(1)


PING = f"ping -c 3 -W 5 {RESPONDER_IP}"


def ping_and_check(qemu, responder, keep_running, after=0):
    """Waits for the guest's ping summary; returns packets received."""
    m = qemu.wait_for(r"(\d+) packets transmitted, (\d+) packets received", 150, after)
    if not m:
        fail("guest ping did not finish", qemu, responder)
    received = int(m.group(2))
    print(f"{qemu.name}: ping {m.group(0)} after {time.monotonic() - qemu.start:.1f}s")
    if received < 2:
        fail(f"only {received} of 3 echo replies came back", qemu, responder)
    if not keep_running:
        if not qemu.wait_for(r"KEEL-EXIT 0", 30):
            fail("guest did not exit 0", qemu, responder)
    return received


def run_case(args, mode):
    accel = accelerator(args.accel_cmd)
    with tempfile.TemporaryDirectory(prefix="keel-vhost-it-") as tmp:
        sock = os.path.join(tmp, "vhost.sock")
        qemu_listens = mode == "client"
        responder_args = [args.responder, "--socket", sock, "--ip", RESPONDER_IP]
        # The client case also runs two queue pairs (and two vCPUs, so Linux uses both).
        queues = 2 if qemu_listens else 1
        if qemu_listens:
            responder_args += ["--client", "--queues", "2"]
        responder = Process("responder", responder_args)
        procs = [responder]
        try:
            if not responder.wait_for(r"^READY", 10):
                fail("responder did not start", responder)

            # First QEMU: ping, then keep running until we kill it.
            show_queues = "ls /sys/class/net/eth0/queues; "
            q1 = start_qemu("vm1", args.kit, accel, sock, qemu_listens,
                            show_queues + PING + "; echo PING-DONE; sleep 600", queues=queues)
            procs.append(q1)
            if queues > 1 and not q1.wait_for(r"rx-1", 150):
                fail("the guest has no second receive queue", q1, responder)
            ping_and_check(q1, responder, keep_running=True)
            if not responder.wait_for(r"^LINK up", 5):
                fail("responder never saw the link up", responder)
            q1.kill()
            print("vm1: killed")
            if not responder.wait_for(r"^LINK down", 10):
                fail("responder did not notice QEMU going away", responder)
            if not responder.alive():
                fail("responder died with QEMU", responder)

            # Second QEMU on the same socket path: the same responder serves it.
            q2 = start_qemu("vm2", args.kit, accel, sock, qemu_listens, PING, queues=queues)
            procs.append(q2)
            ping_and_check(q2, responder, keep_running=False)
            q2.proc.wait(30)
            if not responder.alive():
                fail("responder died", responder)
            responder.terminate()
            m = responder.wait_for(r"^COUNTERS .*", 5)
            if not m:
                fail("responder printed no counters", responder)
            print(f"responder: {m.group(0)}")
            counters = dict(kv.split("=") for kv in m.group(0).split()[1:])
            if int(counters["connections"]) < 2:
                fail("responder did not serve two connections", responder)
            if int(counters["echo_replies"]) < 4 or int(counters["device_errors"]) != 0:
                fail("unexpected responder counters", responder)
        finally:
            for p in reversed(procs):
                p.kill()
    print(f"PASS {mode}")


def run_backend_restart(args):
    """The back-end process dies and a new one takes the socket over; QEMU (reconnect=1) reconnects
    and the running guest's NIC works again, as when keel-switch restarts under running VMs."""
    accel = accelerator(args.accel_cmd)
    with tempfile.TemporaryDirectory(prefix="keel-vhost-it-") as tmp:
        sock = os.path.join(tmp, "vhost.sock")
        # The second back-end answers for another address, so the guest can tell it is there.
        second_ip = "10.0.2.3"
        r1 = Process("responder1", [args.responder, "--socket", sock, "--ip", RESPONDER_IP])
        procs = [r1]
        try:
            if not r1.wait_for(r"^READY", 10):
                fail("responder did not start", r1)
            # After the first ping the test replaces the back-end; the guest waits until the new one
            # answers, then pings it for real.
            command = (PING + "; echo PING1-DONE; i=0; while [ $i -lt 90 ]; do "
                       f"ping -c 1 -W 1 {second_ip} >/dev/null 2>&1 && break; i=$((i+1)); done; "
                       f"ping -c 3 -W 5 {second_ip}")
            q = start_qemu("vm", args.kit, accel, sock, False, command, reconnect=True)
            procs.append(q)
            ping_and_check(q, r1, keep_running=True)
            first = q.next_line
            r1.kill()
            print("responder1: killed")
            r2 = Process("responder2", [args.responder, "--socket", sock, "--ip", second_ip])
            procs.append(r2)
            if not r2.wait_for(r"^READY", 10):
                fail("second responder did not start", r2)
            if not r2.wait_for(r"^LINK up", 30):
                fail("QEMU did not reconnect to the new back-end", q, r2)
            ping_and_check(q, r2, keep_running=False, after=first)
            r2.terminate()
            m = r2.wait_for(r"^COUNTERS .*", 5)
            if not m:
                fail("responder printed no counters", r2)
            print(f"responder2: {m.group(0)}")
            counters = dict(kv.split("=") for kv in m.group(0).split()[1:])
            if int(counters["echo_replies"]) < 2 or int(counters["device_errors"]) != 0:
                fail("unexpected responder counters", r2, q)
        finally:
            for p in reversed(procs):
                p.kill()
    print("PASS backend-restart")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kit", required=True)
    p.add_argument("--responder", required=True)
    p.add_argument("--accel-cmd")
    p.add_argument("mode", choices=["server", "client", "backend-restart"])
    args = p.parse_args()
    for f in ("vmlinuz", "initramfs.cpio.gz"):
        if not os.path.exists(os.path.join(args.kit, f)):
            sys.exit(f"guest kit missing {f} in {args.kit}: run guest/build.sh kit")
    if args.mode == "backend-restart":
        run_backend_restart(args)
    else:
        run_case(args, args.mode)


if __name__ == "__main__":
    main()
