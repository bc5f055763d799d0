"""Test support: run a real ``echod`` process and read what it logs.

Everything waits for a condition with a deadline (a log event, a port, a pid gone); nothing
sleeps to synchronise.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 20.0


def http_get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, str]:
    """One GET to the supervisor's metrics endpoint: (status, body)."""
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def wait_for(
    predicate: Callable[[], Any], timeout: float = DEADLINE, what: str = "condition"
) -> Any:
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


def in_child(body: Callable[[], bytes | None]) -> tuple[int, bytes]:
    """Run ``body`` in a forked child, so that what it sets up (structlog, the log's
    identity, a sink) stays out of this process. Returns the child's pid and what ``body``
    returned, once the child has exited 0 (asserted; its traceback, if any, on stderr)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(read_fd)
            output = body()
            if output:
                os.write(write_fd, output)  # (blocking: the parent reads as it comes)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        output = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0, f"the child ended with {os.waitstatus_to_exitcode(status)} (< 0: a signal)"
    return pid, output


def echod_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "echod", *args]


#: What a command under test must not inherit: another configuration, pidfile or service's
#: systemd environment would change what it does.
SCRUBBED_ENV = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "JOURNAL_STREAM")


def run_echod(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """``python -m echod ARGS`` from the source tree, bounded in time, with only the
    ECHOD_* variables in ``env``."""
    environ = {
        k: v for k, v in os.environ.items() if not k.startswith("ECHOD_") and k not in SCRUBBED_ENV
    }
    environ.update(env or {})
    return subprocess.run(
        echod_command(*args),
        cwd=ROOT,
        env=environ,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
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
        if self.settings.get("listen"):
            # listen replaces host and port: a file may not set both.
            del self.settings["host"], self.settings["port"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.stderr_path = tmp_path / "stderr.txt"

    def write_config(self, **changes: Any) -> None:
        self.settings.update(changes)
        self.config_path.write_text(yaml.safe_dump(self.settings))

    def start(
        self,
        wait: bool = True,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> Echod:
        self.write_config()
        scrub = ("ECHOD_CONFIG", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "JOURNAL_STREAM")
        full_env = {k: v for k, v in os.environ.items() if k not in scrub}
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
                preexec_fn=preexec_fn,  # noqa: PLW1509 - only setrlimit, async-signal-safe
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
        # Only whole lines: the last one may be in the middle of being written.
        for line in text.split("\n")[:-1]:
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

    def wait_stopped_accepting(self, pids: Iterable[int]) -> None:
        """Wait until each of these workers has stopped accepting (its ``worker_draining``):
        the supervisor logs ``retiring`` when it tells a worker, and until the worker acts
        on it a client may still reach it through the listening socket they share."""
        for pid in pids:
            self.wait_event("worker_draining", partial(_logged_by, pid))

    def connect(self, timeout: float = 10.0, source: str | None = None) -> socket.socket:
        """A connection to the daemon's port, from the loopback address ``source`` if given."""
        bind = (source, 0) if source is not None else None
        return socket.create_connection(("127.0.0.1", self.port), timeout, bind)

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


def processes() -> Iterator[tuple[int, list[str]]]:
    """Every process as (pid, the fields of /proc/<pid>/stat after the command name):
    fields[0] is the state, [1] the ppid, [3] the session id."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        yield int(entry), fields


def zombies_of(pid: int) -> list[int]:
    """Pids of zombie children of ``pid``."""
    return [p for p, fields in processes() if fields[0] == "Z" and int(fields[1]) == pid]


def children_of(pid: int) -> list[int]:
    """Pids of the children of ``pid``."""
    return [p for p, fields in processes() if int(fields[1]) == pid]


def is_fork_source(pid: int) -> bool:
    """Whether ``pid`` is a process-mode worker's connection source (echod.forkserver),
    by its command line: as started, or as its title rewrote it."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return b"echod.forkserver" in cmdline or b"echod: forks for worker" in cmdline


def fork_source_of(worker: int) -> int:
    """The pid of a process-mode worker's connection source, once it runs."""
    (source,) = wait_for(
        lambda: [pid for pid in children_of(worker) if is_fork_source(pid)],
        what=f"worker {worker}'s connection source",
    )
    return int(source)


