"""echod on several hosts behind a real HAProxy, watched by a real Prometheus (issue 8)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

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
    latest,
    lifetime_totals,
    raw_samples,
    start_hosts,
)
from tests.support import DEADLINE, ROOT, settled, wait_for, wait_text


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
    # A client is done once its whole echo is back; its host logs the close only when HAProxy
    # passes the client's close on, a moment later.
    wait_for(
        lambda: sum(e["bytes_in"] == size for h in hosts for e in h.events("conn_close")) >= 30,
        what="the 30 connections' closes logged",
    )
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


def test_lifetime_totals_add_up_across_restarts() -> None:
    """Counters of three lifetimes of one host, and of a second host, sum exactly: the last
    scraped value of each lifetime, whatever the values do at the restarts."""
    starts = {
        ("h1", ()): [(1.0, 100.0), (2.0, 100.0), (3.0, 200.0), (4.0, 200.0), (5.0, 300.0)],
        ("h2", ()): [(1.0, 50.0), (2.0, 50.0)],
    }
    series = {
        # The second lifetime's first scrape (12) is above the first's last (10): no visible
        # reset, told apart by the start time alone.
        ("h1", ()): [(1.0, 4.0), (2.0, 10.0), (3.0, 12.0), (4.0, 15.0), (5.0, 1.0)],
        ("h2", ()): [(1.0, 5.0), (2.0, 7.0), (9.0, 99.0)],  # 9.0: no start time, not counted
    }
    assert lifetime_totals(series, starts) == 10 + 15 + 1 + 7


#: Long enough for HAProxy's checks to take a host out and a Prometheus scrape to follow,
#: with three hosts, HAProxy, Prometheus and 100 clients on a 2-CPU machine.
DRAIN_DELAY = 8.0
HEARTBEAT = 1.0  # echod.worker.HEARTBEAT_MAX: the counts reach the supervisor this late
SIZE = 256 * 1024


def instance(network: Network, n: int) -> str:
    return f"{network.host_address(n)}:{METRICS_PORT}"


def wait_final_counts(prometheus: Prometheus, network: Network, n: int, down_at: float) -> None:
    """Until Prometheus holds host ``n``'s final counts: a scrape taken after HAProxy took the
    host out (no new connection since) and after a heartbeat more, that shows no connection
    open and as many closed as opened."""
    where = f'{{instance="{instance(network, n)}"}}'

    def final() -> bool:
        opened = latest(prometheus, f"echod_connections_opened_total{where}")
        closed = latest(prometheus, f"echod_connections_closed_total{where}")
        still_open = latest(prometheus, f"echod_connections_open{where}")
        if opened is None or closed is None or still_open is None:
            return False
        late_enough = opened[0] > down_at + HEARTBEAT + 0.5
        return late_enough and still_open[1] == 0 and opened[1] == closed[1]

    wait_for(final, DRAIN_DELAY, what=f"host {n}'s final counts in prometheus")


def prometheus_totals(prometheus: Prometheus) -> dict[str, float]:
    starts = raw_samples(prometheus, "echod_start_time_seconds")
    names = {
        "opened": "echod_connections_opened_total",
        "closed": 'echod_connections_closed_total{reason="client_closed"}',
        "received": "echod_received_bytes_total",
        "sent": "echod_sent_bytes_total",
    }
    return {k: lifetime_totals(raw_samples(prometheus, v), starts) for k, v in names.items()}


def test_rolling_restart_behind_haproxy(
    network: Network, started: Started, tmp_path: Path
) -> None:
    """100 clients stream through HAProxy (send-proxy-v2, /healthz checks) while each host in
    turn is restarted with a drain: no client sees a refused, reset or altered connection,
    the hosts log the clients' own address, and Prometheus's totals are the clients'."""
    hosts = start_hosts(
        network,
        tmp_path,
        per_host=lambda n: {
            "proxy_trusted": [network.lb_address(n)],
            "metrics": instance(network, n),
        },
        mode="thread",
        proxy_protocol="v2",
        drain_delay=DRAIN_DELAY,
        shutdown_timeout=10,
    )
    for host in hosts:
        started.add(host)
    haproxy = HAProxy(network, tmp_path, send_proxy=True, http_check=True)
    started.add(haproxy.start())
    everyone_up = {f"h{n}": "UP" for n in range(1, HOSTS + 1)}
    haproxy.wait_states(everyone_up)
    prometheus = Prometheus(network, tmp_path)
    started.add(prometheus.start())
    prometheus.wait_up(HOSTS)

    clients = Clients(network.client, network.lb_front, FRONT_PORT, count=100, size=SIZE,
                      per_client=200, pause=1.0, deadline=20.0).start()
    try:
        for n, host in enumerate(hosts, start=1):
            wait_for(lambda host=host: host.events("conn_close"), what=f"host {n} serving")
            host.signal(signal.SIGTERM)
            haproxy.wait_states({f"h{n}": "DOWN"}, timeout=DRAIN_DELAY)
            wait_final_counts(prometheus, network, n, down_at=time.time())
            assert host.proc is not None and host.proc.poll() is None, "drained too early"
            assert host.proc.wait(DRAIN_DELAY + 10 + 8) == 0
            host.start()
            haproxy.wait_states(everyone_up)
    finally:
        tally = clients.stop()
    assert not tally.failures(), [(c.local_port, c.failure) for c in tally.failures()[:10]]
    done = tally.done()
    assert len(done) > 300

    opens = [e for host in hosts for e in host.events("conn_open")]
    assert len(opens) == len(done)
    for n, host in enumerate(hosts, start=1):
        events = host.events("conn_open")
        assert events, f"host {n} served no client"
        assert {e["peer"] for e in events} == {network.client_address}
        assert {e["proxy_peer"] for e in events} == {network.lb_address(n)}
    assert Counter(e["peer_port"] for e in opens) == Counter(c.local_port for c in done)

    wanted = {
        "opened": len(done),
        "closed": len(done),
        "received": sum(c.sent for c in done),
        "sent": sum(c.received for c in done),
    }
    wait_for(lambda: prometheus_totals(prometheus) == wanted, timeout=10,
             what=f"prometheus totals {wanted}")
    for n in range(1, HOSTS + 1):
        promtool_check(fetch_metrics(network, n))


