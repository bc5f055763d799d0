"""The fleet's processes: echod in each host namespace, HAProxy and Prometheus in the
balancer's. Each is started by the test with a private configuration in its tmp directory,
in a session of its own, and killed by its process group at teardown."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.fleet.netns import Network, run_in
from tests.support import DEADLINE, ROOT, Echod, wait_for

ECHO_PORT = 7000
METRICS_PORT = 9107
FRONT_PORT = 7000
PROMETHEUS_PORT = 9090


def program(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}")
                                  else None)
    if path is None:
        raise AssertionError(f"{name} is missing: apt-get install it (.ci/run does)")
    return path


class Process:
    """A program started in a namespace (``ip netns exec`` execs it: same pid), output to a
    file; stopped by its process group."""

    def __init__(self, namespace: str, argv: list[str], out: Path) -> None:
        self.namespace = namespace
        self.argv = argv
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        with open(self.out, "ab") as out:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.namespace, *self.argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                cwd=ROOT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        try:
            return self.out.read_text(errors="replace")[-3000:]
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


class Host(Echod):
    """echod in host namespace ``n``, listening on the host's own address."""

    def __init__(self, network: Network, n: int, tmp: Path, **settings: Any) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.network = network
        self.n = n
        self.address = network.host_address(n)
        self.lifetimes = 0
        super().__init__(tmp, host=self.address, port=ECHO_PORT, **settings)

    def start(
        self,
        wait: bool = True,
        env: dict[str, str] | None = None,
        preexec_fn: Any = None,
    ) -> Host:
        self.write_config()
        scrub = ("ECHOD_CONFIG", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "JOURNAL_STREAM")
        full_env = {k: v for k, v in os.environ.items() if k not in scrub}
        self.lifetimes += 1
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.network.host(self.n), sys.executable, "-m",
                 "echod", "run", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                cwd=ROOT,
                env=full_env,
                start_new_session=True,
            )
        if wait:
            self.port = self.wait_event("ready", count=self.lifetimes)["port"]
        return self


def start_hosts(
    network: Network,
    tmp: Path,
    per_host: Callable[[int], dict[str, Any]] = lambda n: {},
    **settings: Any,
) -> list[Host]:
    """echod in every host namespace, each ready, with ``settings`` and ``per_host(n)``."""
    hosts = [
        Host(network, n, tmp / f"h{n}", **settings, **per_host(n))
        for n in range(1, network.hosts + 1)
    ]
    for host in hosts:
        host.start(wait=False)
    for host in hosts:
        host.port = host.wait_event("ready")["port"]
    return hosts


# -- HAProxy ------------------------------------------------------------------------------------

#: tcplog's fields, plus the balancer's own address toward the server (``%bp`` is the
#: ``proxy_peer_port`` in the hosts' logs), the bytes each way (U from the client, B to it)
#: and what either side's connection saw go wrong: a connection in this log lines up with a
#: host's close event and with a capture.
LOG_FORMAT = (
    "%ci:%cp [%t] %ft %b/%s %bi:%bp>%si:%sp %Tw/%Tc/%Tt U=%U B=%B %ts"
    " %ac/%fc/%bc/%sc/%rc %sq/%bq fc_err=%[fc_err_str] bc_err=%[bc_err_str]"
)


def haproxy_config(
    network: Network,
    stats: Path,
    *,
    send_proxy: bool,
    http_check: bool,
    inter_ms: int = 200,
    fall: int = 2,
    rise: int = 2,
) -> str:
    """A private HAProxy configuration: ``mode tcp`` from the clients' link to every host."""
    server_opts = []
    if send_proxy:
        server_opts.append("send-proxy-v2")
    server_opts.append(f"check port {METRICS_PORT}" if http_check else "check")
    servers = "\n".join(
        f"    server h{n} {network.host_address(n)}:{ECHO_PORT} {' '.join(server_opts)}"
        for n in range(1, network.hosts + 1)
    )
    check = "    option httpchk GET /healthz\n" if http_check else ""
    return f"""\
global
    maxconn 2000
    stats socket {stats} mode 600 level admin
    log stdout format raw local0 info

defaults
    mode tcp
    log global
    log-format "{LOG_FORMAT}"
    # A connection that fails is the client's failure: no retry hides it from the test.
    retries 0
    timeout connect 2s
    timeout client 30s
    timeout server 30s

frontend echo
    bind {network.lb_front}:{FRONT_PORT}
    default_backend echod

backend echod
    balance roundrobin
{check}    default-server inter {inter_ms}ms fall {fall} rise {rise}
{servers}
"""


class HAProxy(Process):
    """HAProxy in the balancer's namespace, with a stats socket in the file system."""

    def __init__(self, network: Network, tmp: Path, **options: Any) -> None:
        self.stats = tmp / "haproxy.sock"
        self.config = tmp / "haproxy.cfg"
        self.config.write_text(haproxy_config(network, self.stats, **options))
        super().__init__(network.lb, [program("haproxy"), "-db", "-f", str(self.config)],
                         tmp / "haproxy.log")

    def command(self, line: str) -> str:
        """One command on the stats socket (``show stat``...); its answer."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats))
            sock.sendall(line.encode() + b"\n")
            answer = bytearray()
            while chunk := sock.recv(65536):
                answer += chunk
        return answer.decode()

    def server_states(self) -> dict[str, str]:
        """Each server of the echod backend and its status (UP, DOWN, NOLB, ...)."""
        try:
            text = self.command("show stat")
        except OSError:
            return {}
        lines = text.lstrip("# ").splitlines()
        if not lines:
            return {}
        names = lines[0].split(",")
        states = {}
        for line in lines[1:]:
            row = dict(zip(names, line.split(","), strict=False))
            if row.get("pxname") == "echod" and row.get("svname") not in ("BACKEND", None):
                states[row["svname"]] = row.get("status", "")
        return states

    def wait_states(self, wanted: dict[str, str], timeout: float = DEADLINE) -> None:
        def reached() -> bool:
            if not self.alive():
                raise AssertionError(f"haproxy exited: {self.output()}")
            states = self.server_states()
            return all(states.get(k, "").startswith(v) for k, v in wanted.items())

        wait_for(reached, timeout, what=f"haproxy servers {wanted}")


# -- Prometheus ---------------------------------------------------------------------------------


def prometheus_config(network: Network, interval: str) -> str:
    """A private Prometheus configuration: the hosts' /metrics, nothing else."""
    config = {
        "global": {"scrape_interval": interval, "scrape_timeout": interval},
        "scrape_configs": [
            {
                "job_name": "echod",
                "static_configs": [
                    {
                        "targets": [
                            f"{network.host_address(n)}:{METRICS_PORT}"
                            for n in range(1, network.hosts + 1)
                        ]
                    }
                ],
            }
        ],
    }
    return yaml.safe_dump(config)


class Prometheus(Process):
    """A real Prometheus server in the balancer's namespace, storage in tmp, listening on
    that namespace's loopback; queried through its HTTP API."""

    def __init__(self, network: Network, tmp: Path, interval: str = "500ms") -> None:
        self.network = network
        self.config = tmp / "prometheus.yml"
        self.config.write_text(prometheus_config(network, interval))
        storage = tmp / "prometheus-data"
        storage.mkdir(exist_ok=True)
        super().__init__(
            network.lb,
            [
                program("prometheus"),
                f"--config.file={self.config}",
                f"--storage.tsdb.path={storage}",
                f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}",
                "--log.level=warn",
            ],
            tmp / "prometheus.log",
        )

    def get(self, path: str, **params: str) -> Any:
        """GET from the HTTP API (inside the balancer's namespace); the decoded JSON."""
        url = f"http://127.0.0.1:{PROMETHEUS_PORT}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)

        def fetch() -> Any:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return json.loads(answer.read())

        return run_in(self.network.lb, fetch)

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result list."""
        body = self.get("/api/v1/query", query=promql)
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def ready(self) -> bool:
        if not self.alive():
            raise AssertionError(f"prometheus exited: {self.output()}")
        try:
            return bool(run_in(self.network.lb, self._ready_once, timeout=10))
        except OSError:
            return False

    def _ready_once(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{PROMETHEUS_PORT}/-/ready", timeout=2
            ) as answer:
                return answer.status == 200
        except OSError:
            return False

    def wait_up(self, targets: int, timeout: float = 30.0) -> None:
        """Until every target has been scraped and is up."""
        wait_for(self.ready, timeout, what="prometheus ready")

        def all_up() -> bool:
            result = self.query('up{job="echod"}')
            return len(result) == targets and all(r["value"][1] == "1" for r in result)

        wait_for(all_up, timeout, what=f"{targets} targets up in prometheus")


# -- counters across restarts -------------------------------------------------------------------

#: (instance, labels without instance) -> [(timestamp, value)], oldest first.
Series = dict[tuple[str, tuple[tuple[str, str], ...]], list[tuple[float, float]]]


def raw_samples(prometheus: Prometheus, selector: str, window: str = "10m") -> Series:
    """Every sample Prometheus stored for ``selector`` in the last ``window``, as scraped."""
    out: Series = {}
    for result in prometheus.query(f"{selector}[{window}]"):
        labels = dict(result["metric"])
        instance = labels.pop("instance")
        labels.pop("job", None)
        labels.pop("__name__", None)
        key = (instance, tuple(sorted(labels.items())))
        out[key] = [(float(ts), float(value)) for ts, value in result["values"]]
    return out


def lifetime_totals(series: Series, starts: Series) -> float:
    """The sum, over every series and every echod process lifetime, of the last value
    scraped in that lifetime.

    A restart resets an echod's counters (a new process counts from 0), so neither the last
    value nor ``increase()`` (which extrapolates) gives the exact total. Samples of one scrape
    share its timestamp; ``echod_start_time_seconds`` (``starts``) at that timestamp names
    the lifetime a sample belongs to. Exact when each lifetime's final counts were scraped,
    which the drain (``drain_delay``) gives time for.
    """
    lifetime_of = {
        (instance, ts): start for (instance, _), samples in starts.items() for ts, start in samples
    }
    total = 0.0
    for (instance, _labels), samples in series.items():
        last: dict[float, float] = {}
        for ts, value in samples:
            lifetime = lifetime_of.get((instance, ts))
            if lifetime is not None:
                last[lifetime] = value
        total += sum(last.values())
    return total


def latest(prometheus: Prometheus, selector: str) -> tuple[float, float] | None:
    """The newest sample of ``selector`` (summed over its series, which one scrape writes at
    one timestamp) as (timestamp, value); None before the first."""
    newest: dict[float, float] = {}
    for samples in raw_samples(prometheus, selector, "10s").values():
        if samples:
            ts, value = samples[-1]
            newest[ts] = newest.get(ts, 0.0) + value
    if not newest:
        return None
    ts = max(newest)
    return ts, newest[ts]
