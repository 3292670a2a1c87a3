"""Shared by the integration tests that run QEMU guests and helpers as children: a child process whose
output (a guest's serial console) is collected line by line, and the accelerator choice.

Import it with:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "lib"))
    from console_process import ConsoleProcess, accelerator
"""
import os
import re
import subprocess
import threading
import time


class ConsoleProcess:
    """A child whose stdout+stderr is collected line by line; stdin may stay open (say())."""

    def __init__(self, name, args, stdin=subprocess.DEVNULL):
        self.name = name
        self.lines = []
        self.next_line = 0
        self.cond = threading.Condition()
        self.start = time.monotonic()
        self.proc = subprocess.Popen(args, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait_for(self, pattern, timeout, after=0):
        """The match of the first line (from index `after`) that matches the regex, or None on timeout
        or exit. The matched line's index + 1 is left in self.next_line."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        seen = after
        with self.cond:
            while True:
                for i, line in enumerate(self.lines[seen:], start=seen):
                    m = rx.search(line)
                    if m:
                        self.next_line = i + 1
                        return m
                seen = max(seen, len(self.lines))
                if self.proc.poll() is not None and not self.reader.is_alive():
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(min(left, 0.5))

    def say(self, text):
        """A line on the child's stdin (a guest's serial console: its `read` returns)."""
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def alive(self):
        return self.proc.poll() is None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()  # by pid
        self.proc.wait()

    def terminate(self, timeout=10):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.reader.join(5)

    def stop(self):
        self.kill()
        self.reader.join(5)

    def output(self, n=60):
        with self.cond:
            return "\n".join(self.lines[-n:])


def accelerator(accel_cmd):
    """kvm or tcg: $KEEL_ACCEL, else what keel-accel (at accel_cmd) picks, else tcg."""
    if os.environ.get("KEEL_ACCEL"):
        return os.environ["KEEL_ACCEL"]
    if accel_cmd and os.access(accel_cmd, os.X_OK):
        out = subprocess.run([accel_cmd, "-q"], capture_output=True, text=True).stdout.strip()
        if out in ("kvm", "tcg"):
            return out
    return "tcg"
