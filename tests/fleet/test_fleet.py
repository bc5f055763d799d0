"""echod on several hosts behind a real HAProxy, watched by a real Prometheus (issue 8)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.fleet import exporter
from tests.fleet.conftest import HOSTS, Started
from tests.fleet.load import Clients
from tests.fleet.netns import PREFIX, Network, clean_stale, ip, namespaces, run_in
from tests.fleet.services import (
    FRONT_PORT,
    METRICS_PORT,
    HAProxy,
    Process,
    Prometheus,
    start_hosts,
)
from tests.support import DEADLINE, wait_text


def fetch_metrics(network: Network, n: int) -> bytes:
    """GET /metrics of host ``n``, from the balancer's namespace."""
    import urllib.request

    url = f"http://{network.host_address(n)}:{METRICS_PORT}/metrics"

    def get() -> bytes:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return bytes(answer.read())

    return run_in(network.lb, get)


def promtool_check(text: bytes) -> None:
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, timeout=DEADLINE,
        check=False,
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def test_stale_namespaces_of_a_crashed_run_are_removed(network: Network) -> None:
    """A namespace named after a test process that is gone is removed before a new run."""
    probe = subprocess.Popen(["true"])
    probe.wait()  # reaped: its pid names no process now
    stale = f"{PREFIX}{probe.pid}-lb"
    ip("netns", "add", stale)
    try:
        assert stale in clean_stale()
        assert stale not in namespaces()
        assert set(network.created) <= set(namespaces())  # a live run's are left alone
    finally:
        if stale in namespaces():
            ip("netns", "del", stale)


def test_fleet_harness_smoke(network: Network, started: Started, tmp_path: Path) -> None:
    """Hosts serve echo in their namespaces, HAProxy balances plain TCP across all of them,
    and Prometheus scrapes the metrics endpoint in every host."""
    hosts = start_hosts(network, tmp_path, mode="thread", shutdown_timeout=5)
    for host in hosts:
        started.add(host)
    stand_ins = []
    for n in range(1, HOSTS + 1):
        address = f"{network.host_address(n)}:{METRICS_PORT}"
        proc = Process(network.host(n), [sys.executable, "-m", "tests.fleet.exporter", address],
                       tmp_path / f"exporter-h{n}.log")
        stand_ins.append(started.add(proc.start()))
    for proc in stand_ins:
        assert isinstance(proc, Process)
        wait_text(proc.out, lambda text: "ready" in text, what=f"{proc.argv[-1]} ready")
    haproxy = HAProxy(network, tmp_path, send_proxy=False, http_check=False)
    started.add(haproxy.start())
    haproxy.wait_states({f"h{n}": "UP" for n in range(1, HOSTS + 1)})
    prometheus = Prometheus(network, tmp_path)
    started.add(prometheus.start())

    size = 64 * 1024
    clients = Clients(network.client, network.lb_front, FRONT_PORT, count=10, per_client=3,
                      size=size, pause=0.0)
    tally = clients.start().wait()
    assert not tally.failures(), tally.failures()[:5]
    assert len(tally.done()) == 30
    served = []
    for n, host in enumerate(hosts, start=1):
        full = [e for e in host.events("conn_close") if e["bytes_in"] == size]
        assert full, f"host {n} served no client"
        assert {e["peer"] for e in full} == {network.lb_address(n)}  # the balancer, no PROXY
        assert all(e["bytes_out"] == size for e in full)
        served += full
    assert len(served) == 30

    prometheus.wait_up(HOSTS)
    result = prometheus.query("sum(echod_connections_opened_total)")
    assert float(result[0]["value"][1]) == HOSTS * exporter.OPENED
    per_host = prometheus.query("echod_received_bytes_total")
    assert sorted(r["metric"]["instance"] for r in per_host) == sorted(
        f"{network.host_address(n)}:{METRICS_PORT}" for n in range(1, HOSTS + 1)
    )
    assert {float(r["value"][1]) for r in per_host} == {exporter.OPENED * exporter.BYTES}
    promtool_check(fetch_metrics(network, 1))