def connection_processes_of(worker: int) -> list[int]:
    """The connection processes of a process-mode worker (zombies included): its children,
    but for its connection source, and the source's children."""
    found: list[int] = []
    for child in children_of(worker):
        if is_fork_source(child):
            found.extend(children_of(child))
        else:
            found.append(child)
    return found


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


def unix_queue_of(pid: int) -> int:
    """Bytes waiting on the SOCK_SEQPACKET sockets of ``pid`` (a worker's control channel, a
    process-mode worker's links to its connection processes)."""
    out = subprocess.run(["ss", "-xp"], capture_output=True, text=True, check=False).stdout
    return sum(
        int(line.split()[2])
        for line in out.splitlines()
        if line.startswith("u_seq") and f"pid={pid}," in line
    )


def worker_pids(server: Echod) -> list[int]:
    """Pids of the workers that reported running, oldest first."""
    return [e["worker_pid"] for e in server.events("worker_state") if e["state"] == "running"]


def _logged_by(pid: int, event: dict[str, Any]) -> bool:
    return bool(event.get("pid") == pid)


def settled(read: Callable[[], Any], quiet: float = 0.5, timeout: float = DEADLINE) -> Any:
    """``read()`` once two reads ``quiet`` seconds apart agree (a count that has stopped
    moving); fail after ``timeout`` seconds."""
    last = read()
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / quiet) + 2):  # bounded by the deadline too
        time.sleep(quiet)
        now = read()
        if now == last:
            return now
        if time.monotonic() > deadline:
            break
        last = now
    raise AssertionError(f"still changing after {timeout} s: {last!r}")


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


# -- helpers for the daemon, reload and systemd tests ---------------------------------------


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port on 127.0.0.1 that nothing uses right now (TCP and UDP), for echod to bind
    later. Taken below the kernel's ephemeral range, where no client connection opened
    meanwhile can take it as its source port, and never the same twice in a run."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    low = max(low, 2048)
    for _ in range(1000):  # bounded: nearly every try is free
        port = random.randrange(max(1024, low - 12000), low)
        if port in _HANDED_OUT:
            continue
        try:
            with socket.socket() as tcp, socket.socket(type=socket.SOCK_DGRAM) as udp:
                tcp.bind(("127.0.0.1", port))
                udp.bind(("127.0.0.1", port))
        except OSError:
            continue
        _HANDED_OUT.add(port)
        return port
    raise AssertionError("no free port below the ephemeral range")


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, grandchildren ...), bounded in depth."""
    found: list[int] = []
    level = [pid]
    for _ in range(16):
        level = [child for parent in level for child in children_of(parent)]
        if not level:
            break
        found.extend(level)
    return found


def open_descriptors(pid: int) -> dict[int, str]:
    """The descriptors of ``pid`` and what they point to ({} once it is gone); one closed
    while we read is left out."""
    table = {}
    try:
        entries = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return {}
    for fd in entries:
        try:
            table[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
    return table


def open_files(pid: int) -> list[str]:
    """What the descriptors of ``pid`` point to ([] once it is gone)."""
    return list(open_descriptors(pid).values())


class NotifySocket:
    """A stand-in for systemd's notify socket: an AF_UNIX datagram socket that records
    every ``KEY=value`` message echod sends. ``address`` is what ``NOTIFY_SOCKET`` holds:
    a path, or ``@name`` for an abstract socket."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    def drain(self) -> list[dict[str, str]]:
        """Take every datagram waiting; return all messages received so far."""
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return self.messages
            fields = dict(
                line.split("=", 1) for line in data.decode().splitlines() if "=" in line
            )
            fields["_received"] = repr(time.monotonic())
            self.messages.append(fields)

    def wait(
        self,
        key: str,
        value: str | Callable[[str], bool] | None = None,
        after: int = 0,
        timeout: float = DEADLINE,
    ) -> int:
        """Index of the first message at or after index ``after`` that has ``key`` (equal to
        ``value``, or for which ``value(text)`` is true, if given); fails after ``timeout``."""

        def matches(text: str) -> bool:
            return value is None or (value(text) if callable(value) else text == value)

        def found() -> int | None:
            for index, message in enumerate(self.drain()[after:], start=after):
                if key in message and matches(message[key]):
                    return index + 1  # truthy even for index 0
            return None

        return int(wait_for(found, timeout, what=f"notification {key}={value}")) - 1

    def close(self) -> None:
        self.sock.close()


