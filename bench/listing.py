"""The cost of ``echod connections`` with many connections open.

Starts echod in each mode asked for (one worker, a control socket), opens N idle
connections (each echoes once, so that the worker has registered it), then runs
``echod connections --json`` several times and reports, per mode: the command's wall time
(median and worst), the CPU the supervisor and the worker spent answering (per listing), the
size of the answer, and that the listing has exactly N rows. Meanwhile one more client
echoes 8 bytes in a loop: its worst round trip says whether serving stalled while the worker
listed.

    python bench/listing.py [--connections 10000] [--modes thread,async,process] [--runs 5]

Every wait is bounded; N descriptors are needed here and in echod (RLIMIT_NOFILE is raised
for both, as far as the hard limit allows).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPEN_TIMEOUT = 180.0
READY_TIMEOUT = 30.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (and of its reaped children: none here)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.extend(int(p) for p in text)
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Probe(threading.Thread):
    """One client echoing 8 bytes again and again: the worst round trip while listing."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.worst = 0.0
        self.trips = 0

    def run(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            deadline = time.monotonic() + 3600
            while not self.stop.is_set() and time.monotonic() < deadline:
                began = time.perf_counter()
                sock.sendall(b"12345678")
                got = b""
                while len(got) < 8:
                    chunk = sock.recv(8 - len(got))
                    if not chunk:
                        return
                    got += chunk
                self.worst = max(self.worst, time.perf_counter() - began)
                self.trips += 1
                self.stop.wait(0.005)


def measure(mode: str, count: int, runs: int) -> dict[str, object]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="echod-listing-") as tmp:
        config = Path(tmp) / "echod.yaml"
        config.write_text(
            f"mode: {mode}\nhost: 127.0.0.1\nport: {port}\nworkers: 1\n"
            f"max_connections: {count + 100}\nbacklog: 4096\nidle_timeout: 0\n"
            f"control_socket: {tmp}/echod.sock\npidfile: {tmp}/echod.pid\n"
            f"log: {{target: file, file: {tmp}/echod.log, connections: off}}\n"
        )
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        server = subprocess.Popen(
            [sys.executable, "-m", "echod", "run", "--config", str(config)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        clients: list[socket.socket] = []
        try:
            deadline = time.monotonic() + READY_TIMEOUT
            while not (Path(tmp) / "echod.sock").exists():
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit(f"{mode}: echod did not start")
                time.sleep(0.05)
            deadline = time.monotonic() + OPEN_TIMEOUT
            for _ in range(count):
                if time.monotonic() > deadline:
                    raise SystemExit(f"{mode}: opened only {len(clients)} in {OPEN_TIMEOUT:g} s")
                sock = socket.create_connection(("127.0.0.1", port), timeout=30)
                sock.sendall(b"x")
                if sock.recv(1) != b"x":
                    raise SystemExit(f"{mode}: no echo")
                clients.append(sock)
            worker = children(server.pid)[0]
            probe = Probe(port)
            probe.start()
            walls, cpus, sizes, rows = [], [], [], []
            command = [sys.executable, "-m", "echod", "connections", "--json", "--config"]
            for _ in range(runs):
                before = cpu_seconds(server.pid) + cpu_seconds(worker)
                began = time.perf_counter()
                done = subprocess.run(
                    [*command, str(config)], env=env, capture_output=True, timeout=120,
                    check=True,
                )  # fmt: skip
                walls.append(time.perf_counter() - began)
                cpus.append(cpu_seconds(server.pid) + cpu_seconds(worker) - before)
                sizes.append(len(done.stdout))
                listing = json.loads(done.stdout)
                rows.append(len(listing["connections"] if isinstance(listing, dict) else listing))
            probe.stop.set()
            probe.join(10)
            return {
                "mode": mode,
                "open": count,
                "rows": rows,
                "wall_median_s": round(statistics.median(walls), 3),
                "wall_worst_s": round(max(walls), 3),
                "daemon_cpu_median_s": round(statistics.median(cpus), 3),
                "answer_bytes": statistics.median(sizes),
                "probe_worst_ms": round(probe.worst * 1000, 1),
                "probe_trips": probe.trips,
            }
        finally:
            for sock in clients:
                sock.close()
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--modes", default="thread,async,process")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.connections + 1000  # (each side holds one end of every connection)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    for mode in args.modes.split(","):
        print(json.dumps(measure(mode, args.connections, args.runs)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
