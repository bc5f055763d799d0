#!/usr/bin/env python3
"""What the access lists and the PROXY protocol cost: lookups, header parsing, and churn.

(a) AccessList.permits with 10, 1,000 and 5,000 entries (IPv4 and IPv6; a miss, the usual case
    for deny, and a hit), (b) echod.proxy.parse per header (v1 TCP4/TCP6, v2 TCP4/TCP6, v2
    with TLVs), in ns per operation: the best of several timeit repeats; (c) connection churn
    against real echod processes, one per configuration, all started up front and measured in
    interleaved rounds (the order shuffled each round) so that the machine's noise falls on
    every configuration alike; each sample is connections/s over ``--duration`` seconds, and
    the table shows the median and the ratio to the plain configuration.

Churn: client threads in a few client processes each connect, send 64 bytes (after a PROXY v2
or v1 header when the server expects one), read the 64 bytes back, verify them, and close.
Servers listen on 127.0.0.1 with one worker and log every connection, as bench/run.py's do.

    python bench/acl_proxy.py [--modes thread,async,process] [--rounds 5] [--duration 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import procstat  # noqa: E402  (bench/procstat.py: CPU time of a process tree)

from echod.acl import AccessList  # noqa: E402
from echod.proxy import parse, v1_header, v2_header  # noqa: E402

HOST = "127.0.0.1"
PAYLOAD = bytes(range(64))
READY_TIMEOUT = 20.0
CLIENT_NET = "198.51.100"  # the clients a PROXY header names (documentation range)


# -- (a) and (b): micro-benchmarks -------------------------------------------------------------


def ns_per_op(func: Callable[[], object], number: int = 20000, repeat: int = 7) -> float:
    """The best of ``repeat`` runs of ``number`` calls, in ns per call: on a shared machine
    noise only ever adds time, so the minimum is the estimate timeit's own docs advise."""
    runs = timeit.repeat(func, number=number, repeat=repeat)
    return min(runs) / number * 1e9


