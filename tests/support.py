"""Test support: run a real ``echod`` process and read what it logs.

Everything waits for a condition with a deadline (a log event, a port, a pid gone); nothing
sleeps to synchronise.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 20.0


def wait_for(predicate: Callable[[], Any], timeout: float = DEADLINE, what: str = "condition") -> Any:
    """Return the first truthy value of ``predicate()``; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def echod_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "echod", *args]


def run_echod(*args: str, timeout: float = 30, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run an echod command to completion and capture its output."""
    env = {k: v for k, v in os.environ.items() if k != "ECHOD_CONFIG"}
    env.update(kwargs.pop("env", {}))
    return subprocess.run(
        echod_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        check=False,
    )


class Echod:
    """A real ``python -m echod run`` with a config of our own, logging JSON to a file."""

    def __init__(self, tmp_path: Path, **settings: Any) -> None:
        self.dir = tmp_path
        self.log_path = tmp_path / "echod.log"
        self.config_path = tmp_path / "echod.yaml"
        log_settings = {"file": str(self.log_path), "format": "json", "level": "info"}
        log_settings.update(settings.pop("log", {}))
        self.settings: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "pidfile": None,
            "shutdown_timeout": 5,
            **settings,
            "log": log_settings,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.stderr_path = tmp_path / "stderr.txt"

    def write_config(self, **changes: Any) -> None:
        self.settings.update(changes)
        self.config_path.write_text(yaml.safe_dump(self.settings))

    def start(self, wait: bool = True, env: dict[str, str] | None = None) -> Echod:
        self.write_config()
        full_env = {k: v for k, v in os.environ.items() if k not in ("ECHOD_CONFIG", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "JOURNAL_STREAM")}
        full_env.update(env or {})
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                echod_command("run", "--config", str(self.config_path)),
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                cwd=ROOT,
                env=full_env,
                start_new_session=True,
            )
        if wait:
            ready = self.wait_event("ready")
            self.port = ready["port"]
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        try:
            text = self.log_path.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            if not line:
                continue
            event = json.loads(line)
            if name is None or event.get("event") == name:
                out.append(event)
        return out

    def wait_event(
        self,
        name: str,
        predicate: Callable[[dict[str, Any]], bool] = lambda e: True,
        count: int = 1,
        timeout: float = DEADLINE,
    ) -> dict[str, Any]:
        """Wait until ``count`` events named ``name`` match; return the last of them."""

        def found() -> dict[str, Any] | None:
            if self.proc is not None and self.proc.poll() is not None and name != "stopped":
                matches = [e for e in self.events(name) if predicate(e)]
                if len(matches) >= count:
                    return matches[count - 1]
                raise AssertionError(
                    f"echod exited ({self.proc.returncode}) before {name!r}: "
                    f"{self.stderr_path.read_text()[-2000:]}"
                )
            matches = [e for e in self.events(name) if predicate(e)]
            return matches[count - 1] if len(matches) >= count else None

        return wait_for(found, timeout, what=f"{count} x event {name!r}")

    def connect(self, timeout: float = 10.0) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        return sock

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = DEADLINE) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """Kill what we started: the supervisor's process group (its workers and children)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        else:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@contextmanager
def echod(tmp_path: Path, **settings: Any) -> Iterator[Echod]:
    server = Echod(tmp_path, **settings)
    try:
        yield server.start()
    finally:
        server.kill()


def echo_roundtrip(sock: socket.socket, data: bytes) -> bytes:
    """Send ``data`` while reading the echo (so large payloads cannot deadlock); half-close;
    return everything echoed until EOF."""
    import selectors

    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    view = memoryview(data)
    received = bytearray()
    shut = False
    deadline = time.monotonic() + DEADLINE
    while True:
        if time.monotonic() > deadline:
            raise AssertionError("echo did not complete in time")
        if not view and not shut:
            sock.shutdown(socket.SHUT_WR)
            shut = True
            sel.modify(sock, selectors.EVENT_READ)
        for _key, events in sel.select(1.0):
            if events & selectors.EVENT_WRITE and view:
                try:
                    sent = sock.send(view[:262144])
                    view = view[sent:]
                except BlockingIOError:
                    pass
            if events & selectors.EVENT_READ:
                try:
                    chunk = sock.recv(262144)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.close()
                    return bytes(received)
                received += chunk


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def pid_gone(pid: int) -> bool:
    """True once ``pid`` no longer exists (a zombie still exists)."""
    return not os.path.exists(f"/proc/{pid}")


def zombies_of(pid: int) -> list[int]:
    """Pids of zombie children of ``pid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(") ", 1)[1].split()
        if fields[0] == "Z" and int(fields[1]) == pid:
            out.append(int(entry))
    return out


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat.rsplit(") ", 1)[1].split()[1]) == pid:
            out.append(int(entry))
    return out


# -- helpers for the lifecycle, limits, logging and network tests ------------------------------


def connect_to(host: str, port: int, timeout: float = 10.0) -> socket.socket:
    """A TCP connection to ``host`` (an IPv4 or IPv6 literal) and ``port``."""
    return socket.create_connection((host, port), timeout=timeout)


def refused(host: str, port: int) -> bool:
    """True when a connection to ``host:port`` is refused (nothing listens any more)."""
    try:
        sock = connect_to(host, port, timeout=2.0)
    except ConnectionRefusedError:
        return True
    sock.close()
    return False


def silent_for(sock: socket.socket, seconds: float) -> bool:
    """True when nothing arrives on ``sock`` for ``seconds``: a bounded negative observation,
    not a synchronisation."""
    import select

    readable, _, _ = select.select([sock], [], [], seconds)
    return not readable


def reset_close(sock: socket.socket) -> None:
    """Close with SO_LINGER 0, so the peer gets a TCP reset instead of a FIN."""
    import struct

    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def ipv6_loopback() -> bool:
    """Whether this machine can bind ``::1`` (IPv6 tests skip without it)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def worker_pids(server: Echod) -> list[int]:
    """Pids of the workers that reported running, oldest first."""
    return [e["worker_pid"] for e in server.events("worker_state") if e["state"] == "running"]


def task_count(pid: int) -> int:
    """How many threads ``pid`` has now."""
    return len(os.listdir(f"/proc/{pid}/task"))


def wait_text(
    path: Path, predicate: Callable[[str], Any], timeout: float = DEADLINE, what: str = "text"
) -> Any:
    """Wait until ``predicate(text of path)`` is truthy; return its value."""

    def found() -> Any:
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            return None
        return predicate(text)

    return wait_for(found, timeout, what=what)
