#!/usr/bin/env python3
"""Count a server's system calls per round trip (or connection) under the C load generator.

    python bench/profile.py --servers classic_thread,echod_thread --scenario 1KiB-c100

For each server: start it, connect the clients, attach ``perf stat`` to every thread of the
server's process tree (``perf stat -p`` counts threads and processes created later too) with
the syscall tracepoints (futex, recvfrom, sendto, clone3, write, shutdown, setsockopt), the
context switches and the page faults (the copy-on-write cost of a fork), run one slice, and
divide by the round trips (churn: connections). Counting events, unlike timing them, hardly
depends on what else the machine runs. Without perf this says so; a row without counts means
perf could not attach (a connection process of the tree exited as it did): run it again.
``strace -f -c`` gives the same calls but slows the server some thirty-fold, which changes
how its threads contend.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cbuild
import cload
import loadgen
import procstat
import run

EVENTS = ("futex", "recvfrom", "sendto", "clone3", "write", "shutdown", "setsockopt")
PERF_TIMEOUT = 30.0


def count(
    server: run.Server, scenario: loadgen.Scenario, binary: Path, seconds: float
) -> dict[str, Any]:
    """Syscalls of the server's tree per operation over one slice of load."""
    share = loadgen._split(scenario.clients, min(scenario.clients, os.cpu_count() or 1))
    clients = [
        subprocess.Popen(
            [
                str(binary),
                scenario.kind,
                str(scenario.size),
                str(n),
                f"{seconds:g}",
                str(server.port),
                str(i + 1),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i, n in enumerate(share)
        if n
    ]
    perf: subprocess.Popen[str] | None = None
    try:
        for client in clients:
            assert client.stdout is not None
            if client.stdout.readline().strip() != "ready":
                raise RuntimeError("C client did not start")
        pids = ",".join(str(p) for p in procstat.tree_pids(server.pid))
        argv = ["perf", "stat", "-x", ",", "-p", pids, "-e", "context-switches,page-faults"]
        for name in EVENTS:
            argv += ["-e", f"syscalls:sys_enter_{name}"]
        perf = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        time.sleep(0.2)  # perf attaches asynchronously; there is no readiness signal
        for client in clients:
            assert client.stdin is not None
            client.stdin.write("go\n")
            client.stdin.flush()
        reports = [cload._report(client, seconds + cload.DRAIN_TIMEOUT) for client in clients]
        perf.send_signal(signal.SIGINT)  # perf prints its counts on SIGINT
        _, err = perf.communicate(timeout=PERF_TIMEOUT)
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
            client.wait()
        if perf is not None and perf.poll() is None:
            perf.kill()
            perf.wait()
    ops = sum(int(r["round_trips"]) for r in reports)
    counts: dict[str, Any] = {"operations": ops}
    for line in err.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and re.match(r"^\d+$", fields[0]):
            name = fields[2].removeprefix("syscalls:sys_enter_")
            counts[name] = round(int(fields[0]) / ops, 2) if ops else None
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="classic_thread,echod_thread")
    parser.add_argument("--scenario", default="1KiB-c100", choices=loadgen.SCENARIO_NAMES)
    parser.add_argument("--duration", type=float, default=2.0)
    args = parser.parse_args(argv)
    if shutil.which("perf") is None:
        print("perf is not installed (apt-get install linux-perf)", file=sys.stderr)
        return 2
    scenario = next(s for s in loadgen.SCENARIOS if s.name == args.scenario)
    if scenario.kind == "idle":
        parser.error("idle has no round trips to count")
    with tempfile.TemporaryDirectory(prefix="echod-profile-") as tmp:
        workdir = Path(tmp)
        built = cbuild.build("loadgen", workdir)
        echo = cbuild.build("epoll_echo", workdir)
        if built.path is None:
            print(built.reason, file=sys.stderr)
            return 2
        binaries = {"loadgen": built.path} | ({"epoll_echo": echo.path} if echo.path else {})
        for name in args.servers.split(","):
            spec = next(s for s in run.SERVERS if s.name == name)
            server = run.Server(spec, workdir, f"profile-{name}", {}, binaries)
            try:
                server.start()
                server.wait_listening()
                counts = count(server, scenario, built.path, args.duration)
            finally:
                server.stop()
            cells = ", ".join(f"{k} {v}" for k, v in counts.items() if k != "operations")
            print(f"{name:20} {scenario.name}: per operation: {cells}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
