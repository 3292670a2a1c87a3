#!/usr/bin/env python3
"""Two QEMU guests ping each other through keel-switch over vhost-user.

  vhost_guests.py --bin-dir DIR --kit DIR [--accel-cmd PATH]

keel-switch runs in a network namespace of its own (its bridge's internal port is a tap there) with
bridge br0 and two vhost-user ports, one per socket mode:
  vm1  type=vhostuser: the switch listens (STATE_DIR/vhost-user/vm1), QEMU connects
  vm2  type=vhostuser options:vhost-server-path=SOCK: QEMU listens (server=on), the switch connects
Both guests (the guest kit, TCG) boot in parallel. vm2 pings vm1; then a flow installed with
ovs-ofctl drops vm2's ICMP and vm2's ping fails; the flow is deleted and the ping works again. The
guests wait on their serial console (`read`) between the steps, so the test and the guests move in
lock step. vm2 then fetches 1 MiB from vm1's busybox httpd (TCP with checksum and segmentation
offloads negotiated: vm1's super-frames cross the switch whole) and the copy must match. Then keel-switch is killed and started again with its saved configuration while the guests
run: vm1's QEMU (reconnect=1) reconnects, the switch reconnects to vm2's QEMU, and vm2 pings again. Checked on the way: both guests end with KEEL-EXIT 0, fdb/show has both MACs,
port-stats counts frames both ways, ovs-ofctl show and PORT_STATUS (ovs-ofctl monitor) report the
links going up and down, a port with options:socket-path listens there, bad options are refused.
Every process started here is ended by its pid; the namespace is deleted.
"""
import argparse
import base64
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "lib"))
from console_process import ConsoleProcess as Process, accelerator  # noqa: E402

QEMU = "qemu-system-x86_64"
OF_PORT = 6653
VM1 = {"name": "vm1", "ip": "10.0.0.1", "mac": "52:54:00:00:0a:01"}
VM2 = {"name": "vm2", "ip": "10.0.0.2", "mac": "52:54:00:00:0a:02"}
# Generous: the build machines are shared and TCG is slow.
BOOT_AND_PING_TIMEOUT = 240


