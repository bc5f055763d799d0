#!/usr/bin/env python3
"""Benchmark echod's modes against classic echo servers, xinetd, C and a bare event loop.

For each load scenario every server is started at once (a fresh process each, on a free port
of 127.0.0.1), then driven in short slices, one server after another, round after round (each
round in an order of its own, shuffled with a fixed seed); each figure is the median over
the rounds. On a shared machine load comes and goes: interleaving spreads it over every
server alike, where one long run per server would charge it to whichever ran at the time.
The load comes from bench/loadgen.c (built here with the system compiler; bench/loadgen.py
when there is none), the idle-memory scenario from bench/loadgen.py, one server at a time.
Each server is stopped with SIGTERM.
Writes bench.md (tables and ratios), bench.png (chart) and bench.json (every number) to --out
(default: docs/).

    python bench/run.py                      # everything: about 8 minutes on 2 CPUs
    python bench/run.py --quick              # development, about a minute: 2 x 0.3 s, 500 idle
    python bench/run.py --servers c_epoll,echod_async --scenarios churn-64B-c10

An echod mode that does not start (or is not implemented yet) is reported as n/a. The exit
status is 1 if any echoed byte differed or a run failed against a server that did start.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import cbuild
import cload
import loadgen
import massclose
import procstat

ROOT = Path(__file__).resolve().parent.parent
BASELINES = ROOT / "bench" / "baselines"
HOST = "127.0.0.1"
START_TIMEOUT = 15.0  # seconds for a server to accept its first connection
STOP_TIMEOUT = 15.0  # seconds for a server to exit after SIGTERM
READY_TIMEOUT = 5.0  # seconds to wait for READY=1 in the start-up measurement
IDLE_FULL, IDLE_QUICK = 10_000, 500
ROUNDS_FULL, ROUNDS_QUICK = 3, 2  # interleaved rounds per scenario
SLICE_FULL, SLICE_QUICK = 2.0, 0.3  # seconds of load per server per round
XINETD = Path("/usr/sbin/xinetd")
NOTES = ROOT / "bench" / "notes.md"
TOOL_BASELINES = frozenset({"c_epoll", "xinetd"})  # n/a without cc or xinetd, not a failure
# A baseline's known flaw, and the only load-generator error it excuses (with every byte sent
# echoed back unchanged): the tutorial process server's parent keeps its copy of the socket it
# accepted last, so that connection's client waits in vain for the end of the echo.
KNOWN_FLAWS = {"tutorial_process": "connections still open after the drain"}


@dataclass(frozen=True)
class ServerSpec:
    """A server the harness can start: a baseline script or an echod mode."""

    name: str
    about: str
    script: str | None = None  # bench/baselines/<script> PORT
    mode: str | None = None  # python -m echod run --config <yaml with this mode>
    binary: str | None = None  # a program cbuild builds, run as <binary> PORT
    xinetd: bool = False  # xinetd's built-in echo, on a private configuration
    settings: str = ""  # echod: YAML lines added to its configuration
    tree: str | None = None  # echod: serve from this source tree (--before), not ROOT
    workers: int = 1  # echod: its workers setting
    connections: str = "both"  # echod: its log.connections setting
    args: tuple[str, ...] = ()  # a baseline script: arguments after PORT

    @property
    def is_echod(self) -> bool:
        return self.mode is not None


SERVERS: tuple[ServerSpec, ...] = (
    ServerSpec("c_epoll", "C, one epoll loop (the limit for this client)", binary="epoll_echo"),
    ServerSpec("xinetd", "xinetd's built-in echo (forks per connection)", xinetd=True),
    ServerSpec("classic_thread", "tutorial server, thread per connection", "classic_thread.py"),
    ServerSpec(
        "tutorial_thread",
        "the tutorials' thread server as printed (send, listen(1000), nothing else)",
        "tutorial_thread.py",
    ),
    ServerSpec("classic_process", "tutorial server, fork per connection", "classic_process.py"),
    ServerSpec(
        "tutorial_process",
        "the tutorials' multiprocessing.Process server as printed (fork, listen(10))",
        "tutorial_process.py",
    ),
    ServerSpec("bare_uvloop", "asyncio Protocol echo on uvloop, nothing else", "bare_uvloop.py"),
    ServerSpec("echod_thread", "echod mode thread, 1 worker, connections logged", mode="thread"),
    ServerSpec(
        "echod_thread_spare",
        "echod_thread with spare_threads: 64 (threads reused across connections)",
        mode="thread",
        settings="spare_threads: 64\n",
    ),
    ServerSpec("echod_process", "echod mode process, 1 worker, connections logged", mode="process"),
    ServerSpec(
        "echod_process_spare",
        "echod_process with spare_processes: 64 (processes reused across connections)",
        mode="process",
        settings="spare_processes: 64\n",
    ),
    ServerSpec("echod_async", "echod mode async, 1 worker, connections logged", mode="async"),
    *(
        ServerSpec(
            f"echod_{mode}_close",
            f"echod_{mode} with log.connections: close (one line a connection, at its end)",
            mode=mode,
            connections="close",
        )
        for mode in ("thread", "process", "async")
    ),
)
SERVER_NAMES = tuple(s.name for s in SERVERS)

# Scaling: echod with N workers against N bare servers sharing the port (SO_REUSEPORT), N the
# machine's CPUs, run only where there are more than two (with two, the load generator and
# the servers would compete for the same CPUs, which says nothing about scaling).
WORKERS_SCENARIOS = ("1KiB-c100", "churn-64B-c10")
WORKERS_MIN_CPUS = 3


def workers_specs(n: int) -> list[ServerSpec]:
    """echod's async mode with ``n`` workers, and ``n`` bare uvloop servers on one port."""
    return [
        ServerSpec(
            f"echod_async_w{n}",
            f"echod mode async, {n} workers, connections logged",
            mode="async",
            workers=n,
        ),
        ServerSpec(
            f"bare_uvloop_x{n}",
            f"{n} bare_uvloop processes on one port (SO_REUSEPORT)",
            "bare_uvloop.py",
            args=(str(n),),
        ),
    ]

# Two baselines that serve alike: the tutorials' code as printed, and the same server written
# with our habits (sendall, with, exception handling; os.fork). A mode is compared, scenario by
# scenario, with the faster of the pair (bench/notes.md says why they differ).
PAIRS: dict[str, tuple[str, str]] = {
    "thread": ("classic_thread", "tutorial_thread"),
    "process": ("classic_process", "tutorial_process"),
}

# (echod server, its baseline): the comparisons the project's targets are stated in. A
# baseline "faster:<kind>" is the faster of PAIRS[kind] in each scenario.
RATIOS: tuple[tuple[str, str], ...] = (
    ("echod_async", "bare_uvloop"),
    ("echod_thread", "faster:thread"),
    ("echod_thread_spare", "faster:thread"),
    ("echod_process", "faster:process"),
    ("echod_process_spare", "faster:process"),
    ("echod_async_close", "bare_uvloop"),
    ("echod_thread_close", "faster:thread"),
    ("echod_process_close", "faster:process"),
    *((f"echod_{mode}_close", f"echod_{mode}") for mode in ("async", "thread", "process")),
    ("tutorial_thread", "classic_thread"),
    ("tutorial_process", "classic_process"),
    *((f"echod_{mode}", "c_epoll") for mode in ("async", "thread", "process")),
    *((f"echod_{mode}", "xinetd") for mode in ("async", "thread", "process")),
)


