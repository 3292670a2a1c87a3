#!/usr/bin/env python3
"""Real QEMU against Keel's vhost-user virtio-net back-end.

  vhost_qemu_test.py --kit DIR --responder PATH [--accel-cmd PATH] server
      keel-vhost-responder listens; QEMU connects (-chardev socket,path=...). The guest pings the
      responder through the back-end; QEMU is killed; a new QEMU connects to the same back-end and
      pings again.
  vhost_qemu_test.py ... client
      QEMU listens (server=on); the back-end connects, and reconnects to the second QEMU after the
      first is killed. This case runs two queue pairs (queues=2, mq=on, -smp 2).
  vhost_qemu_test.py ... live-migrate
      The guest pings the responder without pause while QEMU migrates it live into a file (QMP
      migrate, bandwidth capped so the guest runs through several dirty-page rounds): the back-end
      logs every page it writes (VHOST_F_LOG_ALL, SET_LOG_BASE). A second QEMU loads the file
      (-incoming) onto the same back-end and the restored guest keeps pinging.

Every process is ended by its pid. Frames only move between QEMU's shared memory and the
responder: no host network is involved.
"""
import argparse
import base64
import json
import os
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "lib"))
from console_process import ConsoleProcess as Process, accelerator  # noqa: E402

QEMU = "qemu-system-x86_64"
GUEST_IP = "10.0.2.15"
RESPONDER_IP = "10.0.2.2"


def start_qemu(name, kit, accel, sock, qemu_listens, command, reconnect=False, queues=1, extra=()):
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
            "-chardev", chardev, "-netdev", netdev, "-device", device, *extra]
    return Process(name, args)


class Qmp:
    """A minimal QMP client on QEMU's monitor socket."""

    def __init__(self, path, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self):
        while True:
            line = self.file.readline()
            if not line:
                raise RuntimeError("QMP closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def execute(self, command, **arguments):
        self.file.write(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
        self.file.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"{command}: {reply['error']}")
        return reply["return"]

    def close(self):
        self.sock.close()


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


def responder_counters(responder, *others):
    """Stops the responder (SIGTERM) and returns the counters it prints on the way out."""
    responder.terminate()
    m = responder.wait_for(r"^COUNTERS .*", 5)
    if not m:
        fail("responder printed no counters", responder, *others)
    print(f"{responder.name}: {m.group(0)}")
    return dict(kv.split("=") for kv in m.group(0).split()[1:])


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
            counters = responder_counters(responder)
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
            counters = responder_counters(r2)
            if int(counters["echo_replies"]) < 2 or int(counters["device_errors"]) != 0:
                fail("unexpected responder counters", r2, q)
        finally:
            for p in reversed(procs):
                p.kill()
    print("PASS backend-restart")


def run_live_migrate(args):
    accel = accelerator(args.accel_cmd)
    with tempfile.TemporaryDirectory(prefix="keel-vhost-it-") as tmp:
        sock = os.path.join(tmp, "vhost.sock")
        state = os.path.join(tmp, "vm.state")
        responder = Process("responder", [args.responder, "--socket", sock, "--ip", RESPONDER_IP])
        procs = [responder]
        try:
            if not responder.wait_for(r"^READY", 10):
                fail("responder did not start", responder)
            # Echo requests (and so frames the back-end writes into guest memory) without pause, and
            # a PONG line per reply so the restored guest shows it still reaches the back-end.
            command = (f"while true; do ping -c 1 -W 2 {RESPONDER_IP} >/dev/null 2>&1 && echo PONG; "
                       "done")
            qmp1_path = os.path.join(tmp, "qmp1.sock")
            q1 = start_qemu("vm1", args.kit, accel, sock, False, command,
                            extra=["-qmp", f"unix:{qmp1_path},server=on,wait=off"])
            procs.append(q1)
            if not q1.wait_for(r"PONG", 150):
                fail("the guest never got an echo reply", q1, responder)
            qmp = Qmp(qmp1_path)
            # Capped bandwidth: RAM takes seconds to copy while the guest keeps running and the
            # back-end keeps writing, so dirty pages are sent again from the log.
            qmp.execute("migrate-set-parameters", **{"max-bandwidth": 16 << 20})
            qmp.execute("migrate", uri=f"exec:cat > {state}")
            deadline = time.monotonic() + 120
            while True:
                info = qmp.execute("query-migrate")
                status = info.get("status", "")
                if status == "completed":
                    break
                if status in ("failed", "cancelled") or time.monotonic() > deadline:
                    fail(f"migration {status}: {info}", q1, responder)
                time.sleep(0.2)
            ram = info.get("ram", {})
            print(f"vm1: migrated: {ram.get('transferred', 0) >> 20} MiB, "
                  f"{ram.get('dirty-sync-count', 0)} dirty syncs, {ram.get('normal', 0)} normal pages")
            qmp.close()
            # More than the first and the final sync: the guest ran (and the back-end wrote) while
            # pages were being sent, and the log told QEMU what to send again.
            if ram.get("dirty-sync-count", 0) < 3:
                fail(f"the migration did not iterate: {info}", q1, responder)
            if not responder.wait_for(r"dirty-page logging on", 5):
                fail("the back-end was never asked to log dirty pages", responder)
            q1.kill()
            print("vm1: killed")
            if not responder.wait_for(r"^LINK down", 10):
                fail("responder did not notice QEMU going away", responder)

            # The second QEMU loads the state and runs the guest on from where it was.
            q2 = start_qemu("vm2", args.kit, accel, sock, False, command,
                            extra=["-incoming", f"exec:cat {state}"])
            procs.append(q2)
            if not q2.wait_for(r"PONG", 60):
                fail("the restored guest does not reach the back-end", q2, responder)
            if not q2.wait_for(r"PONG", 30, q2.next_line):
                fail("the restored guest stopped reaching the back-end", q2, responder)
            print(f"vm2: restored guest pings after {time.monotonic() - q2.start:.1f}s")
            q2.kill()
            counters = responder_counters(responder)
            if int(counters["connections"]) < 2 or int(counters["device_errors"]) != 0:
                fail("unexpected responder counters", responder)
        finally:
            for p in reversed(procs):
                p.kill()
    print("PASS live-migrate")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kit", required=True)
    p.add_argument("--responder", required=True)
    p.add_argument("--accel-cmd")
    p.add_argument("mode", choices=["server", "client", "backend-restart", "live-migrate"])
    args = p.parse_args()
    for f in ("vmlinuz", "initramfs.cpio.gz"):
        if not os.path.exists(os.path.join(args.kit, f)):
            sys.exit(f"guest kit missing {f} in {args.kit}: run guest/build.sh kit")
    if args.mode == "backend-restart":
        run_backend_restart(args)
    elif args.mode == "live-migrate":
        run_live_migrate(args)
    else:
        run_case(args, args.mode)


if __name__ == "__main__":
    main()