class Test:
    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="ksw-vhost-")
        self.netns = f"kswvh{os.getpid()}"
        self.procs = []
        self.switch = None
        self.state = os.path.join(self.tmp, "state")
        self.ctl_sock = os.path.join(self.state, "ctl.sock")
        self.checks = 0

    # --- helpers -------------------------------------------------------------------------------

    def fail(self, what, *procs):
        print(f"FAIL: {what}")
        for p in procs:
            print(f"--- {p.name} (last lines) ---\n{p.output()}")
        log = os.path.join(self.state, "keel-switch.log")
        if os.path.exists(log):
            with open(log, errors="replace") as f:
                print("--- keel-switch log (last lines) ---\n" + "".join(f.readlines()[-40:]))
        sys.exit(1)

    def ok(self, what):
        self.checks += 1
        print(f"ok {self.checks} - {what}", flush=True)

    def ctl(self, *argv, check=True):
        r = subprocess.run([os.path.join(self.args.bin_dir, "keel-switch-ctl"), "--socket", self.ctl_sock, *argv],
                           capture_output=True, text=True, timeout=30)
        if check and r.returncode != 0:
            self.fail(f"keel-switch-ctl {' '.join(argv)}: {r.stdout}{r.stderr}")
        return r

    def ofctl(self, *argv):
        r = subprocess.run(["ip", "netns", "exec", self.netns, "ovs-ofctl", "-O", "OpenFlow13", *argv[:1],
                            f"tcp:127.0.0.1:{OF_PORT}", *argv[1:]], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            self.fail(f"ovs-ofctl {' '.join(argv)}: {r.stdout}{r.stderr}")
        return r.stdout

    def start_guest(self, vm, sock, qemu_listens, command, reconnect=False):
        chardev = f"socket,id=c0,path={sock}" + (",server=on,wait=off" if qemu_listens else "")
        if reconnect:
            chardev += ",reconnect=1"
        run64 = base64.b64encode(command.encode()).decode()
        append = (f"console=ttyS0 quiet panic=-1 keel.hostname={vm['name']} keel.ip={vm['ip']}/24 "
                  f"keel.run64={run64}")
        kit = self.args.kit
        args = [QEMU, "-machine", "q35", "-accel", accelerator(self.args.accel_cmd), "-bios", "/usr/share/qemu/qboot.rom",
                "-nodefaults", "-no-user-config", "-m", "256", "-display", "none", "-serial", "stdio", "-no-reboot",
                "-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-numa", "node,memdev=mem",
                "-kernel", os.path.join(kit, "vmlinuz"), "-initrd", os.path.join(kit, "initramfs.cpio.gz"),
                "-append", append, "-chardev", chardev, "-netdev", "vhost-user,id=n0,chardev=c0",
                # vectors=0 (INTx): QEMU 7.2 under TCG segfaults in msix_set_vector_notifiers when a
                # vhost-user virtio-net-pci with MSI-X starts.
                "-device", f"virtio-net-pci,netdev=n0,mac={vm['mac']},romfile=,vectors=0"]
        p = Process(vm["name"], args, stdin=subprocess.PIPE)
        self.procs.append(p)
        return p

    def start_switch(self):
        # A killed switch leaves its control socket behind: only a new one means it is up.
        if os.path.exists(self.ctl_sock):
            os.unlink(self.ctl_sock)
        log = open(os.path.join(self.state, "keel-switch.log"), "a")
        self.switch = subprocess.Popen(["ip", "netns", "exec", self.netns,
                                        os.path.join(self.args.bin_dir, "keel-switch"), "--state-dir", self.state,
                                        "--ctl-socket", self.ctl_sock, "--log-level", "info"],
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.switch_started = time.monotonic()
        for _ in range(200):
            if os.path.exists(self.ctl_sock):
                break
            time.sleep(0.05)
        else:
            self.fail("keel-switch did not start")

    def start_monitor(self, name):
        # OVS_RUNDIR: where ovs-ofctl monitor puts its unixctl socket (/var/run/openvswitch may not exist).
        monitor = Process(name, ["env", f"OVS_RUNDIR={self.tmp}", "ip", "netns", "exec", self.netns,
                                 "ovs-ofctl", "-O", "OpenFlow13", "monitor", f"tcp:127.0.0.1:{OF_PORT}"])
        self.procs.append(monitor)
        time.sleep(0.5)
        return monitor

    def port_status_states(self, monitor, ofport, name):
        """The port states PORT_STATUS(MODIFY) messages gave for a port, in order."""
        return re.findall(rf"OFPT_PORT_STATUS.*MOD: {ofport}\({name}\):.*\n(?:\s+.*\n)*?\s+state:\s+(\S+)",
                          monitor.output(400) + "\n")

    def cleanup(self):
        for p in reversed(self.procs):
            p.stop()
        if self.switch and self.switch.poll() is None:
            self.switch.terminate()  # by pid
            try:
                self.switch.wait(10)
            except subprocess.TimeoutExpired:
                self.switch.kill()
                self.switch.wait()
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        subprocess.run(["rm", "-rf", self.tmp])

    # --- the test ------------------------------------------------------------------------------

    def run(self):
        for tool in (QEMU, "ovs-ofctl", "ip"):
            if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode != 0:
                self.fail(f"{tool} is not installed (scripts/setup.sh installs it)")
        for f in ("vmlinuz", "initramfs.cpio.gz"):
            if not os.path.exists(os.path.join(self.args.kit, f)):
                self.fail(f"guest kit: {f} missing in {self.args.kit} (run guest/build.sh)")

        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True)
        os.makedirs(self.state)
        self.start_switch()

        vm2_sock = os.path.join(self.tmp, "vm2.sock")
        self.ctl("add-br", "br0", "--", "set-controller", "br0", f"ptcp:{OF_PORT}:127.0.0.1",
                 "--", "add-port", "br0", "vm1", "--", "set", "interface", "vm1", "type=vhostuser",
                 "--", "add-port", "br0", "vm2", "--", "set", "interface", "vm2", "type=vhostuser",
                 f"options:vhost-server-path={vm2_sock}")
        show = self.ctl("show").stdout
        m = re.search(r"Interface vm1\n\s+type: vhostuser\n\s+socket: (\S+)", show)
        if not m:
            self.fail(f"show does not give vm1's socket:\n{show}")
        vm1_sock = m.group(1)
        if vm1_sock != os.path.join(self.state, "vhost-user", "vm1") or not os.path.exists(vm1_sock):
            self.fail(f"vm1's socket {vm1_sock} is not listening under the state dir")
        self.ok(f"server-mode port listens on {vm1_sock} (shown by keel-switch-ctl show)")

        # Options that cannot work are refused with a reason, and change nothing.
        r = self.ctl("add-port", "br0", "bad", "--", "set", "interface", "bad", "type=vhostuserclient", check=False)
        if r.returncode == 0 or "vhost-server-path" not in r.stdout + r.stderr:
            self.fail(f"vhostuserclient without a path was accepted: {r.stdout}{r.stderr}")
        r = self.ctl("add-port", "br0", "bad", "--", "set", "interface", "bad", "type=vhostuser",
                     "options:socket-path=/nonexistent-dir/x.sock", check=False)
        if r.returncode == 0:
            self.fail("a socket in a missing directory was accepted")
        self.ok("bad vhost-user options are refused: " + (r.stdout + r.stderr).strip().splitlines()[-1])
        # An explicit socket-path: listens there, and the socket goes with the port.
        vm3_sock = os.path.join(self.tmp, "vm3.sock")
        self.ctl("add-port", "br0", "vm3", "--", "set", "interface", "vm3", "type=vhostuser",
                 f"options:socket-path={vm3_sock}")
        if not os.path.exists(vm3_sock):
            self.fail("options:socket-path is not listened on")
        self.ctl("del-port", "br0", "vm3")
        if os.path.exists(vm3_sock):
            self.fail("the socket of a deleted port is left behind")
        self.ok("options:socket-path listens there; del-port removes the socket")

        ports = self.ofctl("show")
        ofport = {}
        for name in ("vm1", "vm2"):
            m = re.search(rf"(\d+)\({name}\): addr:\S+\n(?:\s+.*\n)*?\s+state:\s+(\S+)", ports)
            if not m:
                self.fail(f"ovs-ofctl show lacks {name}:\n{ports}")
            ofport[name] = int(m.group(1))
            if m.group(2) != "LINK_DOWN":
                self.fail(f"{name} is {m.group(2)} before any guest connected:\n{ports}")
        self.ok(f"ovs-ofctl show: vm1 (port {ofport['vm1']}) and vm2 (port {ofport['vm2']}) LINK_DOWN before boot")

        monitor = self.start_monitor("ofctl-monitor")

        # vm1 answers, pings vm2 once the peer is there, and stays up until told to finish.
        wait_peer = ("i=0; until ping -c 1 -W 2 {ip} >/dev/null 2>&1; do i=$((i+1)); "
                     "[ $i -ge 90 ] && break; done; ")
        # It also serves 1 MiB of random bytes over HTTP (busybox httpd) for vm2's TCP transfer.
        vm1_cmd = ("mkdir -p /tmp/www; dd if=/dev/urandom of=/tmp/www/blob bs=64k count=16 2>/dev/null; "
                   "echo VM1-BLOB=$(md5sum < /tmp/www/blob); httpd -p 80 -h /tmp/www; " +
                   wait_peer.format(ip=VM2["ip"]) + f"ping -c 2 -W 5 {VM2['ip']}; rc=$?; echo VM1-PING-RC=$rc; "
                   "read x; exit $rc")
        # vm2 pings vm1 three times: allowed, dropped by a flow, allowed again.
        vm2_cmd = (wait_peer.format(ip=VM1["ip"]) +
                   f"ping -c 3 -W 5 {VM1['ip']}; echo PING1-RC=$?; read x; "
                   f"ping -c 3 -W 2 {VM1['ip']}; echo PING2-RC=$?; read x; "
                   f"ping -c 3 -W 5 {VM1['ip']}; echo PING3-RC=$?; read x; "
                   # TCP: vm2 fetches vm1's 1 MiB (checksum and segmentation offloads both ways).
                   f"wget -q -O /tmp/got http://{VM1['ip']}/blob; echo WGET-RC=$?; "
                   "echo VM2-GOT=$(md5sum < /tmp/got); read x; " +
                   # The switch was killed and restarted: both NICs come back (vm1's QEMU reconnects,
                   # the switch reconnects to vm2's QEMU).
                   wait_peer.format(ip=VM1["ip"]) +
                   f"ping -c 3 -W 5 {VM1['ip']}; rc=$?; echo PING4-RC=$rc; exit $rc")
        t0 = time.monotonic()
        vm1 = self.start_guest(VM1, vm1_sock, False, vm1_cmd, reconnect=True)
        vm2 = self.start_guest(VM2, vm2_sock, True, vm2_cmd)

        m = vm2.wait_for(r"PING1-RC=(\d+)", BOOT_AND_PING_TIMEOUT)
        if not m or m.group(1) != "0":
            self.fail("vm2 could not ping vm1 through the switch", vm2, vm1)
        summary = vm2.wait_for(r"\d+ packets transmitted, \d+ packets received", 1)
        self.ok(f"vm2 pings vm1 through keel-switch ({summary.group(0) if summary else ''}) "
                f"{time.monotonic() - t0:.0f}s after boot start")
        m = vm1.wait_for(r"VM1-PING-RC=(\d+)", 60)
        if not m or m.group(1) != "0":
            self.fail("vm1 could not ping vm2 through the switch", vm1, vm2)
        self.ok("vm1 pings vm2 through keel-switch")

        fdb = self.ctl("fdb/show", "br0").stdout
        for vm in (VM1, VM2):
            if not re.search(rf"^\s*{ofport[vm['name']]}\s+0\s+{vm['mac']}\s", fdb, re.M):
                self.fail(f"fdb/show lacks {vm['name']}'s MAC on port {ofport[vm['name']]}:\n{fdb}")
        self.ok("fdb/show has both guests' MACs on their ports")
        stats = self.ctl("port-stats", "br0").stdout
        for name in ("vm1", "vm2"):
            m = re.search(rf"^{name} \(\d+\): rx_packets=(\d+) .*tx_packets=(\d+)", stats, re.M)
            if not m or int(m.group(1)) < 3 or int(m.group(2)) < 3:
                self.fail(f"port-stats for {name} do not show traffic both ways:\n{stats}")
        self.ok("port-stats count frames both ways on both ports")
        ports = self.ofctl("show")
        for name in ("vm1", "vm2"):
            if not re.search(rf"\({name}\): addr:\S+\n(?:\s+.*\n)*?\s+state:\s+LIVE", ports):
                self.fail(f"{name} is not LIVE in ovs-ofctl show:\n{ports}")
        self.ok("ovs-ofctl show: both vhost-user ports LIVE")

        # A flow that drops ICMP from vm2: its ping fails, ARP still passes.
        drop = f"priority=100,icmp,in_port={ofport['vm2']}"
        self.ofctl("add-flow", drop + ",actions=drop")
        vm2.say("go")
        m = vm2.wait_for(r"PING2-RC=(\d+)", 60)
        if not m:
            self.fail("vm2's second ping did not finish", vm2)
        if m.group(1) == "0":
            self.fail("vm2's ping went through despite the drop flow", vm2)
        flows = self.ofctl("dump-flows")
        m = re.search(r"n_packets=(\d+).*priority=100,icmp,in_port=", flows)
        if not m or int(m.group(1)) < 3:
            self.fail(f"the drop flow did not count vm2's echo requests:\n{flows}")
        self.ok(f"a drop-ICMP flow from ovs-ofctl makes vm2's ping fail (flow n_packets={m.group(1)})")
        self.ofctl("del-flows", "--strict", drop)
        vm2.say("go")
        m = vm2.wait_for(r"PING3-RC=(\d+)", 60)
        if not m or m.group(1) != "0":
            self.fail("vm2's ping did not work again once the flow was deleted", vm2)
        self.ok("with the flow deleted, vm2 pings vm1 again")
        for name in ("vm1", "vm2"):
            states = self.port_status_states(monitor, ofport[name], name)
            if "LIVE" not in states:
                self.fail(f"no PORT_STATUS reported {name} up (saw {states}):\n{monitor.output()}")
        self.ok("PORT_STATUS (ovs-ofctl monitor) reported both links coming up")
        monitor.stop()

        # TCP through the switch: vm2 fetches 1 MiB from vm1. The guests negotiated checksum and TCP
        # segmentation offload with the switch, so vm1's stack hands its NIC super-frames of up to
        # 64 KB; the switch forwards them whole to vm2. Either way the bytes must arrive intact.
        def frames_from_vm1():
            out = self.ctl("port-stats", "br0").stdout
            m = re.search(r"^vm1 \(\d+\): rx_packets=(\d+)", out, re.M)
            if not m:
                self.fail(f"port-stats lacks vm1:\n{out}")
            return int(m.group(1))
        before = frames_from_vm1()
        t_wget = time.monotonic()
        vm2.say("go")
        m = vm2.wait_for(r"WGET-RC=(\d+)", 120)
        if not m or m.group(1) != "0":
            self.fail("vm2 could not fetch vm1's file over TCP through the switch", vm2, vm1)
        got = vm2.wait_for(r"VM2-GOT=([0-9a-f]{32})", 10)
        sent = vm1.wait_for(r"VM1-BLOB=([0-9a-f]{32})", 1)
        if not got or not sent or got.group(1) != sent.group(1):
            self.fail(f"vm2's copy of vm1's file differs: {got and got.group(1)} vs {sent and sent.group(1)}", vm2, vm1)
        frames = frames_from_vm1() - before
        # 1 MiB in 1448-byte segments is 725 frames; super-frames carry at least two segments each.
        if frames >= 600:
            self.fail(f"vm1 sent 1 MiB in {frames} frames: no segmentation offload reached the switch")
        self.ok(f"TCP: vm2 fetched 1 MiB from vm1 intact (md5 {got.group(1)[:8]}..) in "
                f"{time.monotonic() - t_wget:.1f}s; vm1 sent it in {frames} frames (super-frames)")

        # The switch sleeps in epoll between frames: a port whose fd stayed readable would spin it.
        with open(f"/proc/{self.switch.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        lifetime = time.monotonic() - self.switch_started
        if cpu > 0.3 * lifetime:
            self.fail(f"keel-switch used {cpu:.1f}s of CPU in {lifetime:.0f}s: busy looping?")
        self.ok(f"keel-switch stayed mostly idle ({cpu:.2f}s CPU in {lifetime:.0f}s)")

        # The switch crashes and comes back with its saved configuration; the guests keep running.
        self.switch.kill()  # by pid
        self.switch.wait()
        t_restart = time.monotonic()
        self.start_switch()
        monitor = self.start_monitor("ofctl-monitor-2")
        vm2.say("go")
        m = vm2.wait_for(r"PING4-RC=(\d+)", 120)
        if not m or m.group(1) != "0":
            self.fail("after the switch restarted, vm2 could not ping vm1", vm2, vm1)
        self.ok(f"keel-switch killed and restarted: both guests' NICs reconnect, vm2 pings vm1 "
                f"({time.monotonic() - t_restart:.1f}s)")

        vm1.say("go")
        for vm in (vm1, vm2):
            if not vm.wait_for(r"KEEL-EXIT 0", 60):
                self.fail(f"{vm.name} did not end with KEEL-EXIT 0", vm)
            try:
                vm.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.fail(f"{vm.name} did not power off", vm)
        self.ok("both guests end with KEEL-EXIT 0 and power off")

        # The guests are gone: both links go down (within the bridge's link check).
        deadline = time.monotonic() + 15
        while True:
            ports = self.ofctl("show")
            down = [n for n in ("vm1", "vm2")
                    if re.search(rf"\({n}\): addr:\S+\n(?:\s+.*\n)*?\s+state:\s+LINK_DOWN", ports)]
            if len(down) == 2:
                break
            if time.monotonic() > deadline:
                self.fail(f"links not down after the guests left:\n{ports}")
            time.sleep(0.5)
        time.sleep(0.5)
        monitor.stop()
        for name in ("vm1", "vm2"):
            states = self.port_status_states(monitor, ofport[name], name)
            if not states or states[-1] != "LINK_DOWN":
                self.fail(f"no PORT_STATUS reported {name} down (saw {states}):\n{monitor.output()}")
        self.ok("PORT_STATUS (ovs-ofctl monitor) reported both links going down")
        if self.switch.poll() is not None:
            self.fail("keel-switch died")
        print(f"PASS ({self.checks} checks, {time.monotonic() - t0:.0f}s from boot start)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", required=True, help="directory with keel-switch and keel-switch-ctl")
    ap.add_argument("--kit", required=True, help="guest kit output (vmlinuz, initramfs.cpio.gz)")
    ap.add_argument("--accel-cmd", help="keel-accel, to pick kvm or tcg")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("FAIL: needs root (network namespace)")
        sys.exit(1)
    test = Test(args)
    try:
        test.run()
    finally:
        test.cleanup()


if __name__ == "__main__":
    main()