#: log.connections as the bench writes it: its boolean form where it has one.
_CONNECTIONS = {"both": "true", "off": "false"}


class ServerStartError(Exception):
    """The server exited, or did not accept connections, before its deadline."""


def free_port() -> int:
    """A port of 127.0.0.1 that was free a moment ago (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


class Server:
    """One server process of the harness. Construction starts nothing; start() does."""

    def __init__(
        self,
        spec: ServerSpec,
        workdir: Path,
        tag: str,
        env: dict[str, str],
        binaries: dict[str, Path] | None = None,
    ) -> None:
        self.spec = spec
        self.port = 0  # chosen by start()
        self.workdir = workdir
        self.output = workdir / f"{tag}.out"
        self.log_file = workdir / f"{tag}.log"
        self.config = workdir / f"{tag}.yaml"
        self.env = env
        self.binaries = binaries or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        if self.spec.script is not None:
            script = [sys.executable, str(BASELINES / self.spec.script), str(self.port)]
            return script + list(self.spec.args)
        if self.spec.binary is not None:
            built = self.binaries.get(self.spec.binary)
            if built is None:
                raise ServerStartError(f"{self.spec.binary} was not built")
            return [str(built), str(self.port)]
        if self.spec.xinetd:
            if not XINETD.exists():
                raise ServerStartError(f"{XINETD} is not installed (apt-get install xinetd)")
            # In the foreground (-dontfork), so that our pid is xinetd's; its own messages to
            # a file of ours, not to syslog; a pidfile of ours, not /run/xinetd.pid.
            return [
                str(XINETD),
                "-dontfork",
                "-filelog",
                str(self.output.with_suffix(".xinetd")),
                "-f",
                str(self.config),
                "-pidfile",
                str(self.workdir / f"{self.config.stem}.pid"),
            ]
        # -P: not the working directory (ROOT) first on sys.path, so that PYTHONPATH decides
        # which tree is served (--before).
        return [sys.executable, "-P", "-m", "echod", "run", "--config", str(self.config)]

    def write_xinetd_config(self) -> None:
        """The echo service built into xinetd, alone, on our port of 127.0.0.1.

        The service must be named echo (xinetd finds a built-in by name and id); UNLISTED
        because its port is not the one /etc/services gives echo. The default rate limit
        (cps 50 10: fifty connections a second, then ten seconds off) would stop the churn
        scenario at once, so there is none. Each connection is logged to a file, as echod logs
        its connections in the bench.
        """
        self.config.write_text(
            "service echo\n{\n"
            "\ttype = INTERNAL UNLISTED\n"
            "\tid = echo-stream\n"
            "\tsocket_type = stream\n"
            "\tprotocol = tcp\n"
            "\tuser = root\n"
            "\twait = no\n"
            f"\tport = {self.port}\n"
            f"\tbind = {HOST}\n"
            "\tinstances = UNLIMITED\n"
            "\tper_source = UNLIMITED\n"
            "\tcps = 1000000 1\n"
            f"\tlog_type = FILE {self.log_file}\n"
            "\tlog_on_success = PID HOST DURATION\n"
            "\tlog_on_failure = HOST\n"
            "}\n"
        )

    def write_config(self) -> None:
        # JSON strings are valid YAML scalars: no YAML library needed to write this.
        self.config.write_text(
            f"mode: {self.spec.mode}\n"
            f"host: {HOST}\n"
            f"port: {self.port}\n"
            f"workers: {self.spec.workers}\n"
            "max_connections: 20000\n"
            "pidfile: null\n"
            "log:\n"
            f"  file: {json.dumps(str(self.log_file))}\n"
            "  format: json\n"
            "  level: info\n"
            # (both as true: the form an earlier tree, served with --before, reads too)
            f"  connections: {_CONNECTIONS.get(self.spec.connections, self.spec.connections)}\n"
            + self.spec.settings
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.port = free_port()
        if self.spec.is_echod:
            self.write_config()
        elif self.spec.xinetd:
            self.write_xinetd_config()
        argv = self.argv()
        env = {**os.environ, **self.env}
        # The tree under test, not an installed copy, is what gets measured.
        tree = self.spec.tree or str(ROOT)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [tree, env.get("PYTHONPATH")]))
        with self.output.open("wb") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: leftovers are found by pgid
            )

    def wait_listening(self, timeout: float = START_TIMEOUT) -> None:
        """Return once the port accepts; raise ServerStartError if it exits or times out."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # bounded by the deadline
            if accepts(self.port):
                return
            try:
                # Wait for the process to exit, but at most a moment: returns early on a crash.
                self.proc.wait(0.02)
            except subprocess.TimeoutExpired:
                continue
            raise ServerStartError(f"exited with status {self.proc.returncode}: {self.tail()}")
        raise ServerStartError(f"port {self.port} did not accept within {timeout:.0f} s")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM the server (only the pid started here), wait, then clear leftovers."""
        if self.proc is None:
            return None
        tree = procstat.tree_pids(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(STOP_TIMEOUT)
        self.kill_leftovers(tree)
        return code

    def kill_leftovers(self, pids: list[int]) -> None:
        """SIGKILL descendants that outlived the server (e.g. per-connection children).

        Only pids seen in the server's tree that are still in its process group.
        """
        assert self.proc is not None
        for pid in pids:
            if pid == self.proc.pid:
                continue
            try:
                if os.getpgid(pid) == self.proc.pid:
                    os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue

    def tail(self) -> str:
        """The last line the server printed (for a traceback: the exception), shortened."""
        try:
            text = self.output.read_text(errors="replace").strip().splitlines()
        except FileNotFoundError:
            return "no output"
        return text[-1][:300] if text else "no output"


# --------------------------------------------------------------------------- measurements


def measure_startup(
    spec: ServerSpec, workdir: Path, runs: int, binaries: dict[str, Path]
) -> dict[str, Any]:
    """Start the server runs times; median time from exec to READY=1 and to listening.

    READY=1 comes on a NOTIFY_SOCKET made here (sd_notify protocol); None when none came
    within READY_TIMEOUT. Both clocks are polled every 2 ms, which bounds their precision.
    """
    ready: list[float] = []
    listening: list[float] = []
    failures: list[str] = []
    wait_ready = spec.is_echod
    for i in range(runs):
        path = workdir / f"notify-{spec.name}-{i}.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(path))
            env = {"NOTIFY_SOCKET": str(path)}
            server = Server(spec, workdir, f"startup-{spec.name}-{i}", env, binaries)
            try:
                t_ready, t_listen, failure = _time_startup(server, notify, wait_ready)
            except ServerStartError as exc:
                t_ready, t_listen, failure = None, None, str(exc)
            finally:
                server.stop()
        # No READY in the first run: the others only time listening, not 5 s each for nothing.
        wait_ready = wait_ready and t_ready is not None
        path.unlink(missing_ok=True)
        if failure:  # a server that exits is not ready, whatever it did before
            failures.append(failure)
            continue
        if t_ready is not None:
            ready.append(t_ready)
        if t_listen is not None:
            listening.append(t_listen)
    return {
        "runs": runs,
        "ready_ms": 1000 * statistics.median(ready) if len(ready) == runs else None,
        "listen_ms": 1000 * statistics.median(listening) if len(listening) == runs else None,
        "failures": failures[:3],
    }


def _time_startup(
    server: Server, notify: socket.socket, wait_ready: bool
) -> tuple[float | None, float | None, str | None]:
    t_ready = t_listen = None
    t0 = time.perf_counter()
    server.start()
    deadline = t0 + READY_TIMEOUT
    while time.perf_counter() < deadline:  # bounded by the deadline
        readable, _, _ = select.select([notify], [], [], 0.002)
        now = time.perf_counter() - t0
        if readable and b"READY=1" in notify.recv(4096).split(b"\n"):
            t_ready = t_ready or now
        if t_listen is None and accepts(server.port):
            t_listen = now
        if t_listen is not None and (t_ready is not None or not wait_ready):
            break
        if not server.alive():
            return t_ready, t_listen, f"exited with status {server.proc and server.proc.poll()}"
    return t_ready, t_listen, None


@dataclass(frozen=True)
class Plan:
    """How the load scenarios run: interleaved rounds of slices, by which client."""

    rounds: int
    slice_s: float
    loadgen_c: Path | None  # the built C client; None: bench/loadgen.py
    binaries: dict[str, Path]


def bench_interleaved(
    specs: list[ServerSpec], scenario: loadgen.Scenario, plan: Plan, workdir: Path
) -> dict[str, dict[str, Any]]:
    """One scenario against every server, all up at once, in rounds of short slices.

    Each round runs the servers in an order of its own (shuffled, seeded by the scenario and
    the round, so a run can be repeated), so that no server always follows the same one:
    a churn slice leaves tens of thousands of the client's sockets in TIME_WAIT, which slow
    the next slice's connects. (Rotating the order, as this did before, kept every server
    behind the same neighbour in all but one round.) Each figure of the result is the
    median over the rounds; "slices" keeps every round's headline number and CPU.
    """
    results: dict[str, dict[str, Any]] = {}
    servers: dict[str, Server] = {}
    slices: dict[str, list[dict[str, Any]]] = {}
    try:
        for spec in specs:
            server = Server(spec, workdir, f"{spec.name}-{scenario.name}", {}, plan.binaries)
            try:
                server.start()
                server.wait_listening()
            except ServerStartError as exc:
                results[spec.name] = {"status": "n/a", "reason": str(exc)}
                server.stop()
                _progress(spec.name, scenario.name, results[spec.name])
                continue
            servers[spec.name] = server
            slices[spec.name] = []
        names = list(servers)
        for rnd in range(plan.rounds):
            order = list(names)
            random.Random(f"{scenario.name} {rnd}").shuffle(order)
            for name in order:
                entry = _run_slice(servers[name], scenario, plan)
                slices[name].append(entry)
                _progress(name, f"{scenario.name} #{rnd + 1}", entry)
    finally:
        for name, server in servers.items():  # also on Ctrl-C: each is in a session of its own
            code = server.stop()
            entry = _combine(slices.get(name, []))
            entry["exit_status"] = code
            if server.spec.is_echod:
                entry["log_lines"] = _count_lines(server.log_file)
            if name == "bare_uvloop":
                entry["loop"] = _loop_line(server)
            results[name] = entry
    return {spec.name: results[spec.name] for spec in specs if spec.name in results}


def _run_slice(server: Server, scenario: loadgen.Scenario, plan: Plan) -> dict[str, Any]:
    """One slice of load against a running server."""
    if not server.alive():
        return {"status": "failed", "reason": f"server exited: {server.tail()}"}
    try:
        if plan.loadgen_c is not None:
            result = cload.run(
                plan.loadgen_c, scenario, server.port, duration=plan.slice_s, server_pid=server.pid
            )
        else:
            result = loadgen.run(
                scenario, server.port, host=HOST, duration=plan.slice_s, server_pid=server.pid
            )
    except Exception as exc:  # one broken slice must not lose the others
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    entry: dict[str, Any] = {"status": "ok", **result.to_dict()}
    if not server.alive():
        entry["status"] = "failed"
        entry["reason"] = f"server exited during the run: {server.tail()}"
    return entry


# Medians over the slices; the counts are summed; the rest is the first slice's.
_MEDIAN_KEYS = (
    "rt_per_s",
    "mb_per_s",
    "conn_per_s",
    "p50_us",
    "p99_us",
    "server_cpu_us_per_rt",
    "server_cpu_pct",
    "client_cpu_pct",
    "client_cpu_us_per_rt",
    "other_cpu_pct",
    "elapsed_s",
)
_SUM_KEYS = ("round_trips", "connections", "sent_bytes", "verified_bytes", "mismatches", "errors")


def _combine(slices: list[dict[str, Any]]) -> dict[str, Any]:
    if not slices:
        return {"status": "failed", "reason": "no slice ran"}
    failed = [e for e in slices if e["status"] != "ok"]
    if failed:
        return {"status": "failed", "reason": failed[0]["reason"]}
    entry = dict(slices[0])
    for key in _MEDIAN_KEYS:
        values = [e[key] for e in slices if e.get(key) is not None]
        entry[key] = statistics.median(values) if values else None
    for key in _SUM_KEYS:
        entry[key] = sum(e[key] for e in slices)
    entry["error_samples"] = [m for e in slices for m in e["error_samples"]][:5]
    entry["verified"] = all(e["verified"] for e in slices)
    entry["slices"] = [
        {"value": primary_value(e), "cpu_us": e["server_cpu_us_per_rt"]} for e in slices
    ]
    return entry


def bench_server(
    spec: ServerSpec,
    scenarios: list[loadgen.Scenario],
    duration: float,
    workdir: Path,
    binaries: dict[str, Path],
) -> dict[str, dict[str, Any]]:
    """Every scenario against a fresh process of this server; n/a where it does not start."""
    results: dict[str, dict[str, Any]] = {}
    for scenario in scenarios:
        server = Server(spec, workdir, f"{spec.name}-{scenario.name}", {}, binaries)
        try:
            entry = _run_one(server, scenario, duration)
        except ServerStartError as exc:
            # A server that does not start fails alike for every scenario: say so once.
            for rest in scenarios[scenarios.index(scenario) :]:
                results[rest.name] = {"status": "n/a", "reason": str(exc)}
            _progress(spec.name, "(every scenario)", results[scenario.name])
            break
        finally:
            code = server.stop()  # also on Ctrl-C: the server is in a session of its own
        entry["exit_status"] = code
        if spec.is_echod:
            entry["log_lines"] = _count_lines(server.log_file)
        if spec.name == "bare_uvloop":
            entry["loop"] = _loop_line(server)
        results[scenario.name] = entry
        _progress(spec.name, scenario.name, entry)
    return results


def _run_one(server: Server, scenario: loadgen.Scenario, duration: float) -> dict[str, Any]:
    """Start the server and run one scenario against it; the caller stops it."""
    server.start()
    server.wait_listening()
    try:
        result = loadgen.run(
            scenario, server.port, host=HOST, duration=duration, server_pid=server.pid
        )
    except Exception as exc:  # one broken run must not lose the others
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    entry: dict[str, Any] = {"status": "ok", **result.to_dict()}
    if not server.alive():
        entry["status"] = "failed"
        entry["reason"] = f"server exited during the run: {server.tail()}"
    return entry


def _count_lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def _loop_line(server: Server) -> str:
    try:
        first = server.output.read_text().splitlines()[0]
    except (FileNotFoundError, IndexError):
        return "unknown"
    return first.removeprefix("loop: ")


def _progress(server: str, scenario: str, entry: dict[str, Any]) -> None:
    if entry["status"] != "ok":
        print(f"{server:16} {scenario:16} {entry['status']}: {entry['reason']}", flush=True)
        return
    check = "verified" if entry["verified"] else f"NOT VERIFIED {entry['error_samples']}"
    print(
        f"{server:16} {scenario:16} {primary(entry):>14}  "
        f"cpu/rt {_num(entry['server_cpu_us_per_rt'], 1):>6} us  {check}",
        flush=True,
    )


# --------------------------------------------------------------------------- report


def primary_value(entry: dict[str, Any]) -> float | None:
    """The headline number of a run: rt/s, MB/s (64 KiB), conn/s (churn), MiB PSS (idle)."""
    if entry.get("status") != "ok":
        return None
    if entry["kind"] == "idle":
        after = entry["pss_after_kib"]
        return after / 1024 if after is not None else None
    if entry["kind"] == "churn":
        return float(entry["conn_per_s"])
    if entry["size"] >= 65536:
        return float(entry["mb_per_s"])
    return float(entry["rt_per_s"])


def unit(scenario: loadgen.Scenario) -> str:
    if scenario.kind == "idle":
        return "MiB PSS"
    if scenario.kind == "churn":
        return "conn/s"
    return "MB/s" if scenario.size >= 65536 else "rt/s"


def primary(entry: dict[str, Any]) -> str:
    value = primary_value(entry)
    if value is None:
        return "n/a"
    if entry["kind"] == "idle":
        held = entry["held"] or 0
        short = f" ({held:,} held)" if held < entry["clients"] else ""
        return f"{value:,.1f}{short}"
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def _num(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _ratio(num: float | None, den: float | None) -> str:
    if num is None or den is None or den == 0:
        return "n/a"
    return f"{num / den:.2f}x"


def machine_info() -> dict[str, str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    try:
        uvloop_version = metadata.version("uvloop")
    except metadata.PackageNotFoundError:
        uvloop_version = "not installed"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": f"{procstat.mem_total_kib() / 1024 / 1024:.0f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": uvloop_version,
        "echod": _echod_version(),
    }


def _echod_version() -> str:
    probe = subprocess.run(
        [sys.executable, "-c", "import echod; print(echod.__version__)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    version = probe.stdout.strip() if probe.returncode == 0 else "not importable"
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if commit.returncode == 0:
        version += f" (commit {commit.stdout.strip()})"
    return version


def render_markdown(report: dict[str, Any], scenarios: list[loadgen.Scenario]) -> str:
    servers: list[str] = report["servers"]
    runs: dict[str, dict[str, dict[str, Any]]] = report["results"]
    startup: dict[str, dict[str, Any]] = report["startup"]
    m = report["machine"]
    out = [
        "# echod benchmarks",
        "",
        f"Run {report['date']} with `{report['command']}`: for each load scenario every "
        f"server up at once, driven in {report['rounds']} interleaved rounds of "
        f"{report['duration']:g} s slices by {report['client']}; medians over the rounds.",
        "",
        "On a machine shared with other work, throughput moves with that load by 10-30 % "
        "(the one-client ping-pong several-fold); server CPU per operation, beside it, moves "
        "far less. How much else ran beside each server is in \"Other load during each "
        "run\" below.",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory']}, Linux {m['kernel']}, "
        f"Python {m['python']}, uvloop {m['uvloop']} "
        f"(bare_uvloop ran on: {report['bare_uvloop_loop']}), echod {m['echod']}.",
        "",
        "Servers: "
        + "; ".join(
            f"{s.name}: {s.about}"
            for s in with_before(SERVERS, report.get("before"))
            if s.name in report["servers"]
        )
        + ".",
        "",
        "## Throughput",
        "",
        "Higher is better, except idle (PSS of the server's process tree holding the idle "
        "connections). Start-up: median ms from exec to READY=1 / to accepting.",
        "",
    ]
    out += [
        "Each cell: the headline number, then the server's CPU per operation (round trip; "
        "churn: connection) in µs.",
        "",
    ]
    head = [f"{s.name} {unit(s)}" for s in scenarios]
    out += _table(
        ["server", *head, "start-up ms"],
        [
            [name, *[_with_cpu(runs[name][s.name]) for s in scenarios], _startup(startup, name)]
            for name in servers
        ],
    )
    out += ["", "## Server CPU per round trip, µs", ""]
    out += [
        "User + system time of the server's process tree (with reaped children) from /proc, "
        "divided by round trips (idle: by connections). Lower is better; it depends far less "
        "on a busy machine than throughput does.",
        "",
    ]
    out += _table(
        ["server", *[s.name for s in scenarios]],
        [
            [n, *[_field(runs[n][s.name], "server_cpu_us_per_rt", 1) for s in scenarios]]
            for n in servers
        ],
    )
    timed = [s for s in scenarios if s.kind != "idle"]
    out += ["", "## Latency p50 / p99, µs", ""]
    out += _table(
        ["server", *[s.name for s in timed]],
        [[n, *[_latency(runs[n][s.name]) for s in timed]] for n in servers],
    )
    out += _memory_section(report, scenarios)
    out += ["", "## Other load during each run, % of one CPU", ""]
    out += [
        "Busy CPU time of the whole machine (/proc/stat) minus that of the server and the "
        "clients, over the run: soft interrupts of the loopback path, and anything else that "
        "ran meanwhile. Where it is high, throughput and latency of that run are noisy.",
        "",
    ]
    out += _table(
        ["server", *[s.name for s in scenarios]],
        [[n, *[_field(runs[n][s.name], "other_cpu_pct", 0) for s in scenarios]] for n in servers],
    )
    out += _ratio_section(report, scenarios)
    out += _workers_section(report, scenarios)
    out += _mass_close_section(report)
    out += _verification_section(report)
    out += [
        "",
        "## Method",
        "",
        "- Load: bench/loadgen.c (built at run time with the system compiler; bench/loadgen.py "
        "if there is none, and for the idle scenario), client processes = min(connections, "
        "CPUs), each driving its connections with one epoll loop. Every echoed byte is "
        "compared with what was sent; each connection half-closes at the end and must then "
        "see EOF and nothing else.",
        "- Interleaving: for each scenario every server is started, then each gets a slice of "
        "load in turn, each round in an order of its own (shuffled with a fixed seed, so that "
        "no server always follows the same one); the figures are medians over the "
        "rounds (bench.json keeps every slice). Server CPU is read from /proc over the "
        "server's process tree (bench/procstat.py) before and after each slice.",
        "- c_epoll (bench/baselines/epoll_echo.c, cc -O2) is the physical limit of this "
        "client on this machine. xinetd runs its built-in echo (type INTERNAL UNLISTED, "
        "id echo-stream) on a private configuration and port, in the foreground, with no "
        "connection-rate limit, logging each connection to a file; it forks per connection.",
        "- MB/s counts payload echoed back, 10^6 bytes. Latency is per round trip (churn: "
        "connect to echo). Churn: connect, echo 64 B, close, repeat.",
        "- The clients share the machine's CPUs with the server; on a small machine they are "
        "part of the limit, equally for every server. Time spent in soft interrupts "
        "(the loopback network path) is not charged to any process.",
        "- Idle: connections opened 64 at a time per client process, each echoing 8 B once, "
        "then held; memory is PSS from /proc/<pid>/smaps_rollup summed over the server's tree. "
        "The ramp stops after 30 s, or once it has cost 6 GiB of available memory (or left "
        "less than a quarter): a server that needs more shows what it held by then.",
        "- The tutorial servers (tutorial_thread, tutorial_process) are the tutorials' code as "
        "printed: recv(1024) and send, a threading.Thread or a multiprocessing.Process per "
        "connection, listen(1000) or listen(10), nothing else. The classic servers are the "
        "same written with sendall, with and exception handling (classic_process forks with "
        "os.fork and closes its copy of the socket). All leave Nagle's algorithm on: 64 KiB "
        "echoed in 1 KiB writes then waits for delayed ACKs, about 40 ms a round trip.",
        "",
    ]
    return "\n".join(out)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---", *["---:"] * (len(head) - 1)]) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _with_cpu(entry: dict[str, Any]) -> str:
    """The headline number, and CPU per operation beside it (not for idle: memory)."""
    text = primary(entry)
    cpu = entry.get("server_cpu_us_per_rt")
    if entry.get("status") != "ok" or entry["kind"] == "idle" or cpu is None:
        return text
    return f"{text} · {cpu:,.1f} µs"


def _workers_section(report: dict[str, Any], scenarios: list[loadgen.Scenario]) -> list[str]:
    info: dict[str, Any] | None = report.get("workers_n")
    if info is None:
        return []
    out = ["", "## Workers: N against N bare servers", ""]
    if "skipped" in info:
        return [*out, f"Not run: {info['skipped']}."]
    n, results = info["n"], info["results"]
    out += [
        f"echod's async mode with {n} workers against {n} bare_uvloop processes sharing the "
        f"port with SO_REUSEPORT, on {info['cpus']} CPUs; interleaved as above. Ratio: echod "
        "divided by the bare servers (CPU: theirs divided by echod's).",
        "",
    ]
    chosen = [s for s in scenarios if s.name in WORKERS_SCENARIOS]
    echod_name, bare_name = (spec.name for spec in workers_specs(n))
    rows = [[name, *[_with_cpu(results.get(name, {}).get(s.name, {})) for s in chosen]]
            for name in (echod_name, bare_name)]  # fmt: skip

    def cell(s: loadgen.Scenario, key: str | None) -> str:
        mine = results.get(echod_name, {}).get(s.name, {})
        theirs = results.get(bare_name, {}).get(s.name, {})
        if mine.get("status") != "ok" or theirs.get("status") != "ok":
            return "n/a"
        if key is None:
            return _ratio(primary_value(mine), primary_value(theirs))
        return _ratio(theirs.get(key), mine.get(key))

    rows.append(["ratio", *[cell(s, None) for s in chosen]])
    rows.append(["ratio (CPU)", *[cell(s, "server_cpu_us_per_rt") for s in chosen]])
    return out + _table(["server", *[f"{s.name} {unit(s)}" for s in chosen]], rows)


def _mass_close_section(report: dict[str, Any]) -> list[str]:
    runs: dict[str, dict[str, Any]] = report.get("mass_close", {})
    if not runs:
        return []
    out = ["", "## Many connections closing at once (thread servers)", ""]
    out += [
        "N idle connections (each echoed once) closed by the client in the same moment. "
        "Retired: from the last close until the server is back to its threads before the "
        "clients came, and (echod) every close event is logged. Meanwhile a probe client "
        f"connects, echoes 8 B and closes every {massclose.PROBE_EVERY * 1000:g} ms: its "
        f"worst time (the target: under {massclose.PROBE_TARGET_MS:g} ms). Stop: N again, "
        "closed at once, then SIGTERM: time to exit, and whether `open` in `stopping` equals "
        "`finished` + `cut` in `stopped`.",
        "",
    ]
    rows = []
    for server, e in runs.items():
        if e.get("status") != "ok":
            rows.append([server, "failed", e.get("reason", ""), "", "", ""])
            continue
        stop = e.get("stop")
        stop_cell = "n/a"
        if stop is not None:
            counts = (
                f"{stop.get('open')} = {stop.get('finished')} + {stop.get('cut')}"
                if "open" in stop
                else stop.get("note", "")
            )
            verdict = "adds up" if stop.get("adds_up") else "does NOT add up"
            stop_cell = f"{stop['stop_s']:.2f} s; {counts}: {verdict}"
        rows.append(
            [
                server,
                f"{e['connections']:,}",
                _num(e["retire_s"], 2) + " s",
                f"{_num(e['probe_p50_ms'], 1)} / {_num(e['probe_max_ms'], 1)} ms",
                f"{e['probes_over_target']} of {e['probes']} (failed {e['probe_failures']})",
                stop_cell,
            ]
        )
    head = ["server", "connections", "retired in", "probe p50 / max", "probes > target"]
    return out + _table([*head, "stop (echod)"], rows)


def _field(entry: dict[str, Any], key: str, digits: int) -> str:
    return _num(entry.get(key), digits) if entry.get("status") == "ok" else "n/a"


def _latency(entry: dict[str, Any]) -> str:
    if entry.get("status") != "ok":
        return "n/a"
    return f"{_num(entry['p50_us'])} / {_num(entry['p99_us'])}"


def _startup(startup: dict[str, dict[str, Any]], name: str) -> str:
    info = startup.get(name)
    if not info:
        return "n/a"
    return f"{_num(info['ready_ms'])} / {_num(info['listen_ms'])}"


def _memory_section(report: dict[str, Any], scenarios: list[loadgen.Scenario]) -> list[str]:
    idle = [s for s in scenarios if s.kind == "idle"]
    if not idle:
        return []
    name = idle[0].name
    rows = []
    for server in report["servers"]:
        e = report["results"][server][name]
        if e.get("status") != "ok":
            rows.append([server, "n/a", "n/a", "n/a", "n/a", "n/a"])
            continue
        rows.append(
            [
                server,
                f"{e['held']:,}",
                _num(e["pss_before_kib"] / 1024, 1),
                _num(e["pss_after_kib"] / 1024, 1),
                _num(e["pss_per_conn_kib"], 1),
                str(e["server_procs"]),
            ]
        )
    head = ["server", "connections held", "PSS idle MiB", "PSS held MiB", "KiB/connection"]
    out = ["", f"## Memory: {name}", ""]
    out += _table([*head, "processes"], rows)
    notes = [
        f"- {server}: {report['results'][server][name]['note']}"
        for server in report["servers"]
        if report["results"][server][name].get("note")
    ]
    return out + (["", *notes] if notes else [])


def faster_baseline(
    runs: dict[str, dict[str, Any]], kind: str, scenario: loadgen.Scenario
) -> str | None:
    """The faster server of ``PAIRS[kind]`` in ``scenario`` (idle: the one with less memory per
    connection); None when neither ran."""
    best: tuple[float, str] | None = None
    for name in PAIRS[kind]:
        entry = runs.get(name, {}).get(scenario.name, {})
        if entry.get("status") != "ok":
            continue
        if scenario.kind == "idle":
            per_conn = entry.get("pss_per_conn_kib")
            score = -per_conn if per_conn is not None else None
        else:
            score = primary_value(entry)
        if score is not None and (best is None or score > best[0]):
            best = (score, name)
    return None if best is None else best[1]


def _ratio_section(report: dict[str, Any], scenarios: list[loadgen.Scenario]) -> list[str]:
    runs = report["results"]
    selected = set(report["servers"])

    def wanted(echod: str, base: str) -> bool:
        if base.startswith("faster:"):
            return echod in selected and any(b in selected for b in PAIRS[base[7:]])
        if not echod.startswith("echod_"):  # two baselines: only when both ran
            return echod in selected and base in selected
        return echod in selected or base in selected

    pairs = [(a, b) for a, b in RATIOS if wanted(a, b)]
    pairs += [(n, f"{n}_before") for n in report["servers"] if f"{n}_before" in selected]
    if not pairs:
        return []

    def value(server: str | None, scenario: str, key: str | None) -> float | None:
        entry = runs.get(server, {}).get(scenario, {}) if server is not None else {}
        if entry.get("status") != "ok":
            return None
        return primary_value(entry) if key is None else entry.get(key)

    out = ["", "## Ratios: echod / baseline", ""]
    out += [
        "Headline number of echod divided by that of its baseline (idle: baseline PSS divided "
        "by echod PSS). CPU: baseline CPU per round trip divided by echod's. Above 1.00x "
        "means echod does better. \"faster thread\" and \"faster process\" are, in each "
        "scenario, the faster of the two tutorial-style servers of that kind (classic_* as we "
        "write them, tutorial_* as the tutorials print them), named in the cell; the CPU row "
        "compares with that same server.",
        "",
    ]
    rows = []
    for echod, base in pairs:
        cells, cpu_cells = [], []
        label = f"faster {base[7:]}" if base.startswith("faster:") else base
        for s in scenarios:
            theirs_name: str | None = base
            note = ""
            if base.startswith("faster:"):
                theirs_name = faster_baseline(runs, base[7:], s)
                note = f" ({theirs_name.split('_')[0]})" if theirs_name else ""
            mine, theirs = value(echod, s.name, None), value(theirs_name, s.name, None)
            if s.kind == "idle" and value(echod, s.name, "held") != value(
                theirs_name, s.name, "held"
            ):
                # They held different numbers of connections: compare per connection.
                mine = value(echod, s.name, "pss_per_conn_kib")
                theirs = value(theirs_name, s.name, "pss_per_conn_kib")
                cells.append(_ratio(theirs, mine) + " per conn." + note)
            elif s.kind == "idle":
                cells.append(_ratio(theirs, mine) + note)
            else:
                cells.append(_ratio(mine, theirs) + note)
            cpu_cells.append(
                _ratio(
                    value(theirs_name, s.name, "server_cpu_us_per_rt"),
                    value(echod, s.name, "server_cpu_us_per_rt"),
                )
                + note
            )
        rows.append([f"{echod} / {label}", *cells])
        rows.append([f"{echod} / {label} (CPU)", *cpu_cells])
    return out + _table(["ratio", *[s.name for s in scenarios]], rows)


def all_runs(report: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(server, scenario, entry) of every run of the report, the workers scenario's too."""
    runs: list[tuple[str, str, dict[str, Any]]] = []
    extra = report.get("workers_n", {}).get("results", {})
    for results in (report["results"], extra):
        for server, by_scenario in results.items():
            runs += [(server, scenario, e) for scenario, e in by_scenario.items()]
    return runs