def acl_entries(count: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """``count`` entries, half allow and half deny, of mixed prefix lengths and families,
    none of which covers 127.0.0.0/8 or the benchmark's clients except the first allow."""
    allow = [f"{CLIENT_NET}.0/24", "127.0.0.0/8"]
    deny: list[str] = []
    while len(allow) + len(deny) < count:
        target = allow if len(allow) <= len(deny) else deny
        if rng.random() < 0.8:
            first = rng.choice([10, 100, 172, 185, 203])
            prefix = rng.choice([16, 20, 24, 28, 32])
            target.append(f"{first}.{rng.randrange(256)}.{rng.randrange(256)}.0/{prefix}")
        else:
            target.append(f"2001:db8:{rng.randrange(65536):x}::/{rng.choice([48, 56, 64])}")
    return allow, deny


def micro() -> list[tuple[str, float]]:
    rng = random.Random(8)
    rows: list[tuple[str, float]] = []
    for count in (10, 1000, 5000):
        allow, deny = acl_entries(count, rng)
        acl = AccessList(allow, deny)
        # Both lists are looked up for an allowed address: a deny miss, then an allow hit.
        rows.append(
            (
                f"ACL {count:>5} entries, IPv4 allowed",
                ns_per_op(lambda acl=acl: acl.permits("198.51.100.7")),
            )
        )
        rows.append(
            (
                f"ACL {count:>5} entries, IPv4 denied",
                ns_per_op(lambda acl=acl: acl.permits("8.8.8.8")),
            )
        )
        rows.append(
            (
                f"ACL {count:>5} entries, IPv6",
                ns_per_op(lambda acl=acl: acl.permits("2001:db8:1::5")),
            )
        )
        rows.append(
            (
                f"ACL {count:>5} entries, ::ffff:IPv4",
                ns_per_op(lambda acl=acl: acl.permits("::ffff:127.0.0.1")),
            )
        )
    src4, dst4 = ("203.0.113.7", 51234), ("192.0.2.1", 9999)
    src6, dst6 = ("2001:db8::7", 40000), ("2001:db8:1::1", 7)
    headers = {
        "PROXY v1 TCP4": v1_header(src4, dst4),
        "PROXY v1 TCP6": v1_header(src6, dst6),
        "PROXY v1 UNKNOWN": v1_header(None, None),
        "PROXY v2 TCP4": v2_header(src4, dst4),
        "PROXY v2 TCP6": v2_header(src6, dst6),
        "PROXY v2 TCP4 + 3 TLVs": v2_header(
            src4, dst4, ((1, b"h2"), (2, b"example.com"), (5, b"x" * 32))
        ),
        "PROXY v2 TCP4 + CRC32C": v2_header(src4, dst4, checksum=True),
        "PROXY v2 LOCAL": v2_header(None, None),
    }
    for name, data in headers.items():
        rows.append((name, ns_per_op(lambda data=data: parse(data))))
    return rows


# -- (c): connection churn against real echod processes -----------------------------------------


class Server:
    """One ``python -m echod run`` of this benchmark. Construction starts nothing."""

    def __init__(self, name: str, workdir: Path, settings: dict[str, Any]) -> None:
        self.name = name
        self.settings = settings
        self.log = workdir / f"{name}.log"
        self.config = workdir / f"{name}.yaml"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> None:
        lines = [
            f"host: {HOST}",
            "port: 0",
            "workers: 1",
            "max_connections: 20000",
            "pidfile: null",
        ]
        # JSON is valid YAML: no YAML writer needed.
        lines += [f"{key}: {json.dumps(value)}" for key, value in self.settings.items()]
        lines += ["log:", f"  file: {json.dumps(str(self.log))}", "  format: json"]
        self.config.write_text("\n".join(lines) + "\n")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "echod", "run", "--config", str(self.config)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def wait_ready(self) -> None:
        """Block until the ready event gives the port (bounded by READY_TIMEOUT)."""
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
            try:
                for line in self.log.read_text().splitlines():
                    if '"event":"ready"' in line.replace(" ", ""):
                        self.port = int(json.loads(line)["port"])
                        return
            except FileNotFoundError:
                pass
            try:
                self.proc.wait(0.05)  # returns at once if it crashed
            except subprocess.TimeoutExpired:
                pass
        raise RuntimeError(f"{self.name} not ready within {READY_TIMEOUT} s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own group: what this script started
            self.proc.wait(15)


def _churn_thread(port: int, header: str, until: float, counts: list[int], index: int) -> None:
    headers: list[bytes] = [b""]
    if header != "none":
        build = v2_header if header == "v2" else v1_header
        target = (HOST, port)
        headers = [build((f"{CLIENT_NET}.{n}", 10000 + n), target) for n in range(1, 255)]
    done = 0
    errors = 0
    while time.monotonic() < until and errors < 100:
        try:
            with socket.create_connection((HOST, port), timeout=5) as sock:
                sock.sendall(headers[done % len(headers)] + PAYLOAD)
                got = b""
                while len(got) < len(PAYLOAD):
                    chunk = sock.recv(256)
                    if not chunk:
                        break
                    got += chunk
                if got != PAYLOAD:
                    raise RuntimeError(f"bad echo: {got!r}")
            done += 1
        except OSError:
            errors += 1
    counts[index] = done if errors < 100 else -1


def _churn_process(port: int, header: str, threads: int, start: float, until: float) -> int:
    time.sleep(max(0.0, start - time.time()))  # (start together with the other processes)
    mono_until = time.monotonic() + (until - start)
    counts = [0] * threads
    pool = [
        threading.Thread(target=_churn_thread, args=(port, header, mono_until, counts, i))
        for i in range(threads)
    ]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    if min(counts) < 0:
        raise RuntimeError("too many connection errors")
    return sum(counts)


def churn(port: int, header: str, duration: float, processes: int, threads: int) -> int:
    """Connections completed in ``duration`` seconds."""
    start = time.time() + 0.2
    with mp.get_context("fork").Pool(processes) as pool:
        results = [
            pool.apply_async(_churn_process, (port, header, threads, start, start + duration))
            for _ in range(processes)
        ]
        return sum(r.get(timeout=duration + 30) for r in results)


CONFIGS: dict[str, tuple[dict[str, Any], str]] = {
    # name: (settings, header the clients send)
    "plain": ({}, "none"),
    "acl5000": ({"allow": "ACL_ALLOW", "deny": "ACL_DENY"}, "none"),
    "proxy_v2": ({"proxy_protocol": "v2", "proxy_trusted": [HOST]}, "v2"),
    "proxy_v2+acl5000": (
        {"proxy_protocol": "v2", "proxy_trusted": [HOST], "allow": "ACL_ALLOW", "deny": "ACL_DENY"},
        "v2",
    ),
    "proxy_v1+acl5000": (
        {"proxy_protocol": "v1", "proxy_trusted": [HOST], "allow": "ACL_ALLOW", "deny": "ACL_DENY"},
        "v1",
    ),
}


Samples = dict[str, list[tuple[float, float]]]  # config -> [(connections/s, CPU us/conn)]


def churn_table(
    modes: list[str], rounds: int, duration: float, processes: int, threads: int
) -> dict[str, Samples]:
    allow, deny = acl_entries(5000, random.Random(5000))
    lists = {"ACL_ALLOW": allow, "ACL_DENY": deny}
    results: dict[str, Samples] = {}
    rng = random.Random(1)
    with tempfile.TemporaryDirectory(prefix="echod-bench-") as tmp:
        for mode in modes:
            servers = {}
            for name, (settings, _header) in CONFIGS.items():
                values: dict[str, Any] = {"mode": mode}
                for key, value in settings.items():
                    values[key] = lists.get(value, value) if isinstance(value, str) else value
                servers[name] = Server(f"{mode}-{name}", Path(tmp), values)
            try:
                for server in servers.values():
                    server.start()
                for server in servers.values():
                    server.wait_ready()
                results[mode] = _rounds(
                    mode,
                    servers,
                    rounds=rounds,
                    duration=duration,
                    processes=processes,
                    threads=threads,
                    rng=rng,
                )
            finally:
                for server in servers.values():
                    server.stop()
    return results


def _rounds(
    mode: str,
    servers: dict[str, Server],
    *,
    rounds: int,
    duration: float,
    processes: int,
    threads: int,
    rng: random.Random,
) -> Samples:
    samples: Samples = {name: [] for name in servers}
    for name, server in servers.items():  # warm-up, not counted
        churn(server.port, CONFIGS[name][1], 0.3, processes, threads)
    for round_no in range(rounds):
        order = list(servers)
        rng.shuffle(order)  # no configuration always runs first, or last
        for name in order:
            server = servers[name]
            assert server.proc is not None
            # The server's CPU per connection varies less with the machine's load than the
            # rate: read between samples, while no load runs (procstat's rule).
            cpu = procstat.tree_cpu_seconds(server.proc.pid)
            done = churn(server.port, CONFIGS[name][1], duration, processes, threads)
            cpu = procstat.tree_cpu_seconds(server.proc.pid) - cpu
            samples[name].append((done / duration, cpu / max(done, 1) * 1e6))
        line = ", ".join(f"{n} {samples[n][-1][0]:.0f}/s" for n in servers)
        print(f"  {mode} round {round_no + 1}/{rounds}: {line}", file=sys.stderr)
    return samples


def paired_cost(ratios: list[float], lower_is_better: bool) -> str:
    """The cost as a signed percentage: fewer connections/s, or more CPU, is a cost."""
    ratio = statistics.median(ratios)
    cost = ratio - 1 if lower_is_better else 1 - ratio
    return f"{cost:+.1%}"


def print_churn(results: dict[str, Samples], args: argparse.Namespace) -> None:
    print(
        f"\nchurn: medians of {args.rounds} interleaved samples of {args.duration:g} s"
        f" ({args.processes} client processes x {args.threads} threads); in brackets the cost"
        " against plain: the median over rounds of the ratio within each round\n"
    )
    names = list(CONFIGS)
    for column, title in ((0, "connections/s"), (1, "server CPU us/connection")):
        print(f"| {title} | " + " | ".join(names) + " |")
        print("|---|" + "---:|" * len(names))
        for mode, samples in results.items():
            cells = []
            for name in names:
                values = [sample[column] for sample in samples[name]]
                base = [sample[column] for sample in samples["plain"]]
                paired = [v / b for v, b in zip(values, base, strict=True)]
                cost = "" if name == "plain" else f" ({paired_cost(paired, column == 1)})"
                cells.append(f"{statistics.median(values):,.0f}{cost}")
            print(f"| {mode} | " + " | ".join(cells) + " |")
        print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default="thread,async,process")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per churn sample")
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--threads", type=int, default=5, help="client threads per process")
    parser.add_argument("--no-churn", action="store_true", help="only (a) and (b)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)

    rows = micro()
    print("| operation | ns/op |\n|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value:,.0f} |")
    report: dict[str, Any] = {"micro": dict(rows)}
    if not args.no_churn:
        modes = [m for m in args.modes.split(",") if m]
        results = churn_table(modes, args.rounds, args.duration, args.processes, args.threads)
        report["churn"] = results
        print_churn(results, args)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
