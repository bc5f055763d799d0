"""The metrics table, the workers' counters and their flat keys, and the exposition."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from echod import __version__, admission, connection, handler, metrics, udp
from echod.metrics import METRICS, SupervisorFacts, WorkerCounters

ROOT = Path(__file__).resolve().parents[2]


def parse(text: bytes) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The exposition read back by prometheus_client's own parser: name -> labels -> value."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_names_follow_prometheus_conventions() -> None:
    """Every name is echod_ and snake case; counters end in _total, gauges do not."""
    for metric in METRICS:
        assert re.fullmatch(r"echod_[a-z_]+", metric.name), metric.name
        assert metric.name.endswith("_total") == (metric.kind == "counter"), metric.name
        assert metric.help.endswith("."), metric.name
    assert len({m.name for m in METRICS}) == len(METRICS)
    assert len({m.key for m in METRICS if m.key}) == len([m for m in METRICS if m.key])


def test_known_reasons_are_the_ones_the_code_uses() -> None:
    """The label values exposed at 0 are the reasons handler, admission and udp define."""
    closes = {handler.CLIENT_CLOSED, handler.IDLE_TIMEOUT, handler.WRITE_TIMEOUT}
    closes |= {handler.RESET, handler.SHUTDOWN, handler.ERROR, handler.PROXY_ERROR}
    closes |= {connection.KILLED, connection.CUT, connection.RETIRED, connection.ACCESS_LIST}
    closes |= {connection.PER_IP, connection.MAX_AGE}
    assert set(metrics.CLOSE_REASONS) == closes
    refusals = {admission.REFUSED_LIMIT, admission.REFUSED_PER_IP, admission.REFUSED_RATE}
    refusals |= {admission.REFUSED_ACCESS, admission.REFUSED_UNTRUSTED, admission.REFUSED_PROXY}
    refusals |= {admission.REFUSED_RESOURCES}
    assert refusals == set(metrics.REFUSE_REASONS)
    drops = {udp.DROP_LOOP_PORT, udp.DROP_RATE, udp.DROP_SEND_ERROR, udp.DROP_ACCESS_LIST}
    assert drops <= set(metrics.UDP_DROP_REASONS)


def test_counters_snapshot_has_flat_keys() -> None:
    """Each counting method adds to its flat key, and the snapshot is a copy."""
    counters = WorkerCounters()
    counters.opened()
    counters.opened()
    counters.closed("client_closed", 10, 12)
    counters.closed("idle_timeout", 5, 5)
    counters.refused("access_list")
    counters.udp_echoed(3)
    counters.udp_dropped("rate", 2)
    snap = counters.snapshot()
    assert snap == {
        "opened": 2,
        "closed:client_closed": 1,
        "closed:idle_timeout": 1,
        "bytes_in": 15,
        "bytes_out": 17,
        "refused:access_list": 1,
        "udp_echoed": 3,
        "udp_dropped:rate": 2,
    }
    snap["opened"] = 99
    assert counters.snapshot()["opened"] == 2


def test_counters_lose_nothing_across_threads() -> None:
    """Eight threads counting at once give exact totals."""
    counters = WorkerCounters()
    rounds = 20_000

    def count() -> None:
        for _ in range(rounds):
            counters.opened()
            counters.closed("client_closed", 3, 3)

    threads = [threading.Thread(target=count) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    snap = counters.snapshot()
    assert snap["opened"] == snap["closed:client_closed"] == 8 * rounds
    assert snap["bytes_in"] == snap["bytes_out"] == 3 * 8 * rounds


def test_add_folds_in_another_snapshot() -> None:
    """add() sums key by key, as a worker does with a connection process's counts."""
    counters = WorkerCounters()
    counters.opened()
    other = WorkerCounters()
    other.opened()
    other.closed("reset", 1, 0)
    counters.add(other.snapshot())
    assert counters.snapshot() == {"opened": 2, "closed:reset": 1, "bytes_in": 1, "bytes_out": 0}
    total: dict[str, int] = {}
    metrics.add_counts(total, counters.snapshot())
    metrics.add_counts(total, other.snapshot())
    assert total["opened"] == 3