def excused(server: str, entry: dict[str, Any]) -> bool:
    """Whether a run's only failure is the known flaw of its baseline (KNOWN_FLAWS), with every
    byte sent echoed back unchanged."""
    flaw = KNOWN_FLAWS.get(server)
    return (
        flaw is not None
        and entry.get("status") == "ok"
        and not entry.get("mismatches")
        and entry.get("round_trips", 0) > 0
        and entry.get("verified_bytes") == entry.get("sent_bytes")
        and all(sample.startswith(flaw) for sample in entry.get("error_samples", []))
    )


def _verification_section(report: dict[str, Any]) -> list[str]:
    ok = failed = 0
    sent = 0
    problems: list[str] = []
    unavailable: list[str] = []
    flawed: list[str] = []
    for server, scenario, e in all_runs(report):
        if e["status"] == "n/a":
            unavailable.append(f"- {server} {scenario}: n/a ({e['reason']})")
        elif e["status"] == "ok" and e["verified"]:
            ok += 1
            sent += e["sent_bytes"]
        elif excused(server, e):
            ok += 1
            sent += e["sent_bytes"]
            flawed.append(f"{server} {scenario}")
        else:
            failed += 1
            why = e.get("reason") or "; ".join(e.get("error_samples", [])) or "mismatch"
            problems.append(f"- {server} {scenario}: FAILED ({why})")
    # Failures of a tool baseline that echoed nothing wrong (xinetd resetting connections) do
    # not fail the verification of the run; they are listed below it.
    tolerated = [line for line in problems if line.split()[1] in TOOL_BASELINES]
    wrong_bytes = any(e.get("mismatches") for _, _, e in all_runs(report))
    failed_here = failed - (0 if wrong_bytes else len(tolerated))
    verdict = "passed" if failed_here == 0 and ok > 0 else "FAILED"
    out = [
        "",
        "## Byte verification",
        "",
        f"Byte verification: {verdict}: {ok} runs, {sent:,} bytes sent and every one compared "
        f"on its way back; {failed} runs failed"
        + (f" ({len(tolerated)} of a tool baseline, no byte wrong)." if tolerated else "."),
    ]
    if flawed:
        out += [
            "",
            f"Every byte was echoed in {', '.join(flawed)}, but in each a client waited in vain "
            "for the end of its echo: the parent of the tutorials' process server keeps its copy "
            "of the socket it accepted last (bench/baselines/tutorial_process.py).",
        ]
    if problems or unavailable:
        out += ["", *problems, *_dedupe_na(unavailable)]
    return out


