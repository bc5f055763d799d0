"""Thread mode at scale: many idle connections that close at once.

The scenario of issue 12: N idle clients (5,000 in the full run) disconnect in the same
moment. Measured for the classic thread server and echod's thread mode:

- retire_s: from the last close until the server's process tree is back to its thread count
  before the clients came (within one thread: the probe's may still be leaving), and, for
  echod, every connection's close event is in the log;
- the probe: meanwhile a new client connects, echoes 8 bytes and closes, again and again;
  its worst latency says whether the server stayed responsive (the target: under 100 ms);
- the stop (echod only): N clients again, closed at once, then SIGTERM straight away: how long
  the daemon takes to exit, and whether ``open`` in the supervisor's ``stopping`` event (what
  the workers had open when the stop reached them, however many of the N they had seen
  close by then) equals ``finished`` + ``cut`` in ``stopped``; ``unconfirmed`` says how many
  workers were counted by their last heartbeat instead of their own answer.

Every loop is bounded by a deadline; the caller raises RLIMIT_NOFILE for N descriptors here
and in the server, which inherits it.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any, Protocol

import procstat

SERVERS = ("classic_thread", "echod_thread")
FULL, QUICK = 5000, 500
PROBE_TARGET_MS = 100.0
PROBE_EVERY = 0.02  # seconds between probes
RAMP_TIMEOUT = 120.0  # seconds to open the N connections and see a thread serve each
RETIRE_TIMEOUT = 120.0  # seconds for the server to retire them
STOP_TIMEOUT = 60.0  # seconds for echod to exit after SIGTERM
PAYLOAD = b"12345678"


class BenchServer(Protocol):
    """What this module needs of run.Server."""

    port: int
    log_file: Path

    @property
    def pid(self) -> int: ...

    def start(self) -> None: ...

    def wait_listening(self) -> None: ...

    def stop(self) -> int | None: ...

    def alive(self) -> bool: ...


def tree_threads(root: int) -> int:
    """Threads of every process in the tree under root."""
    total = 0
    for pid in procstat.tree_pids(root):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for line in status.splitlines():
            if line.startswith("Threads:"):
                total += int(line.split()[1])
    return total


def settled_threads(root: int, timeout: float = 5.0) -> int:
    """The tree's thread count once it stops changing: the thread that served the harness's
    readiness probe may still be on its way out."""
    deadline = time.monotonic() + timeout
    last = tree_threads(root)
    while time.monotonic() < deadline:  # bounded by the deadline
        time.sleep(0.05)  # polling /proc: there is no event to wait for
        now = tree_threads(root)
        if now == last:
            return now
        last = now
    return last


def count_events(log_file: Path, event: str) -> int:
    try:
        data = log_file.read_bytes()
    except FileNotFoundError:
        return 0
    return data.count(f'"event":"{event}"'.encode())


def events(log_file: Path, event: str) -> list[dict[str, Any]]:
    try:
        lines = log_file.read_text().splitlines()
    except FileNotFoundError:
        return []
    found = []
    for line in lines:
        if f'"event":"{event}"' in line:
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return found


def echo_once(port: int, timeout: float) -> float:
    """Connect, echo PAYLOAD, close; seconds it took. Raises OSError on failure."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(PAYLOAD)
        got = b""
        while len(got) < len(PAYLOAD):  # bounded: each pass reads >= 1 byte or raises
            chunk = sock.recv(len(PAYLOAD) - len(got))
            if not chunk:
                raise ConnectionError("closed before the echo")
            got += chunk
        if got != PAYLOAD:
            raise ConnectionError("echo differs")
    return time.perf_counter() - t0