# -- helpers for the supervision, admission, fault, UDP and soak tests ------------------------


def available_modes() -> list[str]:
    """The serving modes to parametrize over: thread and process, and async once it exists."""
    modes = ["thread", "process"]
    try:
        from echod.workers import worker_class

        worker_class("async")
    except (ImportError, AttributeError):
        pass
    else:
        modes.append("async")
    return modes


MODES = available_modes()


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int) -> int:
    """How many threads ``pid`` has now."""
    return len(os.listdir(f"/proc/{pid}/task"))


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time ``pid`` has used (its threads included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace").strip()


def session_pids(sid: int) -> list[int]:
    """Every live (non-zombie) process in session ``sid``: what an echod started with
    ``start_new_session`` has left running."""
    return [p for p, fields in processes() if int(fields[3]) == sid and fields[0] != "Z"]


def event_time(event: dict[str, Any]) -> float:
    """An event's timestamp as seconds since the epoch."""
    from datetime import datetime

    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def running_workers(server: Echod) -> dict[int, int]:
    """Worker index -> pid, for each worker whose latest logged state is ``running``."""
    current: dict[int, int] = {}
    for event in server.events("worker_state"):
        if event["state"] == "running":
            current[event["worker"]] = event["worker_pid"]
        elif current.get(event["worker"]) == event["worker_pid"]:
            del current[event["worker"]]
    return current


def wait_workers(server: Echod, count: int) -> dict[int, int]:
    def ready() -> dict[int, int] | None:
        workers = running_workers(server)
        return workers if len(workers) == count else None

    return wait_for(ready, what=f"{count} running workers")  # type: ignore[no-any-return]


def connection_owners(server: Echod) -> dict[int, int]:
    """Client port -> pid of the worker that serves it, from the conn_open events
    (in process mode the connection's own process is a child of the worker)."""
    owners = {}
    for event in server.events("conn_open"):
        owner = event["ppid"] if event.get("mode") == "process" else event["pid"]
        owners[event["peer_port"]] = owner
    return owners


def warm_up(server: Echod, tries: int = 200) -> dict[int, int]:
    """Serve connections until every running worker has served one, so that what an event
    loop allocates on its first connection (libuv's spare descriptor) is in the baseline of a
    leak check; returns the workers.

    The workers share one listening socket, and one of them may win the race to accept ten
    times in a row. So that a daemon's limits do not refuse a try however unevenly the tries
    are shared, each comes from a loopback address of its own (``max_connections_per_ip``
    never sees two) and is closed before the next starts (the tries do not add up towards a
    worker's share of ``max_connections``)."""
    workers = running_workers(server)
    try:
        for i in range(tries):
            if set(workers.values()) <= set(connection_owners(server).values()):
                return workers
            with server.connect(source=f"127.0.{1 + i // 250}.{1 + i % 250}") as sock:
                sock.sendall(b"warm")
                assert recv_exactly(sock, 4) == b"warm", f"warm-up try {i + 1} refused"
        raise AssertionError(f"not every worker served one of {tries} connections")
    finally:
        opened = len(server.events("conn_open"))
        wait_for(lambda: len(server.events("conn_close")) == opened, what="warm-up closes")
        wait_idle(workers.values())


def wait_idle(workers: Iterable[int]) -> None:
    """Wait until each worker is idle again: the main thread only, no connection processes,
    none left to reap (a process-mode worker holds a connection's socket until it reaps its
    child, so a baseline of descriptors taken before that is one too many)."""
    for pid in workers:
        wait_for(partial(_idle, pid), what=f"worker {pid} idle")


def _idle(pid: int) -> bool:
    return resources(pid)[1:] == (1, 0) and not zombies_of(pid)


def resources(pid: int) -> tuple[int, int, int]:
    """What a worker holds: open descriptors, threads, live child processes (a process
    worker's connection processes, not its connection source)."""
    zombies = {p for p, fields in processes() if fields[0] == "Z"}
    children = [c for c in connection_processes_of(pid) if c not in zombies]
    return fd_count(pid), thread_count(pid), len(children)


@contextmanager
def no_leaks(server: Echod, pids: list[int], timeout: float = DEADLINE) -> Iterator[None]:
    """Assert that ``pids`` (the supervisor, the workers) stay alive and, once the block's
    connections are over, hold exactly the descriptors, threads and children they held
    before it."""
    # Settled: a descriptor or child of something just over may still be going.
    before = {pid: settled(partial(resources, pid), quiet=0.2) for pid in pids}
    yield
    for pid in pids:
        assert not pid_gone(pid), f"process {pid} died"
        wait_for(
            lambda pid=pid: resources(pid) == before[pid],  # type: ignore[misc]
            timeout,
            what=f"pid {pid} back to {before[pid]} (fds, threads, children), "
            f"now {resources(pid)}",
        )
    assert not [e for e in server.events("worker_state") if e["state"] == "failed"]
    for pid in pids:
        assert not zombies_of(pid)


def rlimit_nofile(limit: int) -> Callable[[], None]:
    """A ``preexec_fn`` that starts the child with at most ``limit`` open descriptors."""
    import resource

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return apply


class Pattern:
    """A connection's byte stream: position-dependent random bytes (a random block of prime
    length, repeated), so that a lost, repeated or altered byte shows at its offset."""

    def __init__(self, length: int = 65521) -> None:
        self.length = length
        block = os.urandom(length)
        self._doubled = block + block

    def chunk(self, offset: int, size: int) -> memoryview:
        """Up to ``size`` bytes of the stream from ``offset`` (at most one period)."""
        start = offset % self.length
        return memoryview(self._doubled)[start : start + min(size, self.length)]

    def matches(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        """Whether ``data`` is the stream's content at ``offset`` (memcmp speed)."""
        view = memoryview(data)
        while view:
            start = offset % self.length
            size = min(len(view), self.length)
            if not self._doubled.startswith(view[:size], start):
                return False
            offset += size
            view = view[size:]
        return True


class Stream:
    """One streaming client connection and what it has verified."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.pattern = Pattern()
        self.sent = 0
        self.received = 0
        self.corrupt_at: int | None = None
        self.ended: str | None = None  # why the server side ended it early, if it did
        self.eof = False
        self.last_progress = time.monotonic()
        self.stalled = False


class Streamers:
    """Clients that stream verified data through echod from one background thread.

    Each client keeps at most ``window`` bytes in flight and sends ``chunk`` bytes every
    ``interval`` seconds; every byte echoed back is compared with what was sent at that
    offset. A connection the server ends (EOF or error) is recorded and, with
    ``reconnect``, replaced by a new one. A connection with bytes in flight and no progress
    for ``stall_after`` seconds is recorded as stalled (a hang).
    """

    def __init__(
        self,
        port: int,
        count: int,
        *,
        chunk: int = 4096,
        interval: float = 0.02,
        window: int = 65536,
        reconnect: bool = False,
        stall_after: float = 10.0,
    ) -> None:
        import selectors
        import threading

        self.port = port
        self.count = count
        self.chunk = chunk
        self.interval = interval
        self.window = window
        self.reconnect = reconnect
        self.stall_after = stall_after
        self.streams: list[Stream] = []
        self.selector = selectors.DefaultSelector()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="streamers", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> Streamers:
        for _ in range(self.count):
            self._open()
        self.thread.start()
        return self

    def _open(self) -> None:
        import selectors

        sock = socket.create_connection(("127.0.0.1", self.port), timeout=DEADLINE)
        sock.setblocking(False)
        stream = Stream(sock)
        with self.lock:
            self.streams.append(stream)
        self.selector.register(sock, selectors.EVENT_READ, stream)

    def live(self) -> list[Stream]:
        with self.lock:
            return [s for s in self.streams if s.ended is None and not s.eof]

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def _loop(self) -> None:
        next_tick = time.monotonic()
        while not self.stopping.is_set():
            timeout = max(0.0, next_tick - time.monotonic())
            for key, _ in self.selector.select(timeout):
                self._on_readable(key.data)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + self.interval
                for stream in self.live():
                    self._send(stream)
                    if (
                        stream.sent > stream.received
                        and now - stream.last_progress > self.stall_after
                    ):
                        stream.stalled = True
                        self._end(stream, "stalled")

    def _send(self, stream: Stream) -> None:
        room = self.window - (stream.sent - stream.received)
        if room <= 0:
            return
        try:
            sent = stream.sock.send(stream.pattern.chunk(stream.sent, min(room, self.chunk)))
        except BlockingIOError:
            return
        except OSError as exc:
            self._end(stream, type(exc).__name__)
            return
        if stream.sent == stream.received:
            stream.last_progress = time.monotonic()
        stream.sent += sent

    def _on_readable(self, stream: Stream) -> None:
        try:
            data = stream.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError as exc:
            self._end(stream, type(exc).__name__)
            return
        if not data:
            if self.stopping.is_set() or stream.eof:
                stream.eof = True
            else:
                self._end(stream, "eof")
            return
        if stream.corrupt_at is None and not stream.pattern.matches(stream.received, data):
            stream.corrupt_at = stream.received
        stream.received += len(data)
        stream.last_progress = time.monotonic()

    def _end(self, stream: Stream, why: str) -> None:
        stream.ended = why
        self.selector.unregister(stream.sock)
        stream.sock.close()
        if self.reconnect and not self.stopping.is_set():
            self._open()

    def finish(self, timeout: float = DEADLINE) -> list[Stream]:
        """Stop sending, half-close every live connection, read its echo to EOF."""
        self.stopping.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "streaming thread did not stop"
        if self.error is not None:
            raise self.error
        live = self.live()
        for stream in live:
            stream.sock.setblocking(True)
            stream.sock.settimeout(timeout)
            stream.sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + timeout
        for stream in live:
            while not stream.eof and stream.ended is None:
                assert time.monotonic() < deadline, f"no EOF on port {stream.port}"
                self._on_readable(stream)
        for stream in live:
            with contextlib.suppress(KeyError):
                self.selector.unregister(stream.sock)
            stream.sock.close()
        self.selector.close()
        return self.streams


@contextmanager
def mounted_tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``64k``, ``1m``) mounted at ``mount`` (made here) for the
    block, unmounted after; the test is skipped where mounting is not allowed (not root)."""
    import pytest

    mount.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mount)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


# -- helpers for the listener, socket option and privilege tests -------------------------------

_SYS_PIDFD_GETFD = 438  # the same number on every architecture Linux has (5.6 and later)


def server_side_of(pid: int, client: socket.socket) -> socket.socket | None:
    """A duplicate, taken from process ``pid`` (pidfd_getfd), of the socket at the server's
    end of ``client``'s connection; None when ``pid`` holds none. Its options are those of
    the socket echod accepted (the descriptor is the same open socket)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    want = (client.getpeername()[:2], client.getsockname()[:2])
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    try:
        # The table changes while we read it: a descriptor closed (or its number reused)
        # between the listing and the copy is skipped.
        for name, target in open_descriptors(pid).items():
            if not target.startswith("socket:"):
                continue
            fd = libc.syscall(_SYS_PIDFD_GETFD, pidfd, name, 0)
            if fd < 0:
                continue
            try:
                sock = socket.socket(fileno=fd)
            except OSError:
                os.close(fd)
                continue
            try:
                if sock.type == socket.SOCK_STREAM and (
                    sock.getsockname()[:2],
                    sock.getpeername()[:2],
                ) == want:
                    return sock
            except OSError:
                pass
            sock.close()
    finally:
        os.close(pidfd)
    return None


def process_status(pid: int) -> dict[str, str]:
    """``/proc/PID/status`` as a mapping (``Uid``, ``CapEff``, ``NoNewPrivs`` ...)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in status)}


def udp_echo(host: str, port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """One datagram to ``host:port``, and the one that comes back."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(data, (host, port))
        return sock.recvfrom(65536)[0]