def _dedupe_na(lines: list[str]) -> list[str]:
    # A server that never starts fails the same way for every scenario: say it once.
    seen: dict[str, str] = {}
    for line in lines:
        server = line.split()[1]
        seen.setdefault(server, re.sub(r"^- (\S+) \S+:", r"- \1 (every scenario):", line))
    return list(seen.values())


PALETTE = {
    "c_epoll": "#000000",
    "xinetd": "#b39ddb",
    "classic_thread": "#9e9e9e",
    "tutorial_thread": "#bdbdbd",
    "classic_process": "#6d6d6d",
    "tutorial_process": "#8d6e63",
    "bare_uvloop": "#3d3d3d",
    "echod_thread": "#4c9be8",
    "echod_thread_spare": "#90caf9",
    "echod_process": "#2e7d32",
    "echod_process_spare": "#81c784",
    "echod_async": "#e8743b",
}


def _chart_value(entry: dict[str, Any]) -> float | None:
    # Idle: KiB per connection, comparable when servers held different numbers.
    if entry.get("status") == "ok" and entry["kind"] == "idle":
        per_conn: float | None = entry["pss_per_conn_kib"]
        return per_conn
    return primary_value(entry)


def draw_chart(report: dict[str, Any], scenarios: list[loadgen.Scenario], path: Path) -> str:
    """bench.png: a panel per scenario (a bar per server), and CPU per round trip below.

    Returns "" when drawn, else why not.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return "matplotlib is not installed: pip install -r bench/requirements.txt"
    servers: list[str] = report["servers"]
    runs = report["results"]
    cols = 3
    rows = (len(scenarios) + cols - 1) // cols
    fig = plt.figure(figsize=(5 * cols, 3.4 * rows + 3.6))
    grid = fig.add_gridspec(rows + 1, cols)
    thousands = FuncFormatter(lambda v, _: f"{v:,.0f}")
    colors = [PALETTE.get(s, "#888888") for s in servers]
    for i, scenario in enumerate(scenarios):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        values = [_chart_value(runs[s][scenario.name]) for s in servers]
        bars = ax.bar(range(len(servers)), [v or 0 for v in values], color=colors)
        for bar, v in zip(bars, values, strict=True):
            label = "n/a" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:,.1f}")
            xy = (bar.get_x() + bar.get_width() / 2, bar.get_height())
            ax.annotate(label, xy, ha="center", va="bottom", fontsize=8)
        if scenario.kind == "idle":
            title = f"{scenario.name}: KiB PSS per connection (lower is better)"
            if any(v for v in values):
                ax.set_yscale("log")
        else:
            title = f"{scenario.name}: {unit(scenario)} (higher is better)"
            ax.yaxis.set_major_formatter(thousands)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(servers)), servers, rotation=25, ha="right", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
        ax.margins(y=0.15)
    _cpu_panel(fig.add_subplot(grid[rows, :]), servers, runs, scenarios)
    m = report["machine"]
    fig.suptitle(
        f"echod bench, {report['date']}: {m['nproc']} CPUs ({m['cpu']}), "
        f"Linux {m['kernel']}, Python {m['python']}, uvloop {m['uvloop']}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return ""


def _cpu_panel(
    ax: Any, servers: list[str], runs: dict[str, Any], scenarios: list[loadgen.Scenario]
) -> None:
    """Grouped bars: server CPU µs per round trip, a group per scenario, log scale."""
    width = 0.8 / max(1, len(servers))
    for j, server in enumerate(servers):
        values = [
            runs[server][s.name].get("server_cpu_us_per_rt") or 0
            if runs[server][s.name].get("status") == "ok"
            else 0
            for s in scenarios
        ]
        xs = [i + (j - (len(servers) - 1) / 2) * width for i in range(len(scenarios))]
        ax.bar(xs, values, width, label=server, color=PALETTE.get(server, "#888888"))
    ax.set_yscale("log")
    ax.set_xticks(range(len(scenarios)), [s.name for s in scenarios], fontsize=9)
    ax.set_title(
        "server CPU µs per round trip (idle: per connection), lower is better", fontsize=10
    )
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(fontsize=8, ncols=len(servers), loc="upper left")


# --------------------------------------------------------------------------- main


def with_before(specs: tuple[ServerSpec, ...], tree: str | None) -> list[ServerSpec]:
    """``specs``, each echod one followed by its twin served from ``tree`` (if any)."""
    out: list[ServerSpec] = []
    for spec in specs:
        out.append(spec)
        if tree is not None and spec.is_echod:
            about = f"{spec.name} served from {tree}"
            out.append(
                dataclasses.replace(spec, name=f"{spec.name}_before", about=about, tree=tree)
            )
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="development run (about 2 min)")
    parser.add_argument("--servers", default=",".join(SERVER_NAMES), help="comma-separated")
    parser.add_argument("--scenarios", default=",".join(loadgen.SCENARIO_NAMES), help="ditto")
    parser.add_argument("--duration", type=float, help="seconds per slice (2; quick 0.3)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per scenario (3; quick 2)")
    parser.add_argument(
        "--client", choices=("auto", "c", "python"), default="auto", help="load generator"
    )
    parser.add_argument(
        "--mass-close",
        type=int,
        help="connections closed at once in the thread-mode scenario (5000; quick 500; 0: skip)",
    )
    parser.add_argument(
        "--workers-n",
        type=int,
        metavar="N",
        help="the workers scenario: echod async with N workers against N bare servers "
        f"(default: the CPUs, when there are at least {WORKERS_MIN_CPUS}; 0: skip)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="output directory")
    parser.add_argument(
        "--before",
        type=Path,
        metavar="TREE",
        help="also serve each chosen echod mode from this source tree (a `git worktree` of an "
        "earlier commit), as <name>_before, interleaved with the current code",
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="BENCH_JSON",
        help="run nothing: write bench.md and bench.png again from a bench.json (and the notes)",
    )
    args = parser.parse_args(argv)
    args.servers = _choose(parser, args.servers, SERVER_NAMES, "server")
    args.scenarios = _choose(parser, args.scenarios, loadgen.SCENARIO_NAMES, "scenario")
    if args.duration is None:
        args.duration = SLICE_QUICK if args.quick else SLICE_FULL
    if args.rounds is None:
        args.rounds = ROUNDS_QUICK if args.quick else ROUNDS_FULL
    if args.mass_close is None:
        args.mass_close = massclose.QUICK if args.quick else massclose.FULL
    if args.duration <= 0 or args.rounds <= 0 or args.mass_close < 0:
        parser.error("--duration and --rounds must be positive, --mass-close not negative")
    return args


def _choose(
    parser: argparse.ArgumentParser, given: str, known: tuple[str, ...], what: str
) -> list[str]:
    names = [n.strip() for n in given.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        parser.error(f"unknown {what} {', '.join(unknown) or '(none)'}; known: {', '.join(known)}")
    return [n for n in known if n in names]  # the canonical order


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        report = json.loads(args.render.read_text())
        return write_report(report, [loadgen.Scenario(**s) for s in report["scenarios"]], args.out)
    began = time.monotonic()
    idle_conns = IDLE_QUICK if args.quick else IDLE_FULL
    scenarios = [
        dataclasses.replace(s, clients=idle_conns) if s.kind == "idle" else s
        for s in loadgen.SCENARIOS
        if s.name in args.scenarios
    ]
    # Servers and client processes inherit this limit: the idle scenario needs one descriptor
    # per connection on each side.
    loadgen.raise_nofile(max(idle_conns, args.mass_close) + 1024)
    before = str(args.before.resolve()) if args.before is not None else None
    specs = [
        s for s in with_before(SERVERS, before) if s.name.removesuffix("_before") in args.servers
    ]
    report: dict[str, Any] = {
        "before": before,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "duration": args.duration,
        "quick": args.quick,
        "machine": machine_info(),
        "servers": [s.name for s in specs],
        "scenarios": [dataclasses.asdict(s) for s in scenarios],
        "results": {},
        "startup": {},
        "bare_uvloop_loop": "not run",
    }
    with tempfile.TemporaryDirectory(prefix="echod-bench-") as tmp:
        workdir = Path(tmp)
        binaries, report["build"] = _build(workdir / "build")
        loadgen_c = binaries.get("loadgen") if args.client != "python" else None
        if args.client == "c" and loadgen_c is None:
            print(f"--client c: {report['build']['loadgen']}", file=sys.stderr)
            return 2
        plan = Plan(args.rounds, args.duration, loadgen_c, binaries)
        report["client"] = "bench/loadgen.c" if loadgen_c else "bench/loadgen.py"
        report["rounds"] = args.rounds
        for spec in specs:
            runs = 1 if args.quick else 5
            report["startup"][spec.name] = measure_startup(spec, workdir, runs, binaries)
        results: dict[str, dict[str, Any]] = {spec.name: {} for spec in specs}
        for scenario in scenarios:
            if scenario.kind == "idle":  # memory: one server at a time, the Python client
                for spec in specs:
                    results[spec.name].update(
                        bench_server(spec, [scenario], args.duration, workdir, binaries)
                    )
                continue
            for name, entry in bench_interleaved(specs, scenario, plan, workdir).items():
                results[name][scenario.name] = entry
        report["results"] = results
        loops = {e["loop"] for r in results.values() for e in r.values() if e.get("loop")}
        if loops:
            report["bare_uvloop_loop"] = ", ".join(sorted(loops))
        report["workers_n"] = bench_workers(args, scenarios, plan, workdir)
        chosen = [s for s in specs if s.name in massclose.SERVERS]
        if args.mass_close and chosen:
            report["mass_close"] = {
                spec.name: massclose.run(
                    Server(spec, workdir, f"close-{spec.name}", {}), args.mass_close, spec.is_echod
                )
                for spec in chosen
            }
    report["elapsed_s"] = round(time.monotonic() - began, 1)
    return write_report(report, scenarios, args.out)


def bench_workers(
    args: argparse.Namespace, scenarios: list[loadgen.Scenario], plan: Plan, workdir: Path
) -> dict[str, Any]:
    """The workers scenario (see WORKERS_SCENARIOS), or why it did not run."""
    cpus = os.cpu_count() or 1
    n = args.workers_n if args.workers_n is not None else cpus
    info: dict[str, Any] = {"cpus": cpus, "n": n, "results": {}}
    if args.workers_n is None and cpus < WORKERS_MIN_CPUS:
        info["skipped"] = (
            f"this machine has {cpus} CPUs: N workers against N bare servers is measured with "
            f"{WORKERS_MIN_CPUS} or more (with {cpus}, the load generator shares every CPU "
            "with the servers)"
        )
        return info
    chosen = [s for s in scenarios if s.name in WORKERS_SCENARIOS]
    if n <= 0 or not chosen:
        info["skipped"] = "not asked for (--workers-n 0, or none of its scenarios chosen)"
        return info
    specs = workers_specs(n)
    for scenario in chosen:
        for name, entry in bench_interleaved(specs, scenario, plan, workdir).items():
            info["results"].setdefault(name, {})[scenario.name] = entry
    return info


def _build(outdir: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Compile the C programs; return those built and, for each, "built" or why not."""
    binaries: dict[str, Path] = {}
    notes: dict[str, str] = {}
    for name in cbuild.SOURCES:
        built = cbuild.build(name, outdir)
        if built.path is not None:
            binaries[name] = built.path
        notes[name] = "built" if built.path is not None else built.reason
        if built.path is None:
            print(f"{name}: not built: {built.reason}", file=sys.stderr)
    return binaries, notes


