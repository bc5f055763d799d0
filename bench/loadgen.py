#!/usr/bin/env python3
"""Load generator for echo servers: checks every echoed byte, measures what the server costs.

Several client processes (multiprocessing) share the connections of a scenario, each driving
its share with one epoll loop, so that the client is not the bottleneck where that can be
helped. Every payload that comes back is compared with what was sent; a connection that ends
its run half-closes and must then see EOF with no stray bytes.

Reports round trips/s, MB/s (10^6 bytes of payload echoed per second), connections/s, latency
p50/p99 and, given the server's pid, the server's CPU time per round trip and its memory (PSS
summed over its process tree). Traffic goes to the given host, which bench/run.py keeps on
127.0.0.1. Every loop is bounded in count and in time.

Stand-alone use:  python bench/loadgen.py --port 9999 --scenario 1KiB-c10 [--server-pid PID]
"""

from __future__ import annotations

import argparse
import array
import dataclasses
import errno
import json
import multiprocessing as mp
import os
import resource
import select
import socket
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as mp_wait
from multiprocessing.synchronize import Event
from typing import Any, Literal

import procstat

Kind = Literal["pingpong", "churn", "idle"]


@dataclass(frozen=True)
class Scenario:
    """One load shape: what each connection does, how big a payload, how many connections."""

    name: str
    kind: Kind
    size: int  # payload bytes per round trip
    clients: int  # concurrent connections (idle: connections opened and held)


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("pingpong-64B-c1", "pingpong", 64, 1),
    Scenario("1KiB-c10", "pingpong", 1024, 10),
    Scenario("1KiB-c100", "pingpong", 1024, 100),
    Scenario("64KiB-c10", "pingpong", 65536, 10),
    Scenario("churn-64B-c10", "churn", 64, 10),
    Scenario("idle-10k", "idle", 8, 10_000),
)
SCENARIO_NAMES = tuple(s.name for s in SCENARIOS)

VARIANTS = 8  # distinct payloads per client process, rotated so stale or crossed data shows
MAX_ERRORS = 100  # a client process stops opening connections after this many errors
LATENCY_CAP = 4_000_000  # latency samples kept per client process (memory bound)
IN_FLIGHT_CONNECTS = 64  # idle ramp: connects pending at once per client process
# The idle ramp stops when it has cost the machine MEMORY_BUDGET_KIB of available memory, or
# when less than MEMORY_FLOOR of MemTotal is left: the machine may be shared.
MEMORY_BUDGET_KIB = 6 * 1024 * 1024
MEMORY_FLOOR = 0.25


@dataclass(frozen=True)
class Plan:
    """What one client process is asked to do (picklable; sent to the child on fork)."""

    host: str
    port: int
    scenario: Scenario
    conns: int  # this process's share of the scenario's connections
    duration: float  # seconds of load (idle: the longest ramp)
    drain_timeout: float  # seconds allowed after the deadline to finish in-flight round trips
    setup_timeout: float  # seconds allowed to connect, and to wait for the start signal
    hold_timeout: float  # idle: longest wait for the release signal
    max_round_trips: int  # per process; a second bound besides the deadline


@dataclass
class Result:
    """One scenario against one server, summed over the client processes."""

    scenario: str
    kind: str
    size: int
    clients: int
    client_procs: int
    elapsed_s: float = 0.0
    round_trips: int = 0
    connections: int = 0  # connections opened during the run (churn, idle)
    rt_per_s: float = 0.0
    mb_per_s: float = 0.0
    conn_per_s: float = 0.0
    p50_us: float | None = None
    p99_us: float | None = None
    server_cpu_us_per_rt: float | None = None
    server_cpu_pct: float | None = None  # of one core, over the run
    client_cpu_pct: float = 0.0  # of one core, summed over client processes
    client_cpu_us_per_rt: float | None = None
    other_cpu_pct: float | None = None  # busy CPU not used by server or clients: noise
    sent_bytes: int = 0
    verified_bytes: int = 0
    mismatches: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    held: int | None = None  # idle: connections open at the memory reading
    pss_before_kib: int | None = None
    pss_after_kib: int | None = None
    pss_per_conn_kib: float | None = None
    server_procs: int | None = None
    note: str = ""

    @property
    def verified(self) -> bool:
        """Every byte sent came back unchanged, and nothing failed."""
        return (
            self.errors == 0
            and self.mismatches == 0
            and self.round_trips > 0
            and self.verified_bytes == self.sent_bytes
        )

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "verified": self.verified}