def readme_block(after: str, language: str = "") -> str:
    """The first fenced block (in ``language``) after the text ``after`` in the README."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    fence = f"```{language}\n"
    begin = text.index(fence, text.index(after)) + len(fence)
    return text[begin : text.index("```", begin)]


def test_readme_haproxy_configuration_is_valid(tmp_path: Path) -> None:
    """HAProxy accepts the README's configuration without a warning."""
    config = tmp_path / "haproxy.cfg"
    config.write_text(readme_block("\n### HAProxy\n"))
    result = subprocess.run(["haproxy", "-c", "-f", str(config)], capture_output=True,
                            text=True, timeout=DEADLINE, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stdout + result.stderr, result.stdout + result.stderr


def test_readme_prometheus_configuration_is_valid(tmp_path: Path) -> None:
    """promtool accepts the README's scrape configuration."""
    config = tmp_path / "prometheus.yml"
    config.write_text(readme_block("A Prometheus scrape configuration", "yaml"))
    result = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True,
                            text=True, timeout=DEADLINE, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_kubernetes_manifests_hold_together() -> None:
    """The README's manifests are YAML, their echod.yaml is a valid configuration, and the
    grace period covers drain_delay, shutdown_timeout and echod's own grace."""
    import yaml

    from echod.config import parse_config
    from echod.supervisor import STOP_GRACE

    documents = list(yaml.safe_load_all(readme_block("\n### Kubernetes\n", "yaml")))
    kinds = {doc["kind"]: doc for doc in documents}
    assert set(kinds) == {"ConfigMap", "Deployment", "Service"}
    cfg = parse_config(kinds["ConfigMap"]["data"]["echod.yaml"], "README ConfigMap")
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= cfg.drain_delay + cfg.shutdown_timeout + STOP_GRACE
    [container] = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert cfg.metrics is not None and cfg.metrics.endswith(":9107")


def test_an_operator_drain_takes_a_host_out_of_haproxy_without_stopping_it(
    network: Network, started: Started, tmp_path: Path
) -> None:
    """`echod drain` on one host: HAProxy's /healthz check marks it DOWN while it still
    serves the clients it has and stays up; `echod resume` brings it back UP. No client
    of the balancer fails meanwhile."""
    hosts = start_hosts(
        network,
        tmp_path,
        per_host=lambda n: {
            "metrics": instance(network, n),
            "pidfile": str(tmp_path / f"h{n}" / "echod.pid"),
        },
        mode="thread",
        shutdown_timeout=10,
    )
    for host in hosts:
        started.add(host)
    haproxy = HAProxy(network, tmp_path, send_proxy=False, http_check=True)
    started.add(haproxy.start())
    everyone_up = {f"h{n}": "UP" for n in range(1, HOSTS + 1)}
    haproxy.wait_states(everyone_up)
    clients = Clients(network.client, network.lb_front, FRONT_PORT, count=20, size=64 * 1024,
                      per_client=100, pause=0.2, deadline=20.0).start()  # fmt: skip
    try:
        drained = hosts[1]
        wait_for(lambda: drained.events("conn_close"), what="host 2 serving")
        done = run_echod_in(drained, "drain")
        assert done.returncode == 0, done
        haproxy.wait_states({"h2": "DOWN"})
        assert drained.proc is not None and drained.proc.poll() is None  # still running
        # Connections HAProxy sent before it marked the host down are logged a moment later.
        down_at = settled(lambda: len(drained.events("conn_open")))
        time.sleep(1.0)  # the clients' own traffic goes on meanwhile: not a synchronisation
        assert len(drained.events("conn_open")) <= down_at + 2  # (checks in flight)
        done = run_echod_in(drained, "resume")
        assert done.returncode == 0, done
        haproxy.wait_states(everyone_up)
        wait_for(lambda: len(drained.events("conn_open")) > down_at + 2,
                 what="host 2 serving again")  # fmt: skip
    finally:
        tally = clients.stop()
    assert not tally.failures(), [(c.local_port, c.failure) for c in tally.failures()[:10]]
    assert [e["event"] for e in drained.events() if e["event"] in ("drain", "resume")] == [
        "drain",
        "resume",
    ]


def run_echod_in(host: Any, command: str) -> subprocess.CompletedProcess[str]:
    """``echod COMMAND`` against ``host``'s configuration (its control socket is a file:
    reached from here, whatever the host's network)."""
    return subprocess.run(
        [sys.executable, "-m", "echod", command, "--config", str(host.config_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=DEADLINE, check=False,
    )  # fmt: skip
