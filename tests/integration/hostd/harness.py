"""Helpers for keeld's integration tests: a keeld in a temporary state dir, the keel CLI, the REST
API over the unix socket, and guest definitions from the guest kit. Standard library only."""

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=60):
        super().__init__("keeld", timeout=timeout)
        self.path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.path)
        self.sock = s


class Failure(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Failure(msg)


class Keeld:
    """One keeld process with its own state dir; ended by pid."""

    def __init__(self, args, extra=(), netns_cmd=()):
        self.args = args
        self.dir = tempfile.mkdtemp(prefix="keel-it-", dir="/tmp")
        os.chmod(self.dir, 0o711)
        self.state = os.path.join(self.dir, "state")
        self.socket = os.path.join(self.dir, "keeld.sock")
        self.log = os.path.join(self.dir, "keeld.log")
        self.extra = list(extra)
        self.netns_cmd = list(netns_cmd)
        self.proc = None

    def start(self):
        cmd = self.netns_cmd + [self.args.keeld, "--state-dir", self.state, "--socket", self.socket] + self.extra
        logf = open(self.log, "a")
        self.proc = subprocess.Popen(cmd, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise Failure(f"keeld exited with {self.proc.returncode}: {self.read_log()}")
            try:
                self.api("GET", "/v1/version")
                return self
            except (OSError, http.client.HTTPException):
                time.sleep(0.02)
        raise Failure("keeld did not come up: " + self.read_log())

    def read_log(self):
        try:
            with open(self.log) as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cleanup(self):
        """Destroys every VM this keeld knows (by its pid), stops keeld, removes the dir."""
        try:
            if self.proc and self.proc.poll() is None:
                for d in self.api("GET", "/v1/domains")[1]:
                    if d.get("id"):
                        self.api("POST", f"/v1/domains/{d['name']}/destroy")
                # Stopping a network ends its dnsmasq and removes its bridge.
                for n in self.api("GET", "/v1/networks")[1]:
                    if n.get("active"):
                        self.api("POST", f"/v1/networks/{n['name']}/stop")
        except Exception as e:  # noqa: BLE001 - best effort: still kill by pid below
            print("cleanup:", e, file=sys.stderr)
        # QEMUs that outlived keeld (pid in the database).
        try:
            import sqlite3
            db = sqlite3.connect(os.path.join(self.state, "keeld.db"))
            for (pid, uuid) in db.execute("SELECT pid, uuid FROM domains WHERE pid != 0"):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if uuid.encode() in f.read():
                            os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            db.close()
        except Exception:  # noqa: BLE001
            pass
        # A dnsmasq left by a keeld that could not stop its network (found by its pid file).
        for root, _, files in os.walk(os.path.join(self.state, "run")):
            if "dnsmasq.pid" in files:
                try:
                    with open(os.path.join(root, "dnsmasq.pid")) as f:
                        pid = int(f.read().strip())
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if self.state.encode() in f.read():
                            os.kill(pid, signal.SIGTERM)
                except (OSError, ValueError):
                    pass
        # The host's keel-switch (started detached by keeld, found by its pid file).
        try:
            with open(os.path.join(self.state, "run", "keel-switch.pid")) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if self.state.encode() in f.read():
                    os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):
            pass
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def api(self, method, path, body=None, raw=None, headers=None):
        conn = UnixHTTPConnection(self.socket)
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        conn.request(method, path, body=data, headers=headers or {})
        r = conn.getresponse()
        payload = r.read()
        conn.close()
        ctype = r.getheader("Content-Type", "")
        if ctype.startswith("application/json"):
            return r.status, json.loads(payload)
        return r.status, payload.decode(errors="replace")

    def keel(self, *argv, input=None, timeout=60, check_rc=None):
        env = dict(os.environ, KEEL_CONNECT="unix:" + self.socket)
        p = subprocess.run([self.args.keel] + list(argv), input=input, capture_output=True, text=True,
                           env=env, timeout=timeout)
        if check_rc is not None and p.returncode != check_rc:
            raise Failure(f"keel {' '.join(argv)}: exit {p.returncode}, wanted {check_rc}\n"
                          f"stdout: {p.stdout}\nstderr: {p.stderr}")
        return p

    def state_of(self, name):
        status, info = self.api("GET", f"/v1/domains/{name}")
        check(status == 200, f"dominfo {name}: {status} {info}")
        return info["state"]

    def wait_state(self, name, state, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.state_of(name) == state:
                return
            time.sleep(0.1)
        raise Failure(f"{name} did not reach state {state} in {timeout}s (is {self.state_of(name)})")

    def console_run(self, name, command, marker, timeout=60):
        """Types `command; echo <marker>` on the serial console and waits for the marker's output."""
        # The marker is printed by arithmetic so the echoed command line does not match it.
        p = self.keel("console", name, "--until", f"{marker}-42", "--timeout", str(timeout),
                      input=f"\n{command}; echo {marker}-$((6*7))\n", timeout=timeout + 10)
        if p.returncode != 0:
            raise Failure(f"console {name}: {command!r} gave no marker (exit {p.returncode})\n"
                          f"stdout: {p.stdout[-2000:]}\nstderr: {p.stderr}\n"
                          f"console log: {self.api('GET', f'/v1/domains/{name}/console/log')[1][-2000:]}")
        return p.stdout

    def wait_console(self, name, text, timeout=90):
        deadline = time.time() + timeout
        while time.time() < deadline:
            status, log = self.api("GET", f"/v1/domains/{name}/console/log")
            if status == 200 and text in log:
                return log
            time.sleep(0.2)
        raise Failure(f"{name}: '{text}' not on the console in {timeout}s:\n"
                      f"{self.api('GET', f'/v1/domains/{name}/console/log')[1][-2000:]}")


def guest_def(args, name, cmdline_extra="", memory="192M", **extra):
    d = {
        "name": name,
        "memory": memory,
        "vcpus": 1,
        "boot": {
            "kernel": os.path.join(args.kit, "vmlinuz"),
            "initrd": os.path.join(args.kit, "initramfs.cpio.gz"),
            "cmdline": ("console=ttyS0 quiet " + cmdline_extra).strip(),
            "firmware": "qboot",
        },
    }
    d.update(extra)
    return d


def main(tests):
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--keeld", required=True)
    ap.add_argument("--keel", required=True)
    ap.add_argument("--kit", required=True)
    ap.add_argument("case", choices=sorted(tests))
    args = ap.parse_args()
    started = time.time()
    try:
        tests[args.case](args)
    except Failure as e:
        print(f"FAIL {args.case}: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"PASS {args.case} ({time.time() - started:.1f}s)")