def test_decode_is_the_inverse_of_the_encoding() -> None:
    """Flat keys decode into labelled samples; known label values are present at 0."""
    counters = WorkerCounters()
    counters.closed("reset", 7, 6)
    counters.refused("proxy_error")
    decoded = metrics.decode(counters.snapshot())
    assert decoded["echod_connections_closed_total"][("reset",)] == 1
    assert decoded["echod_connections_closed_total"][("client_closed",)] == 0
    assert decoded["echod_received_bytes_total"] == {(): 7}
    assert decoded["echod_sent_bytes_total"] == {(): 6}
    assert decoded["echod_connections_refused_total"][("proxy_error",)] == 1
    assert decoded["echod_connections_opened_total"] == {(): 0}


def test_decode_ignores_unknown_and_malformed_keys() -> None:
    """Keys of another version, or with a label where none belongs, are skipped."""
    decoded = metrics.decode(
        {"opened": 2, "future_thing": 5, "opened:extra": 1, "closed": 4, "closed:new": 1}
    )
    assert decoded["echod_connections_opened_total"] == {(): 2}
    assert decoded["echod_connections_closed_total"][("new",)] == 1
    assert sum(decoded["echod_connections_closed_total"].values()) == 1


def test_render_exposes_every_metric_with_its_values() -> None:
    """The exposition has every metric of the table, the counts and the supervisor's facts."""
    counters = WorkerCounters()
    counters.opened()
    counters.closed("client_closed", 100, 100)
    facts = SupervisorFacts(
        open_connections=3,
        workers={"running": 2, "retiring": 1},
        worker_restarts=4,
        reloads_ok=5,
        reloads_failed=1,
        draining=True,
        start_time=1_800_000_000.5,
    )
    text = metrics.render(counters.snapshot(), facts)
    for metric in METRICS:
        assert f"# TYPE {metric.name} {metric.kind}\n".encode() in text, metric.name
    got = parse(text)
    assert got["echod_connections_opened_total"][()] == 1
    assert got["echod_connections_closed_total"][(("reason", "client_closed"),)] == 1
    assert got["echod_connections_closed_total"][(("reason", "shutdown"),)] == 0
    assert got["echod_received_bytes_total"][()] == got["echod_sent_bytes_total"][()] == 100
    assert got["echod_connections_open"][()] == 3
    assert got["echod_workers"][(("state", "running"),)] == 2
    assert got["echod_workers"][(("state", "starting"),)] == 0
    assert got["echod_worker_restarts_total"][()] == 4
    assert got["echod_reloads_total"][(("result", "ok"),)] == 5
    assert got["echod_reloads_total"][(("result", "failed"),)] == 1
    assert got["echod_draining"][()] == 1
    assert got["echod_start_time_seconds"][()] == 1_800_000_000.5
    [(labels, value)] = got["echod_build_info"].items()
    assert dict(labels)["version"] == __version__ and value == 1


@pytest.mark.parametrize("reason", ['quote"', "back\\slash", "new\nline", "ünï"])
def test_render_escapes_label_values(reason: str) -> None:
    """An odd reason string comes back intact through the text format."""
    counters = WorkerCounters()
    counters.refused(reason)
    got = parse(metrics.render(counters.snapshot(), SupervisorFacts()))
    assert got["echod_connections_refused_total"][(("reason", reason),)] == 1


def test_readme_table_is_current() -> None:
    """The README's metrics table, between its markers, is the generated one."""
    readme = (ROOT / metrics.README_PATH).read_text(encoding="utf-8")
    wanted = metrics.replace_block(readme, metrics.render_readme_table())
    assert wanted is not None, "README.md lacks the metrics markers"
    assert wanted == readme, f"the README's metrics table is stale: run `{metrics.REGENERATE}`"


def test_readme_table_lists_every_metric() -> None:
    """One row per metric, with its known label values."""
    table = metrics.render_readme_table()
    assert len(table.splitlines()) == 2 + len(METRICS)
    assert "| `echod_connections_refused_total` | counter | `reason`: max_connections," in table


def test_prometheus_client_is_imported_only_when_needed() -> None:
    """Importing echod.metrics (as every worker does) leaves prometheus_client unimported;
    preload() imports it."""
    import subprocess
    import sys

    code = (
        "import sys, echod.metrics as m; a = 'prometheus_client' in sys.modules; m.preload(); "
        "print(a, 'prometheus_client' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.split() == ["False", "True"]