def write_report(report: dict[str, Any], scenarios: list[loadgen.Scenario], out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    chart_problem = draw_chart(report, scenarios, out / "bench.png")
    markdown = render_markdown(report, scenarios)
    if NOTES.exists():  # the profile and the analysis, written by hand beside the numbers
        markdown += "\n" + NOTES.read_text()
    if chart_problem:
        markdown += f"\nChart not drawn: {chart_problem}\n"
        print(f"chart not drawn: {chart_problem}", file=sys.stderr)
    (out / "bench.md").write_text(markdown)
    (out / "bench.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out / 'bench.md'}, bench.png, bench.json in {report['elapsed_s']} s")
    # A tool baseline's failure (xinetd resetting connections under the idle ramp) is shown
    # in the report but is not echod's, unless a byte came back wrong.
    failed = [
        (server, scenario)
        for server, scenario, e in all_runs(report)
        if e["status"] == "failed" or (e["status"] == "ok" and not e["verified"])
        if server not in TOOL_BASELINES or e.get("mismatches")
        if not excused(server, e)
    ]
    # A baseline that needs a tool the machine lacks (xinetd, a C compiler) is reported n/a
    # with the reason; any other baseline must start.
    baseline_missing = [
        server
        for server, runs in report["results"].items()
        if not server.startswith("echod_")
        and server not in TOOL_BASELINES
        and any(e["status"] == "n/a" for e in runs.values())
    ]
    for server, scenario in failed:
        print(f"FAILED: {server} {scenario}", file=sys.stderr)
    for server in baseline_missing:
        print(f"FAILED: baseline {server} did not start", file=sys.stderr)
    return 1 if failed or baseline_missing else 0


if __name__ == "__main__":
    sys.exit(main())