def open_idle(server: BenchServer, count: int, base_threads: int) -> list[socket.socket]:
    """count connections, each echoed once, held idle; returns once a thread serves each."""
    deadline = time.monotonic() + RAMP_TIMEOUT
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            if time.monotonic() > deadline:
                raise TimeoutError(f"opened only {len(socks)} of {count} in {RAMP_TIMEOUT:g} s")
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10.0)
            socks.append(sock)
            sock.sendall(PAYLOAD)
            if sock.recv(len(PAYLOAD)) != PAYLOAD:  # loopback: 8 bytes come in one piece
                raise ConnectionError("echo differs while opening")
        while tree_threads(server.pid) < base_threads + count:  # bounded by the deadline
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not start a thread per connection")
            time.sleep(0.05)  # polling /proc: the server has no event to wait for here
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def close_and_watch(
    server: BenchServer, socks: list[socket.socket], base: int, logs: bool
) -> dict[str, Any]:
    """Close every socket at once, then probe until the server has retired them (and, if it
    logs connections, logged their close)."""
    closes_before = count_events(server.log_file, "conn_close")
    t0 = time.monotonic()
    for sock in socks:
        sock.close()
    closed_in = time.monotonic() - t0
    probes: list[float] = []
    failures = 0
    retired_at: float | None = None
    deadline = t0 + RETIRE_TIMEOUT
    next_probe = time.monotonic()
    while time.monotonic() < deadline:  # bounded by the deadline
        now = time.monotonic()
        if now >= next_probe:
            try:
                probes.append(echo_once(server.port, timeout=10.0))
            except OSError:
                failures += 1
            next_probe = now + PROBE_EVERY
        logged = count_events(server.log_file, "conn_close") - closes_before
        # Every probe so far is closed too: its close event is expected as well.
        all_logged = not logs or logged >= len(socks) + len(probes) - 1
        if all_logged and tree_threads(server.pid) <= base + 1:
            retired_at = time.monotonic()
            break
        time.sleep(0.005)
    return {
        "connections": len(socks),
        "close_s": round(closed_in, 3),
        "retire_s": None if retired_at is None else round(retired_at - t0, 3),
        "probes": len(probes),
        "probe_failures": failures,
        "probe_max_ms": round(1000 * max(probes), 1) if probes else None,
        "probe_p50_ms": round(1000 * sorted(probes)[len(probes) // 2], 1) if probes else None,
        "probes_over_target": sum(1 for p in probes if 1000 * p > PROBE_TARGET_MS),
    }


def stop_counts(server: BenchServer, count: int, base: int) -> dict[str, Any]:
    """echod: count connections, closed at once, then SIGTERM: the stop's time and counts."""
    socks = open_idle(server, count, base)
    for sock in socks:
        sock.close()
    t0 = time.monotonic()
    server.stop()  # SIGTERM, then waits (bounded) for the exit
    stop_s = time.monotonic() - t0
    stopping = events(server.log_file, "stopping")
    stopped = events(server.log_file, "stopped")
    if not stopping or not stopped:
        return {"stop_s": round(stop_s, 3), "adds_up": False, "note": "no stopping/stopped"}
    opened = int(stopping[-1].get("open", -1))
    finished = int(stopped[-1].get("finished", -1))
    cut = int(stopped[-1].get("cut", -1))
    return {
        "stop_s": round(stop_s, 3),
        "open": opened,
        "finished": finished,
        "cut": cut,
        "unconfirmed": stopping[-1].get("unconfirmed"),
        "adds_up": opened == finished + cut,
    }


def run(server: BenchServer, count: int, logs: bool) -> dict[str, Any]:
    """The whole scenario against a fresh server; {"status": "failed", ...} on any failure."""
    try:
        server.start()
        server.wait_listening()
        base = settled_threads(server.pid)
        socks = open_idle(server, count, base)
        result: dict[str, Any] = {"status": "ok", **close_and_watch(server, socks, base, logs)}
        if logs:
            result["stop"] = stop_counts(server, count, base)
    except Exception as exc:  # report, keep the rest of the bench
        result = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    finally:
        server.stop()
    print(f"mass close {count}: {json.dumps(result)}", flush=True)
    return result