# --------------------------------------------------------------------------- client process


class _Stats:
    """Counters of one client process."""

    __slots__ = (
        "connections",
        "error_samples",
        "errors",
        "latencies",
        "mismatches",
        "round_trips",
        "sent_bytes",
        "verified_bytes",
    )

    def __init__(self) -> None:
        self.round_trips = 0
        self.connections = 0
        self.sent_bytes = 0
        self.verified_bytes = 0
        self.mismatches = 0
        self.errors = 0
        self.error_samples: list[str] = []
        self.latencies = array.array("q")

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what)

    def completed(self, got: bytearray, expected: bytes, t0: int, t1: int) -> None:
        """Count one finished round trip, comparing every byte that came back."""
        self.round_trips += 1
        if got == expected:
            self.verified_bytes += len(expected)
        else:
            self.mismatches += 1
            if len(self.error_samples) < 5:
                self.error_samples.append(f"mismatch in a {len(expected)} B round trip")
        if len(self.latencies) < LATENCY_CAP:
            self.latencies.append(t1 - t0)


class _Conn:
    """One client connection: sends a payload, reads the same number of bytes back."""

    __slots__ = (
        "got",
        "index",
        "mask",
        "mv",
        "payload",
        "rbuf",
        "rmv",
        "sent",
        "sock",
        "state",
        "t0",
    )

    CONNECTING, ECHOING, DRAINING, HELD = range(4)

    def __init__(self, sock: socket.socket, index: int, size: int) -> None:
        self.sock = sock
        self.index = index
        self.rbuf = bytearray(size)
        self.rmv = memoryview(self.rbuf)
        self.payload = b""
        self.mv = memoryview(b"")
        self.sent = 0
        self.got = 0
        self.t0 = 0
        self.state = _Conn.CONNECTING
        self.mask = 0  # the epoll events registered, to skip epoll_ctl calls that change nothing


