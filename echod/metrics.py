"""Metrics: the counters the workers report and the exposition the supervisor serves.

Every metric is declared once, in :data:`METRICS`: its name (after Prometheus's naming
conventions), its type, its help text, its labels, and where its value comes from. Everything
else follows from that table: what a worker counts, the flat keys its heartbeat carries, the
exposition, and the table in the README.

The data flows one way:

- a worker counts with :class:`WorkerCounters` (cheap calls on the connection path) and sends
  :meth:`WorkerCounters.snapshot`, a ``dict[str, int]`` with flat keys such as
  ``"closed:client_closed"``, cumulative since the worker started, in each heartbeat;
- the supervisor keeps the sum of what its workers reported (live and gone, so a counter never
  goes backwards across a worker restart or a reload) and adds the facts only it knows
  (:class:`SupervisorFacts`);
- :func:`render` turns both into the Prometheus text exposition format (version 0.0.4).

The flat keys are encoded by :class:`WorkerCounters` and decoded by :func:`decode`, side by
side here. A key this version does not know (a worker of another version, during an upgrade)
is ignored, never an error.

``prometheus_client`` is imported only by :func:`preload` or the first :func:`render`: it
costs about 40 ms, and a daemon without ``metrics:`` set never needs it.
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from echod import __version__
from echod.sinks import DROP_REASONS
from echod.snapshot import Snapshot
from echod.states import WORKER_GONE, SupervisorState, WorkerState

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric as Family

#: What the scrape gets: the text format Prometheus 2 and later all read. prometheus_client's
#: own CONTENT_TYPE_LATEST moved to version 1.0.0 in recent releases, so it is not used.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Kind = Literal["counter", "gauge"]

# Label values that are exposed (at 0) before anything is counted, so that rate() and
# increase() see a series from the first scrape. They are the reasons the code logs; a test
# checks them against the modules that define them (handler, admission, udp). Other values
# a worker reports are exposed too, once counted.
CLOSE_REASONS = (
    "client_closed",
    "idle_timeout",
    "write_timeout",
    "reset",
    "shutdown",
    "error",
    "proxy_error",
    "killed",
    "cut",
    "retired",
    "access_list",
    "max_connections_per_ip",
    "max_age",
)
REFUSE_REASONS = (
    "max_connections",
    "max_connections_per_ip",
    "connection_rate",
    "access_list",
    "proxy_untrusted",
    "proxy_error",
    "resources",
)
UDP_DROP_REASONS = ("loop_port", "rate", "send_error", "access_list")
#: The states a live worker may be in (the gone ones are not exposed: the process is gone).
WORKER_STATES = tuple(state.value for state in WorkerState if state not in WORKER_GONE)
RELOAD_RESULTS = ("ok", "failed")


@dataclass(frozen=True)
class Metric:
    """One metric: a row of the table.

    ``key`` is the prefix of the flat keys a worker reports for it (``"closed"`` gives
    ``"closed:<reason>"`` when the metric has a label, ``"opened"`` alone when it has none);
    a metric without ``key`` is a fact of the supervisor's. ``known`` are the values of the
    metric's single label exposed at 0 before they are counted.
    """

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    known: tuple[str, ...] = ()
    key: str | None = None


METRICS: tuple[Metric, ...] = (
    Metric(
        "echod_connections_opened_total",
        "counter",
        "TCP connections admitted and served.",
        key="opened",
    ),
    Metric(
        "echod_connections_closed_total",
        "counter",
        "TCP connections that ended, by the reason logged in conn_close.",
        ("reason",),
        CLOSE_REASONS,
        key="closed",
    ),
    Metric(
        "echod_received_bytes_total",
        "counter",
        "Bytes received from TCP clients, counted when each connection closes.",
        key="bytes_in",
    ),
    Metric(
        "echod_sent_bytes_total",
        "counter",
        "Bytes echoed to TCP clients, counted when each connection closes.",
        key="bytes_out",
    ),
    Metric(
        "echod_connections_refused_total",
        "counter",
        "TCP connections closed without an echo: a limit, the access list or PROXY, by reason.",
        ("reason",),
        REFUSE_REASONS,
        key="refused",
    ),
    Metric(
        "echod_udp_datagrams_echoed_total",
        "counter",
        "UDP datagrams echoed.",
        key="udp_echoed",
    ),
    Metric(
        "echod_udp_datagrams_dropped_total",
        "counter",
        "UDP datagrams not echoed, by reason.",
        ("reason",),
        UDP_DROP_REASONS,
        key="udp_dropped",
    ),
    Metric(
        "echod_connections_open",
        "gauge",
        "TCP connections open now in every worker, as of their last heartbeat.",
    ),
    Metric(
        "echod_workers",
        "gauge",
        "Worker processes, by state.",
        ("state",),
        WORKER_STATES,
    ),
    Metric(
        "echod_worker_restarts_total",
        "counter",
        "Workers started again after one failed.",
    ),
    Metric(
        "echod_reloads_total",
        "counter",
        "Configuration reloads, by result.",
        ("result",),
        RELOAD_RESULTS,
    ),
    Metric(
        "echod_log_lines_dropped_total",
        "counter",
        "Log lines that could not be written (a full disk, a closed pipe...), by reason.",
        ("reason",),
        DROP_REASONS,
    ),
    Metric(
        "echod_draining",
        "gauge",
        "1 from SIGTERM to exit (/healthz answers 503), else 0.",
    ),
    Metric(
        "echod_start_time_seconds",
        "gauge",
        "When the supervisor started, in seconds since the Unix epoch.",
    ),
    Metric(
        "echod_build_info",
        "gauge",
        "Always 1; the labels name the echod and Python versions that run.",
        ("version", "python"),
    ),
)

_BY_KEY = {m.key: m for m in METRICS if m.key is not None}
_BY_NAME = {m.name: m for m in METRICS}

#: A metric's samples: label values (in the order of ``Metric.labels``) -> value.
Samples = dict[tuple[str, ...], float]


# -- the worker's side -----------------------------------------------------------------------


class WorkerCounters:
    """What one worker counts, cumulative since it started; safe to call from any thread.

    Methods for the caller: the counting methods (one short critical section each: a
    connection's cost is a few hundred nanoseconds), :meth:`snapshot` for the heartbeat, and
    :meth:`add` to fold in counts made elsewhere (in process mode, a connection process's).
    """

    __slots__ = ("_counts", "_lock")

    def __init__(self) -> None:
        self._counts: defaultdict[str, int] = defaultdict(int)
        # dict += is several bytecodes: without the lock, two threads can lose a count.
        self._lock = threading.Lock()

    def opened(self) -> None:
        """A TCP connection was admitted."""
        with self._lock:
            self._counts["opened"] += 1

    def closed(self, reason: str, bytes_in: int, bytes_out: int) -> None:
        """A TCP connection ended with ``reason``, having moved these bytes."""
        with self._lock:
            counts = self._counts
            counts["closed:" + reason] += 1
            counts["bytes_in"] += bytes_in
            counts["bytes_out"] += bytes_out

    def refused(self, reason: str) -> None:
        """A TCP connection was closed without an echo, for ``reason``."""
        with self._lock:
            self._counts["refused:" + reason] += 1

    def udp_echoed(self, n: int = 1) -> None:
        """``n`` UDP datagrams were echoed."""
        with self._lock:
            self._counts["udp_echoed"] += n

    def udp_dropped(self, reason: str, n: int = 1) -> None:
        """``n`` UDP datagrams were dropped, for ``reason``."""
        with self._lock:
            self._counts["udp_dropped:" + reason] += n

    def add(self, counts: Mapping[str, int]) -> None:
        """Add a snapshot taken elsewhere, key by key."""
        with self._lock:
            for key, value in counts.items():
                self._counts[key] += value

    def snapshot(self) -> dict[str, int]:
        """Every count so far, with flat keys: what the heartbeat carries."""
        with self._lock:
            return dict(self._counts)


def add_counts(total: dict[str, int], counts: Mapping[str, int]) -> None:
    """Add one snapshot into ``total``, key by key (how the supervisor sums its workers)."""
    for key, value in counts.items():
        total[key] = total.get(key, 0) + value


def decode(counts: Mapping[str, int]) -> dict[str, Samples]:
    """Flat keys as samples by metric name; every worker metric is present (at 0 when
    nothing was counted, with its known label values), and unknown keys are ignored."""
    out: dict[str, Samples] = {m.name: _zeros(m) for m in METRICS if m.key is not None}
    for flat, value in counts.items():
        key, colon, label = flat.partition(":")
        metric = _BY_KEY.get(key)
        if metric is None or bool(colon) != bool(metric.labels):
            continue
        labels = (label,) if colon else ()
        samples = out[metric.name]
        samples[labels] = samples.get(labels, 0) + value
    return out


def _zeros(metric: Metric) -> Samples:
    if not metric.labels:
        return {(): 0}
    return {(value,): 0 for value in metric.known}


# -- the supervisor's side -------------------------------------------------------------------


@dataclass(frozen=True)
class SupervisorFacts:
    """What only the supervisor knows, at the moment of a scrape."""

    open_connections: int = 0
    #: Worker processes by state name; states not given count 0.
    workers: Mapping[str, int] = field(default_factory=dict)
    worker_restarts: int = 0
    reloads_ok: int = 0
    reloads_failed: int = 0
    draining: bool = False
    #: time.time() when the supervisor started.
    start_time: float = 0.0
    #: Log lines dropped by every process of the daemon, by reason.
    log_dropped: Mapping[str, int] = field(default_factory=dict)


def samples(counts: Mapping[str, int], facts: SupervisorFacts) -> dict[str, Samples]:
    """Every metric of the table with its samples, from the workers' summed counts and the
    supervisor's facts."""
    out = decode(counts)
    workers = _zeros(_BY_NAME["echod_workers"])
    for state, number in facts.workers.items():
        workers[(state,)] = number
    out["echod_connections_open"] = {(): facts.open_connections}
    out["echod_workers"] = workers
    out["echod_worker_restarts_total"] = {(): facts.worker_restarts}
    out["echod_reloads_total"] = {("ok",): facts.reloads_ok, ("failed",): facts.reloads_failed}
    dropped = _zeros(_BY_NAME["echod_log_lines_dropped_total"])
    for reason, number in facts.log_dropped.items():
        dropped[(reason,)] = number
    out["echod_log_lines_dropped_total"] = dropped
    out["echod_draining"] = {(): 1 if facts.draining else 0}
    out["echod_start_time_seconds"] = {(): facts.start_time}
    out["echod_build_info"] = {(__version__, platform.python_version()): 1}
    return out


def families(counts: Mapping[str, int], facts: SupervisorFacts) -> Iterator[Family]:
    """The metrics as prometheus_client metric families, in the order of the table."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    values = samples(counts, facts)
    for metric in METRICS:
        family: CounterMetricFamily | GaugeMetricFamily
        if metric.kind == "counter":
            family = CounterMetricFamily(metric.name, metric.help, labels=metric.labels)
        else:
            family = GaugeMetricFamily(metric.name, metric.help, labels=metric.labels)
        for labels, value in sorted(values[metric.name].items()):
            family.add_metric(list(labels), value)
        yield family


class _Collector:
    """A prometheus_client collector over one set of values: a registry needs an object
    with ``collect()``; ours holds nothing between scrapes."""

    def __init__(self, counts: Mapping[str, int], facts: SupervisorFacts) -> None:
        self.counts = counts
        self.facts = facts

    def collect(self) -> Iterable[Family]:
        return families(self.counts, self.facts)


def preload() -> None:
    """Import prometheus_client now (about 40 ms): call it at start-up when ``metrics`` is
    set, so that the first scrape does not stall the supervisor's loop for as long."""
    import prometheus_client  # noqa: F401


def facts_of(snapshot: Snapshot) -> SupervisorFacts:
    """What the supervisor's snapshot says for the metrics."""
    states: dict[str, int] = {}
    for worker in snapshot.pool.workers:
        states[worker.state.value] = states.get(worker.state.value, 0) + 1
    return SupervisorFacts(
        open_connections=snapshot.pool.open,
        workers=states,
        worker_restarts=snapshot.pool.restarts,
        reloads_ok=snapshot.reload.ok_count,
        reloads_failed=snapshot.reload.failed_count,
        draining=snapshot.state is SupervisorState.DRAINING,
        start_time=snapshot.started,
        log_dropped=snapshot.log_dropped,
    )


def render_snapshot(snapshot: Snapshot) -> bytes:
    """The exposition of the daemon's snapshot: the workers' summed counters and the
    supervisor's facts."""
    return render(snapshot.pool.totals, facts_of(snapshot))


def render(counts: Mapping[str, int], facts: SupervisorFacts) -> bytes:
    """The exposition, in the text format :data:`CONTENT_TYPE` names."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(counts, facts))
    return generate_latest(registry)


# -- the README's table ----------------------------------------------------------------------

README_PATH = Path("README.md")
BEGIN = "<!-- metrics:begin -->"
END = "<!-- metrics:end -->"
REGENERATE = "python -m echod.metrics --write"


def render_readme_table() -> str:
    """The README's table of metrics: one row per metric of :data:`METRICS`."""
    rows = ["| Metric | Type | Labels | Description |", "| --- | --- | --- | --- |"]
    for metric in METRICS:
        labels = ", ".join(f"`{label}`" for label in metric.labels)
        if metric.known:
            labels += ": " + ", ".join(metric.known)
        cells = (f"`{metric.name}`", metric.kind, labels, metric.help)
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"


def replace_block(readme: str, block: str) -> str | None:
    """``readme`` with the text between the metrics markers set to ``block``; None without
    the markers."""
    pattern = re.compile(
        rf"^{re.escape(BEGIN)}[ \t]*\n.*?^{re.escape(END)}[ \t]*$", re.DOTALL | re.MULTILINE
    )
    if not pattern.search(readme):
        return None
    return pattern.sub(lambda _: f"{BEGIN}\n\n{block}\n{END}", readme, count=1)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m echod.metrics``: print the README table, or --write / --check README.md."""
    parser = argparse.ArgumentParser(prog="python -m echod.metrics", description=main.__doc__)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="rewrite the table in README.md")
    action.add_argument("--check", action="store_true", help="exit 1 if README.md is stale")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args(argv)
    if not (args.write or args.check):
        sys.stdout.write(render_readme_table())
        return 0
    path = args.root / README_PATH
    old = path.read_text(encoding="utf-8")
    new = replace_block(old, render_readme_table())
    if new is None:
        print(f"{path}: no {BEGIN} ... {END} markers", file=sys.stderr)
        return 1
    if new == old:
        return 0
    if args.check:
        print(f"{path}: the metrics table is stale: run `{REGENERATE}`", file=sys.stderr)
        return 1
    path.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
