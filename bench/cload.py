"""Drive bench/loadgen.c: one client process per CPU, started together, results summed.

The same measurements as loadgen.run() (a loadgen.Result), for the pingpong and churn
scenarios, with a client that costs a fraction of the Python one's CPU: on a small machine the
client shares the CPUs with the server, and the Python client is the limit for fast servers.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import loadgen
import procstat

SETUP_TIMEOUT = 30.0  # seconds for every client to connect and say "ready"
DRAIN_TIMEOUT = 15.0  # seconds after the run for every client to report (its own drain: 5)


def run(
    binary: Path,
    scenario: loadgen.Scenario,
    port: int,
    *,
    duration: float,
    server_pid: int | None = None,
    procs: int | None = None,
) -> loadgen.Result:
    """Run one scenario (pingpong or churn) against 127.0.0.1:port and return what was measured."""
    if scenario.kind not in ("pingpong", "churn"):
        raise ValueError(f"the C client runs pingpong and churn, not {scenario.kind}")
    nprocs = max(1, min(scenario.clients, procs or os.cpu_count() or 1))
    shares = [n for n in loadgen._split(scenario.clients, nprocs) if n]
    result = loadgen.Result(
        scenario.name, scenario.kind, scenario.size, scenario.clients, len(shares)
    )
    clients: list[subprocess.Popen[str]] = []
    try:
        for i, share in enumerate(shares):
            argv = [str(binary), scenario.kind, str(scenario.size), str(share)]
            argv += [f"{duration:g}", str(port), str(i + 1)]
            clients.append(
                subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            )
        _wait_ready(clients)
        cpu0 = procstat.tree_cpu_seconds(server_pid) if server_pid else None
        busy0 = procstat.machine_busy_seconds()
        t0 = time.perf_counter()
        for client in clients:
            assert client.stdin is not None
            client.stdin.write("go\n")
            client.stdin.flush()
        reports = [_report(client, duration + DRAIN_TIMEOUT) for client in clients]
        wall = time.perf_counter() - t0
        busy = procstat.machine_busy_seconds() - busy0
        cpu1 = procstat.tree_cpu_seconds(server_pid) if server_pid else None
    finally:
        for client in clients:  # our own children, by pid
            if client.poll() is None:
                client.kill()
            client.wait()
    _aggregate(result, reports, wall)
    if cpu0 is not None and cpu1 is not None and wall:
        used = cpu1 - cpu0
        result.server_cpu_pct = 100.0 * used / wall
        if result.round_trips:
            result.server_cpu_us_per_rt = 1e6 * used / result.round_trips
        other = 100.0 * busy / wall - result.server_cpu_pct - result.client_cpu_pct
        result.other_cpu_pct = max(0.0, other)
    return result


def _wait_ready(clients: list[subprocess.Popen[str]]) -> None:
    deadline = time.monotonic() + SETUP_TIMEOUT
    for client in clients:
        assert client.stdout is not None
        # readline blocks, but each client either prints "ready" or exits after its connects,
        # which are bounded by the kernel's connect timeout; the deadline bounds the rest.
        line = client.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"C client did not start: {line or 'no output'}")
        if time.monotonic() > deadline:
            raise TimeoutError("C clients took too long to connect")


def _report(client: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    assert client.stdout is not None
    try:
        out, _ = client.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        client.kill()
        client.communicate()
        raise TimeoutError("a C client did not finish its run") from None
    last = out.strip().splitlines()[-1] if out.strip() else ""
    if not last.startswith("{"):
        raise RuntimeError(f"C client failed: {last or 'no output'}")
    report: dict[str, Any] = json.loads(last)
    return report


def _aggregate(result: loadgen.Result, reports: list[dict[str, Any]], wall: float) -> None:
    hist: dict[int, int] = {}
    cpu = 0.0
    elapsed_ns = 0
    for rep in reports:
        result.round_trips += int(rep["round_trips"])
        result.connections += int(rep["connections"])
        result.sent_bytes += int(rep["sent_bytes"])
        result.verified_bytes += int(rep["verified_bytes"])
        result.mismatches += int(rep["mismatches"])
        result.errors += int(rep["errors"])
        if rep["first_error"] and len(result.error_samples) < 5:
            result.error_samples.append(str(rep["first_error"]))
        for us, count in rep["hist"]:
            hist[us] = hist.get(us, 0) + count
        cpu += float(rep["cpu_s"])
        elapsed_ns = max(elapsed_ns, int(rep["elapsed_ns"]))
    loadgen.set_rates(result, elapsed_ns, cpu, wall)
    result.p50_us = _hist_percentile(hist, 0.50)
    result.p99_us = _hist_percentile(hist, 0.99)


def _hist_percentile(hist: dict[int, int], q: float) -> float | None:
    total = sum(hist.values())
    if not total:
        return None
    rank = min(total - 1, int(q * total))
    seen = 0
    for us in sorted(hist):
        seen += hist[us]
        if seen > rank:
            return float(us)
    return None