class _Client:
    """The epoll loop of one client process; drives pingpong, churn or idle connections.

    The per-round-trip path (on_readable, then begin) is kept to two Python calls: on a small
    machine the client shares the CPUs with the server, and every microsecond it spends is one
    the server does not get.
    """

    def __init__(self, plan: Plan, stop_opening: Event | None = None) -> None:
        self.plan = plan
        self.kind = plan.scenario.kind
        self.addr = (plan.host, plan.port)
        self.size = plan.scenario.size
        self.variants = [os.urandom(self.size) for _ in range(VARIANTS)]
        self.stats = _Stats()
        self.stop_opening = stop_opening
        self.ep = select.epoll()
        self.conns: dict[int, _Conn] = {}
        self.held: list[_Conn] = []
        self.rounds = 0  # round trips started: the count bound, and the payload rotation
        self.opened = 0
        self.unanswered = 0  # idle: connections still unanswered when the ramp ended
        self.deadline = 0
        self.end_ns = 0

    # ---- connection life cycle

    def open(self) -> None:
        """Start a non-blocking connect; the connection sends once it is writable."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        conn = _Conn(sock, self.opened, self.size)
        self.opened += 1
        conn.t0 = time.perf_counter_ns()
        err = sock.connect_ex(self.addr)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self.stats.error(f"connect: {os.strerror(err)}")
            return
        self.conns[sock.fileno()] = conn
        conn.mask = select.EPOLLOUT
        self.ep.register(sock, conn.mask)

    def adopt(self, sock: socket.socket) -> _Conn:
        """Take a connection that is already established (pingpong set-up)."""
        sock.setblocking(False)
        conn = _Conn(sock, self.opened, self.size)
        self.opened += 1
        conn.state = _Conn.ECHOING
        self.conns[sock.fileno()] = conn
        conn.mask = select.EPOLLIN
        self.ep.register(sock, conn.mask)
        return conn

    def set_mask(self, conn: _Conn, mask: int) -> None:
        if mask != conn.mask:  # skip the epoll_ctl call when nothing changes
            conn.mask = mask
            self.ep.modify(conn.sock, mask)

    def drop(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        self.conns.pop(fd, None)
        self.ep.unregister(fd)
        conn.sock.close()

    def fail(self, conn: _Conn, what: str) -> None:
        self.stats.error(what)
        self.drop(conn)
        if self.kind == "churn" and self.may_start(time.perf_counter_ns()):
            self.open()  # keep the slot busy; MAX_ERRORS bounds the retries

    def may_start(self, now: int) -> bool:
        """Whether another round trip (or connection) may begin: the run's bounds."""
        return (
            now < self.deadline
            and self.rounds < self.plan.max_round_trips
            and self.stats.errors < MAX_ERRORS
            and not (self.stop_opening is not None and self.stop_opening.is_set())
        )

    def begin(self, conn: _Conn, now: int) -> None:
        """Start a round trip: the next payload, sent as far as the socket takes it."""
        payload = self.variants[(conn.index + self.rounds) % VARIANTS]
        self.rounds += 1
        conn.payload = payload
        conn.got = 0
        conn.state = _Conn.ECHOING
        if self.kind != "churn":
            conn.t0 = now  # churn measures from the connect
        self.stats.sent_bytes += self.size
        try:
            conn.sent = conn.sock.send(payload)
        except BlockingIOError:
            conn.sent = 0
        except OSError as exc:
            self.fail(conn, f"send: {exc.strerror or exc!r}")
            return
        if conn.sent < self.size:
            # A large payload: send the rest when there is room, reading the echo meanwhile.
            conn.mv = memoryview(payload)
            self.set_mask(conn, select.EPOLLIN | select.EPOLLOUT)
        else:
            self.set_mask(conn, select.EPOLLIN)

    def send_more(self, conn: _Conn) -> None:
        try:
            conn.sent += conn.sock.send(conn.mv[conn.sent :])
        except BlockingIOError:
            return
        except OSError as exc:
            self.fail(conn, f"send: {exc.strerror or exc!r}")
            return
        if conn.sent == self.size:
            self.set_mask(conn, select.EPOLLIN)

    # ---- events

    def on_writable(self, conn: _Conn) -> None:
        if conn.state == _Conn.CONNECTING:
            err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.fail(conn, f"connect: {os.strerror(err)}")
                return
            self.stats.connections += 1
            self.begin(conn, time.perf_counter_ns())
        elif conn.state == _Conn.ECHOING:
            self.send_more(conn)

    def on_readable(self, conn: _Conn) -> None:
        if conn.state == _Conn.DRAINING:
            self.on_drain(conn)
            return
        try:
            n = conn.sock.recv_into(conn.rmv[conn.got :])
        except BlockingIOError:
            return
        except OSError as exc:
            self.fail(conn, f"recv: {exc.strerror or exc!r}")
            return
        if n == 0:
            self.fail(conn, f"server closed the connection after {conn.got} of {self.size} B")
            return
        conn.got += n
        if conn.got < self.size:
            return
        now = time.perf_counter_ns()
        self.stats.completed(conn.rbuf, conn.payload, conn.t0, now)
        self.end_ns = now
        if self.kind == "pingpong":
            if self.may_start(now):
                self.begin(conn, now)
            else:
                # Half-close: the server must echo nothing more and close its end.
                conn.state = _Conn.DRAINING
                conn.sock.shutdown(socket.SHUT_WR)
                self.set_mask(conn, select.EPOLLIN)
        elif self.kind == "churn":
            self.drop(conn)
            if self.may_start(now):
                self.open()
        else:  # idle: keep it open, out of the loop
            conn.state = _Conn.HELD
            fd = conn.sock.fileno()
            del self.conns[fd]
            self.ep.unregister(fd)
            self.held.append(conn)

    def on_drain(self, conn: _Conn) -> None:
        try:
            extra = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            self.fail(conn, f"recv after half-close: {exc.strerror or exc!r}")
            return
        if extra:
            self.stats.mismatches += 1
            self.fail(conn, f"{len(extra)} unexpected bytes after the last round trip")
        else:
            self.drop(conn)

    def loop(self, until_ns: int, while_at_least: int = 0) -> None:
        """Dispatch events until until_ns, or until no more than while_at_least connections
        are left in the loop (0: until all are done)."""
        conns, poll, clock = self.conns, self.ep.poll, time.perf_counter_ns
        readable = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
        for _ in range(1 << 62):  # bounded by until_ns; the count is only a formal bound
            now = clock()
            if len(conns) <= while_at_least or now >= until_ns:
                return
            for fd, ev in poll(min(0.5, (until_ns - now) / 1e9)):
                conn = conns.get(fd)
                if conn is None:
                    continue
                if ev & select.EPOLLOUT:
                    self.on_writable(conn)
                # `is conn`: a failed connect may have been replaced by a new socket that
                # reuses the descriptor number; that one's events come in a later poll.
                if ev & readable and conns.get(fd) is conn:
                    self.on_readable(conn)

    # ---- the three kinds of run

    def pingpong(self, socks: list[socket.socket], start_ns: int) -> None:
        self.deadline = start_ns + int(self.plan.duration * 1e9)
        for conn in [self.adopt(sock) for sock in socks]:
            self.begin(conn, time.perf_counter_ns())
        self.loop(self.deadline + int(self.plan.drain_timeout * 1e9))
        self.give_up_on_leftovers()

    def churn(self, start_ns: int) -> None:
        self.deadline = start_ns + int(self.plan.duration * 1e9)
        for _ in range(self.plan.conns):
            self.open()
        self.loop(self.deadline + int(self.plan.drain_timeout * 1e9))
        self.give_up_on_leftovers()

    def ramp(self, start_ns: int) -> None:
        """Idle: open this process's share, a few connects in flight at a time."""
        self.deadline = start_ns + int(self.plan.duration * 1e9)
        for _ in range(self.plan.conns):  # each pass opens at most one connection
            if not self.may_start(time.perf_counter_ns()):
                break
            # Few connects in flight: a burst would overflow the server's listen backlog.
            self.loop(self.deadline, while_at_least=IN_FLIGHT_CONNECTS - 1)
            self.open()
        self.loop(self.deadline + int(self.plan.drain_timeout * 1e9))
        # A server too slow to take them all in time is measured with what it holds; the
        # connections it never answered are reported, and their bytes were never echoed.
        for conn in list(self.conns.values()):
            self.unanswered += 1
            if conn.state == _Conn.ECHOING:
                self.stats.sent_bytes -= self.size
            self.drop(conn)

    def give_up_on_leftovers(self) -> None:
        for conn in list(self.conns.values()):
            self.fail(conn, "no answer before the deadline")

    def check_held(self) -> None:
        """Idle: every held connection must still be open, with nothing to read."""
        for conn in self.held:
            try:
                data = conn.sock.recv(1)
            except BlockingIOError:
                continue
            except OSError as exc:
                self.stats.error(f"held connection failed: {exc.strerror or exc!r}")
                continue
            if data:
                self.stats.mismatches += 1
            self.stats.error("held connection " + ("got stray data" if data else "was closed"))

    def close_held(self) -> None:
        for conn in self.held:
            conn.sock.close()

    def report(self, start_ns: int, cpu0: float) -> dict[str, Any]:
        s = self.stats
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "round_trips": s.round_trips,
            "connections": s.connections,
            "sent_bytes": s.sent_bytes,
            "verified_bytes": s.verified_bytes,
            "mismatches": s.mismatches,
            "errors": s.errors,
            "error_samples": s.error_samples,
            "elapsed_ns": max(0, self.end_ns - start_ns),
            "cpu_s": usage.ru_utime + usage.ru_stime - cpu0,
            "held": len(self.held),
            "unanswered": self.unanswered,
            "latencies": s.latencies.tobytes(),
        }


def _pingpong_one(plan: Plan, sock: socket.socket, start_ns: int) -> _Client:
    """One connection in a process: plain blocking calls are cheaper than an epoll loop."""
    client = _Client(plan)
    stats, size = client.stats, client.size
    rbuf = bytearray(size)
    rmv = memoryview(rbuf)
    # Kernel-side timeouts: unlike settimeout(), they cost no poll() per call.
    limit = struct.pack("ll", int(plan.drain_timeout) + 1, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
    deadline = start_ns + int(plan.duration * 1e9)
    variants = client.variants
    try:
        for rnd in range(plan.max_round_trips):
            payload = variants[rnd % VARIANTS]
            t0 = time.perf_counter_ns()
            if t0 >= deadline:
                break
            sock.sendall(payload)
            stats.sent_bytes += size
            got = 0
            while got < size:  # bounded: each pass reads >= 1 byte or raises
                n = sock.recv_into(rmv[got:])
                if n == 0:
                    raise ConnectionError(f"server closed after {got} of {size} B")
                got += n
            t1 = time.perf_counter_ns()
            stats.completed(rbuf, payload, t0, t1)
            client.end_ns = t1
        sock.shutdown(socket.SHUT_WR)
        extra = sock.recv(65536)
        if extra:
            stats.mismatches += 1
            stats.error(f"{len(extra)} unexpected bytes after the last round trip")
    except OSError as exc:
        stats.error(f"{type(exc).__name__}: {exc}")
    finally:
        sock.close()
    return client


def _raise_nofile(need: int) -> int:
    """Raise RLIMIT_NOFILE to at least need (the hard limit too, if allowed); return the soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return soft
    if hard != resource.RLIM_INFINITY and hard < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            return need
        except (ValueError, OSError):
            need = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    return need


def _connect_all(plan: Plan) -> list[socket.socket]:
    socks = []
    for _ in range(plan.conns):
        sock = socket.create_connection((plan.host, plan.port), timeout=plan.setup_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        socks.append(sock)
    return socks


def _worker(plan: Plan, pipe: Connection, start: Event, release: Event, stop: Event) -> None:
    """Body of one client process: set up, wait for start, run, report over pipe."""
    try:
        _raise_nofile(plan.conns + 64)
        kind = plan.scenario.kind
        socks = _connect_all(plan) if kind == "pingpong" else []
        pipe.send(("ready", len(socks)))
        if not start.wait(plan.setup_timeout):
            raise TimeoutError("no start signal")
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu0 = usage.ru_utime + usage.ru_stime
        start_ns = time.perf_counter_ns()
        if kind == "pingpong" and len(socks) == 1:
            client = _pingpong_one(plan, socks[0], start_ns)
        elif kind == "pingpong":
            client = _Client(plan)
            client.pingpong(socks, start_ns)
        elif kind == "churn":
            client = _Client(plan)
            client.churn(start_ns)
        else:
            client = _Client(plan, stop_opening=stop)
            client.ramp(start_ns)
            pipe.send(("held", len(client.held), client.unanswered))
            release.wait(plan.hold_timeout)
            client.check_held()
            client.close_held()
        pipe.send(("done", client.report(start_ns, cpu0)))
    except Exception as exc:  # report any failure to the parent rather than die silently
        pipe.send(("failed", f"{type(exc).__name__}: {exc}"))
    finally:
        pipe.close()


# --------------------------------------------------------------------------- orchestration


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _percentile(sorted_ns: Sequence[int], q: float) -> float | None:
    if not sorted_ns:
        return None
    rank = min(len(sorted_ns) - 1, int(q * len(sorted_ns)))
    return sorted_ns[rank] / 1000.0


class _Workers:
    """The client processes of one run, and their pipes."""

    def __init__(self, plans: list[Plan]) -> None:
        self.plans = plans
        ctx = mp.get_context("fork")  # fast, and the harness holds no threads or locks
        self.start = ctx.Event()
        self.release = ctx.Event()
        self.stop = ctx.Event()
        self.procs: list[Any] = []
        self.pipes: list[Connection] = []
        self.ctx = ctx

    def spawn(self) -> None:
        for plan in self.plans:
            parent, child = self.ctx.Pipe(duplex=False)
            proc = self.ctx.Process(
                target=_worker, args=(plan, child, self.start, self.release, self.stop)
            )
            proc.start()
            child.close()
            self.procs.append(proc)
            self.pipes.append(parent)

    def collect(self, tag: str, timeout: float, on_wake: Any = None) -> list[tuple[Any, ...]]:
        """One message tagged tag from every worker, within timeout seconds.

        on_wake, if given, is called at least every 0.25 s while waiting (the memory guard).
        """
        got: dict[int, tuple[Any, ...]] = {}
        deadline = time.monotonic() + timeout
        pending = dict(enumerate(self.pipes))
        while pending:  # bounded by the deadline
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(pending)} client process(es) sent no {tag!r}")
            ready = mp_wait(list(pending.values()), min(left, 0.25))
            if on_wake is not None:
                on_wake()
            for i, pipe in list(pending.items()):
                if pipe in ready:
                    try:
                        msg = pipe.recv()
                    except EOFError:
                        raise RuntimeError("a client process died") from None
                    if msg[0] == "failed":
                        raise RuntimeError(f"client process failed: {msg[1]}")
                    if msg[0] == tag:
                        got[i] = msg
                        del pending[i]
        return [got[i] for i in sorted(got)]

    def finish(self, grace: float) -> None:
        """Join the workers within grace seconds, then terminate the rest (our own children).

        After a failure grace is 0: a worker still waiting for the start signal must not be
        let loose on the server.
        """
        self.release.set()
        for proc in self.procs:
            proc.join(grace)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        for pipe in self.pipes:
            pipe.close()


def run(
    scenario: Scenario,
    port: int,
    *,
    host: str = "127.0.0.1",
    duration: float = 5.0,
    procs: int | None = None,
    server_pid: int | None = None,
) -> Result:
    """Run one scenario against host:port and return what was measured.

    procs defaults to min(connections, CPUs). server_pid enables the CPU and memory readings.
    """
    nprocs = max(1, min(scenario.clients, procs or os.cpu_count() or 1))
    idle = scenario.kind == "idle"
    base = Plan(
        host=host,
        port=port,
        scenario=scenario,
        conns=0,
        duration=max(duration, 30.0) if idle else duration,
        drain_timeout=5.0,
        setup_timeout=30.0,
        hold_timeout=60.0,
        max_round_trips=50_000_000,
    )
    plans = [dataclasses.replace(base, conns=n) for n in _split(scenario.clients, nprocs) if n]
    result = Result(scenario.name, scenario.kind, scenario.size, scenario.clients, len(plans))
    workers = _Workers(plans)
    try:
        workers.spawn()
        workers.collect("ready", base.setup_timeout + 5)
        if idle and server_pid is not None:
            result.pss_before_kib, _ = procstat.tree_pss_kib(server_pid)
        cpu0 = procstat.tree_cpu_seconds(server_pid) if server_pid else None
        busy0 = procstat.machine_busy_seconds()
        t0 = time.perf_counter()
        workers.start.set()
        if idle:
            _hold(workers, result, base, server_pid)
        done = workers.collect("done", base.duration + base.drain_timeout + 30)
        wall = time.perf_counter() - t0
        busy = procstat.machine_busy_seconds() - busy0
        cpu1 = procstat.tree_cpu_seconds(server_pid) if server_pid else None
    except BaseException:
        workers.finish(grace=0)
        raise
    workers.finish(grace=5)
    _aggregate(result, [msg[1] for msg in done], wall)
    if cpu0 is not None and cpu1 is not None and wall:
        used = cpu1 - cpu0
        result.server_cpu_pct = 100.0 * used / wall
        if result.round_trips:
            result.server_cpu_us_per_rt = 1e6 * used / result.round_trips
        # Includes the soft interrupts of the loopback path, charged to no process.
        other = 100.0 * busy / wall - result.server_cpu_pct - result.client_cpu_pct
        result.other_cpu_pct = max(0.0, other)
    return result


def _hold(workers: _Workers, result: Result, base: Plan, server_pid: int | None) -> None:
    """Idle: wait until every client process holds its connections, then read memory."""
    floor = max(
        MEMORY_FLOOR * procstat.mem_total_kib(),
        procstat.mem_available_kib() - MEMORY_BUDGET_KIB,
    )

    def guard() -> None:
        # A process-per-connection server may need GBs for 10k connections: stop the ramp
        # before the machine runs short, and report how many connections were reached.
        if not workers.stop.is_set() and procstat.mem_available_kib() < floor:
            workers.stop.set()

    held = workers.collect("held", base.duration + base.drain_timeout + 30, on_wake=guard)
    result.held = sum(msg[1] for msg in held)
    unanswered = sum(msg[2] for msg in held)
    if workers.stop.is_set():
        result.note = f"memory guard stopped the ramp at {result.held:,} connections"
    elif result.held < result.clients:
        result.note = (
            f"held {result.held:,} of {result.clients:,} connections when the "
            f"{base.duration:g} s ramp ended ({unanswered:,} unanswered)"
        )
    if server_pid is not None:
        result.pss_after_kib, result.server_procs = procstat.tree_pss_kib(server_pid)
        if result.held and result.pss_before_kib is not None:
            delta = result.pss_after_kib - result.pss_before_kib
            result.pss_per_conn_kib = delta / result.held
    workers.release.set()


def set_rates(result: Result, elapsed_ns: int, cpu: float, wall: float) -> None:
    """Rates per second and the clients' CPU, from the summed counts (the Python and the C
    load generators alike)."""
    elapsed = elapsed_ns / 1e9
    result.elapsed_s = round(elapsed, 3)
    if elapsed > 0:
        result.rt_per_s = result.round_trips / elapsed
        result.mb_per_s = result.verified_bytes / elapsed / 1e6
        result.conn_per_s = result.connections / elapsed
    result.client_cpu_pct = 100.0 * cpu / wall if wall else 0.0
    if result.round_trips:
        result.client_cpu_us_per_rt = 1e6 * cpu / result.round_trips


def _aggregate(result: Result, reports: list[dict[str, Any]], wall: float) -> None:
    latencies = array.array("q")
    cpu = 0.0
    elapsed_ns = 0
    for rep in reports:
        result.round_trips += rep["round_trips"]
        result.connections += rep["connections"]
        result.sent_bytes += rep["sent_bytes"]
        result.verified_bytes += rep["verified_bytes"]
        result.mismatches += rep["mismatches"]
        result.errors += rep["errors"]
        result.error_samples.extend(rep["error_samples"][: 5 - len(result.error_samples)])
        latencies.frombytes(rep["latencies"])
        cpu += rep["cpu_s"]
        elapsed_ns = max(elapsed_ns, rep["elapsed_ns"])
    set_rates(result, elapsed_ns, cpu, wall)
    ordered = sorted(latencies)
    result.p50_us = _percentile(ordered, 0.50)
    result.p99_us = _percentile(ordered, 0.99)


def raise_nofile(need: int) -> int:
    """Raise this process's RLIMIT_NOFILE (children inherit it); return the new soft limit."""
    return _raise_nofile(need)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="server address (loopback only)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--scenario", choices=SCENARIO_NAMES, default=SCENARIO_NAMES[0])
    parser.add_argument("--connections", type=int, help="override the scenario's connections")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of load")
    parser.add_argument("--procs", type=int, help="client processes (default: min(conns, CPUs))")
    parser.add_argument("--server-pid", type=int, help="read the server's CPU and memory")
    args = parser.parse_args(argv)
    if not args.host.startswith("127.") and args.host != "localhost":
        parser.error("only loopback addresses are load-tested")
    scenario = next(s for s in SCENARIOS if s.name == args.scenario)
    if args.connections:
        scenario = dataclasses.replace(scenario, clients=args.connections)
    raise_nofile(scenario.clients + 256)
    result = run(
        scenario,
        args.port,
        host=args.host,
        duration=args.duration,
        procs=args.procs,
        server_pid=args.server_pid,
    )
    json.dump(result.to_dict(), sys.stdout, indent=2)
    print()
    return 0 if result.verified else 1


if __name__ == "__main__":
    sys.exit(main())
