"""Start JackPay processes and wait for their readiness line (used by scripts and tests).

Every JackPay service prints exactly one line on stdout once it serves:

    READY <role> <key>=<value> ...     e.g.  READY ledger addr=127.0.0.1:40123

`Proc` starts a command with stdout piped and stderr sent to a log file, waits for that
line, and offers stop (SIGTERM, then SIGKILL after a grace period), kill, pause (SIGSTOP)
and resume (SIGCONT). This is plain blocking code: harnesses run it from threads or sync
tests, never on a service's event loop.
"""

from __future__ import annotations

import os
import resource
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from common.errors import JackPayError


class ProcessFailed(JackPayError):
    """A child did not become ready, or exited when it should not have."""


def parse_ready_line(line: str) -> tuple[str, dict[str, str]] | None:
    """`READY ledger addr=127.0.0.1:1 x=y` -> ("ledger", {"addr": ..., "x": "y"})."""
    parts = line.strip().split()
    if len(parts) < 2 or parts[0] != "READY":
        return None
    fields = dict(p.split("=", 1) for p in parts[2:] if "=" in p)
    return parts[1], fields


def print_ready(role: str, **fields: object) -> None:
    """Print the readiness line (flushed) for harnesses to read."""
    extra = " ".join(f"{k}={v}" for k, v in fields.items())
    print(f"READY {role} {extra}".rstrip(), flush=True)


class Proc:
    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        preexec_fn: Callable[[], object] | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.preexec_fn = preexec_fn
        self.popen: subprocess.Popen[bytes] | None = None
        self.ready: dict[str, str] = {}

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def addr(self) -> tuple[str, int]:
        host, _, port = self.ready["addr"].rpartition(":")
        return host, int(port)

    def start(self, timeout: float = 15.0) -> Proc:
        """Start and wait for READY. Raises ProcessFailed with the log's tail if it dies."""
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.popen = subprocess.Popen(
                self.argv,
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.cwd,
                preexec_fn=self.preexec_fn,
            )
        finally:
            log.close()
        self.ready = self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> dict[str, str]:
        assert self.popen is not None
        assert self.popen.stdout is not None
        deadline = time.monotonic() + timeout
        out = self.popen.stdout
        buf = b""
        while time.monotonic() < deadline:
            r, _, _ = select.select([out], [], [], 0.05)
            if r:
                chunk = os.read(out.fileno(), 4096)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    parsed = parse_ready_line(line.decode(errors="replace"))
                    if parsed is not None:
                        return parsed[1]
            elif self.popen.poll() is not None:
                break
        rc = self.popen.poll()
        if rc is None:
            self.kill()
        raise ProcessFailed(
            f"{self.name} did not become ready (exit code {rc}); log {self.log_path}:\n"
            + self.log_tail()
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.popen is not None
            os.kill(self.popen.pid, sig)

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.popen is None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        self.popen.wait()
        self._close_pipe()

    def stop(self, grace: float = 10.0) -> int:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL. Returns the exit code."""
        if self.popen is None:
            return 0
        if self.alive():
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_pipe()
        return self.popen.returncode

    def wait(self, timeout: float | None = None) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout)

    def _close_pipe(self) -> None:
        if self.popen is not None and self.popen.stdout is not None:
            self.popen.stdout.close()


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (Linux /proc; [] once it is gone)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return out


def python_module(module: str, *args: str) -> list[str]:
    """argv to run `python -m module args...` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def fsize_limit(limit: int) -> Callable[[], None]:
    """A preexec_fn: the child's files cannot grow past `limit` bytes, and a write beyond
    fails with EFBIG instead of killing it (SIGXFSZ ignored) — a real write failure."""
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec
