"""The supervisor's parts on their own, each with fakes of what it acts through and no
daemon processes: the stop (drain, begin, the kill, a pause), the upgrade's check, the
status file and the metrics as functions of a snapshot, the endpoint, and the pool's side of
an upgrade (hand over, adopt)."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from echod import control, exitcodes, handover, metrics, status
from echod.config import default_config
from echod.endpoint import Endpoint
from echod.listeners import Listeners
from echod.pool import WorkerHandle, WorkerPool
from echod.shutdown import REPORT_WAIT, STOP_GRACE, Shutdown
from echod.snapshot import PoolSnapshot, ReloadView, Snapshot, WorkerView
from echod.states import SUPERVISOR_TRANSITIONS, SupervisorState, WorkerState, check
from echod.upgrader import Upgrade, parse_check

S = SupervisorState
W = WorkerState

pytestmark = pytest.mark.timeout(60)


# -- the stop ---------------------------------------------------------------------------------


class Host:
    """A StopHost: the supervisor's state, and what the stop asked of it."""

    def __init__(self, state: SupervisorState = S.RUNNING) -> None:
        self.state = state
        self.closed = 0
        self.failed: list[tuple[str, int]] = []
        self.published = 0

    def change_state(self, new: SupervisorState) -> None:
        self.state = check(SUPERVISOR_TRANSITIONS, self.state, new)

    def close_listeners(self) -> None:
        self.closed += 1

    def reload_failed(self, error: str, exit_code: int) -> None:
        self.failed.append((error, exit_code))

    def publish(self, force: bool) -> None:
        self.published += 1


class Worker:
    """A StopWorker whose answers a test sets."""

    def __init__(self, open_: int = 0) -> None:
        self.state = W.RUNNING
        self.open = open_
        self.cut = 0
        self.stop_open: int | None = None
        self.said_bye = False


class Workers:
    """StoppingWorkers: what the stop told the pool."""

    def __init__(self, *workers: Worker) -> None:
        self.workers = list(workers)
        self.told: list[str] = []

    def stop_all(self, timeout: float) -> list[Any]:
        self.told.append("quit" if timeout == 0 else f"stop {timeout:g}")
        return list(self.workers)

    def quit_all(self) -> None:
        self.told.append("quit")

    def kill_all(self) -> None:
        self.told.append("kill")

    def open_now(self) -> int:
        return sum(w.open for w in self.workers)

    def served_total(self) -> int:
        return 42

    def any_alive(self) -> bool:
        return bool(self.workers)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def a_stop(
    state: SupervisorState = S.RUNNING, *workers: Worker
) -> tuple[Shutdown, Host, Workers, Clock]:
    host, pool, clock = Host(state), Workers(*workers), Clock()
    return Shutdown(host, pool, structlog.get_logger, clock=clock), host, pool, clock


def test_a_stop_with_a_drain_delay_drains_first_and_a_second_request_ends_it() -> None:
    """SIGTERM while running, with drain_delay: draining, the pending reload fails, nobody
    is told to stop yet; a second SIGTERM stops at once with the first one's reason."""
    stop, host, pool, clock = a_stop(S.RUNNING, Worker(3))
    with capture_logs() as logs:
        stop.request("SIGTERM", drain_delay=5, shutdown_timeout=10)
    assert host.state is S.DRAINING and pool.told == []
    assert host.failed == [("echod is draining (SIGTERM)", exitcodes.EX_TEMPFAIL)]
    assert logs[0]["event"] == "draining" and logs[0]["open"] == 3
    assert stop.deadlines() == [clock.now + 5]
    stop.request("SIGINT", drain_delay=5, shutdown_timeout=10)
    assert host.state is S.STOPPING and pool.told == ["stop 10"]
    assert stop.stopping_fields == {"reason": "SIGTERM", "timeout": 10}
    assert host.closed == 1


def test_the_drain_delay_ends_by_itself_into_the_stop() -> None:
    """When drain_delay is over the stop begins with the shutdown_timeout it was given."""
    stop, host, pool, clock = a_stop(S.RUNNING, Worker())
    stop.request("SIGTERM", drain_delay=5, shutdown_timeout=7)
    clock.now += 5
    stop.run_timers(clock.now)
    assert host.state is S.STOPPING and pool.told == ["stop 7"]
    assert stop.drained_for == 5


def test_a_stop_while_starting_does_not_drain() -> None:
    """A daemon that is not serving yet has nothing to drain: it stops at once."""
    stop, host, pool, _clock = a_stop(S.STARTING, Worker())
    stop.request("SIGTERM", drain_delay=30, shutdown_timeout=10)
    assert host.state is S.STOPPING and pool.told == ["stop 10"]


def test_sigquit_during_a_stop_cuts_at_once() -> None:
    """begin() again with timeout 0 while stopping tells the workers to quit, once more."""
    stop, host, pool, _clock = a_stop(S.RUNNING, Worker())
    stop.begin(exitcodes.OK, "SIGTERM", 10)
    stop.begin(exitcodes.OK, "SIGQUIT", 0.0)
    assert pool.told == ["stop 10", "quit"]
    assert host.state is S.STOPPING


def test_a_stop_without_workers_is_stopped_at_once() -> None:
    """No worker alive: the stopping event is logged and the daemon is stopped."""
    stop, host, _pool, _clock = a_stop(S.RUNNING)
    with capture_logs() as logs:
        stop.begin(exitcodes.EX_SOFTWARE, "crash loop", 10)
    assert host.state is S.STOPPED
    assert stop.exit_code == exitcodes.EX_SOFTWARE
    assert [e["event"] for e in logs] == ["stopping"]


def test_the_stopping_event_waits_for_every_answer_at_most_report_wait() -> None:
    """The stopping event comes once every worker has answered, or REPORT_WAIT after the
    stop, counting a silent worker by its heartbeat as unconfirmed."""
    answering, silent = Worker(4), Worker(2)
    stop, _host, _pool, clock = a_stop(S.RUNNING, answering, silent)
    stop.begin(exitcodes.OK, "SIGTERM", 10)
    answering.stop_open = 3
    with capture_logs() as logs:
        stop.run_timers(clock.now + REPORT_WAIT / 2)
        assert logs == []
        stop.run_timers(clock.now + REPORT_WAIT)
    (stopping,) = logs
    assert (stopping["open"], stopping["unconfirmed"]) == (5, 1)


def test_the_kill_comes_after_the_timeout_and_the_grace() -> None:
    """Workers still there shutdown_timeout + STOP_GRACE after the stop are killed, once."""
    stop, _host, pool, clock = a_stop(S.RUNNING, Worker())
    stop.begin(exitcodes.OK, "SIGTERM", 10)
    stop.run_timers(clock.now + 10 + STOP_GRACE - 0.01)
    assert "kill" not in pool.told
    stop.run_timers(clock.now + 10 + STOP_GRACE)
    stop.run_timers(clock.now + 10 + STOP_GRACE + 1)
    assert pool.told.count("kill") == 1


def test_a_pause_moves_every_deadline_of_the_stop() -> None:
    """After the daemon was paused, the stop's deadlines count from when it runs again:
    a pause is not a reason to kill workers that were paused too."""
    stop, _host, pool, clock = a_stop(S.RUNNING, Worker())
    stop.begin(exitcodes.OK, "SIGTERM", 10)
    before = stop.deadlines()
    stop.shift(40.0)
    assert stop.deadlines() == [d + 40.0 for d in before]
    stop.run_timers(clock.now + 10 + STOP_GRACE + 1)
    assert "kill" not in pool.told


def test_stopped_splits_the_count_and_logs_the_uptime() -> None:
    """stopped: the stopping event's open, finished and cut by each worker's bye."""
    bye, killed = Worker(5), Worker(2)
    stop, _host, _pool, _clock = a_stop(S.RUNNING, bye, killed)
    stop.begin(exitcodes.OK, "SIGTERM", 10)
    bye.stop_open, killed.stop_open = 5, 2
    bye.said_bye, bye.cut, bye.open = True, 1, 0
    bye.state = killed.state = W.EXITED
    with capture_logs() as logs:
        stop.log_stopped(uptime=12.3456)
    stopping, stopped = logs
    assert stopping["open"] == 7
    assert {k: stopped[k] for k in ("open", "finished", "cut", "killed", "served", "uptime")} == {
        "open": 7, "finished": 4, "cut": 3, "killed": 2, "served": 42, "uptime": 12.346,
    }  # fmt: skip


# -- the upgrade's check ------------------------------------------------------------------------


class UpgradeHost:
    """An UpgradeHost: what the upgrade asked of the supervisor."""

    def __init__(self, refusal: str | None = None) -> None:
        self.refusal = refusal
        self.requests = 0
        self.failures: list[tuple[str, int]] = []
        self.acted_on: list[int] = []

    def upgrade_refusal(self) -> str | None:
        return self.refusal

    def upgrade_requested(self) -> None:
        self.requests += 1

    def check_upgrade(self) -> None:
        pass

    def handover(self, pending: list[int]) -> handover.Handover:
        raise AssertionError("not in these tests: no exec")

    def upgrade_failed(self, error: str, exit_code: int) -> None:
        self.failures.append((error, exit_code))

    def act_on(self, signums: list[int]) -> None:
        self.acted_on += signums


class CheckOnly(Upgrade):
    """An Upgrade that stops where the exec would begin, keeping what the check said."""

    checked: list[tuple[str, int]]

    def execute(self, version: str, fmt: int) -> None:
        self.checked = [*getattr(self, "checked", []), (version, fmt)]


@pytest.fixture
def selector() -> Iterator[selectors.BaseSelector]:
    with selectors.DefaultSelector() as sel:
        yield sel


def run_check(upgrade: Upgrade, selector: selectors.BaseSelector, timeout: float = 30) -> None:
    """Drive the check as the supervisor's loop would: its output, then its exit."""
    deadline = time.monotonic() + timeout
    while upgrade.checking and time.monotonic() < deadline:
        for key, mask in selector.select(0.05):
            key.data(key.fileobj, mask)
        assert upgrade.proc is not None or not upgrade.checking
        if upgrade.proc is not None:
            pid, wait_status = os.waitpid(upgrade.proc.pid, os.WNOHANG)
            if pid:
                assert upgrade.exited(pid, wait_status)


def test_parse_check_reads_the_version_and_the_format() -> None:
    """A version alone is format 1; ``handover N`` on the last line says N (capped at
    this version's); stray lines before (warnings) are skipped."""
    assert parse_check("0.1.0\n") == ("0.1.0", 1)
    assert parse_check("warning: x\n0.2.0\nhandover 2\n") == ("0.2.0", 2)
    assert parse_check("0.3.0\nhandover 99\n") == ("0.3.0", handover.FORMAT)
    assert parse_check("") == ("unknown", 1)


def test_the_check_runs_beside_the_loop_and_reports_the_version(
    selector: selectors.BaseSelector,
) -> None:
    """The real check (python -m echod.upgrade) runs as a child; its output and exit come
    through the selector and the reaper; the host hears the version and format."""
    from echod import __version__

    host = UpgradeHost()
    upgrade = CheckOnly(host, None, selector)
    upgrade.begin()
    assert upgrade.checking and host.requests == 1
    upgrade.begin()  # a second request joins the first
    assert host.requests == 2
    run_check(upgrade, selector)
    assert upgrade.checked == [(__version__, handover.FORMAT)] and host.failures == []
    assert not upgrade.checking and upgrade.deadline() is None


def test_a_refused_upgrade_never_starts_a_check(selector: selectors.BaseSelector) -> None:
    """A refusal fails the request with EX_TEMPFAIL and starts nothing."""
    host = UpgradeHost(refusal="echod is draining")
    upgrade = CheckOnly(host, None, selector)
    upgrade.begin()
    assert not upgrade.checking
    assert host.failures == [("echod is draining", exitcodes.EX_TEMPFAIL)]


def test_a_failing_check_fails_the_upgrade_with_its_last_line(
    tmp_path: Path, selector: selectors.BaseSelector
) -> None:
    """A configuration the new code refuses: EX_CONFIG and the check's own words."""
    bad = tmp_path / "echod.yaml"
    bad.write_text("port: x\n")
    host = UpgradeHost()
    upgrade = CheckOnly(host, str(bad), selector)
    upgrade.begin()
    run_check(upgrade, selector)
    ((error, code),) = host.failures
    assert code == exitcodes.EX_CONFIG
    assert error.startswith(f"the new code failed its check: echod: {bad}:1:7: port")


def test_an_abort_kills_the_check_and_its_exit_is_not_the_loops(
    selector: selectors.BaseSelector,
) -> None:
    """A stop during the check kills it; the failure says why; its exit, when reaped, is
    recognised as the check's and nothing more happens."""
    host = UpgradeHost()
    upgrade = CheckOnly(host, None, selector)
    upgrade.begin()
    assert upgrade.proc is not None
    pid = upgrade.proc.pid
    upgrade.abort("echod is stopping (SIGTERM)")
    assert host.failures == [("echod is stopping (SIGTERM)", exitcodes.EX_TEMPFAIL)]
    assert not upgrade.checking and not selector.get_map()
    _, wait_status = os.waitpid(pid, 0)
    assert os.WTERMSIG(wait_status) == signal.SIGKILL
    assert upgrade.exited(pid, wait_status)
    assert not getattr(upgrade, "checked", [])
    upgrade.abort("again")  # nothing under way: nothing to say
    assert len(host.failures) == 1


def test_a_check_past_its_deadline_is_aborted(selector: selectors.BaseSelector) -> None:
    """run_timers() past the deadline kills the check: "no answer within N s"."""
    host = UpgradeHost()
    upgrade = CheckOnly(host, None, selector, timeout=5)
    upgrade.begin()
    deadline = upgrade.deadline()
    assert deadline is not None
    upgrade.run_timers(deadline - 1)
    assert upgrade.checking
    upgrade.run_timers(deadline)
    assert host.failures == [
        ("the new code could not be checked: no answer within 5 s", exitcodes.EX_SOFTWARE)
    ]
    os.waitpid(-1, 0)


# -- status and metrics, from a snapshot -------------------------------------------------------


def snapshot(state: SupervisorState = S.RUNNING) -> Snapshot:
    return Snapshot(
        pid=77, version="1.2.3", state=state, started=1700000000.0, mode="thread",
        addresses=("127.0.0.1:7",), config_file="/etc/echod.yaml", reloads=2, generation=3,
        reload=ReloadView(5, "failed", "bad", 78, ok_count=4, failed_count=1),
        pool=PoolSnapshot(
            workers=(
                WorkerView(1, 101, 3, "thread", W.RUNNING, 4),
                WorkerView(2, 102, 2, "thread", W.RETIRING, 1),
            ),
            open=5, served=90, restarts=1, totals={"opened": 95, "closed:client_closed": 90},
        ),
        log_dropped={"no_space": 12, "pipe_closed": 0},
    )  # fmt: skip


def test_the_status_file_is_the_snapshot() -> None:
    """Every field of the status file comes from the snapshot; zero drops are left out."""
    built = status.build(snapshot())
    assert built.to_dict() == {
        "pid": 77, "version": "1.2.3", "state": "running", "started": 1700000000.0,
        "mode": "thread", "addresses": ["127.0.0.1:7"], "config_file": "/etc/echod.yaml",
        "open": 5, "served": 90, "reloads": 2, "generation": 3,
        "workers": [
            {"index": 1, "pid": 101, "generation": 3, "state": "running", "open": 4},
            {"index": 2, "pid": 102, "generation": 2, "state": "retiring", "open": 1},
        ],
        "reload_serial": 5, "reload_result": "failed", "reload_error": "bad",
        "reload_exit_code": 78, "log_dropped": {"no_space": 12}, "drain": False,
        "limits": {},
    }  # fmt: skip
    assert status.Status.from_dict(built.to_dict()) == built


def test_the_status_file_follows_drops_while_the_line_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unforced publish writes the file again when only the drop count changed (a
    connection process failing to log its close after the last count changed), at most once
    a second, and not when nothing changed."""
    clock = [100.0]
    monkeypatch.setattr(status, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    drops = {"no_space": 0}
    builds: list[int] = []

    def build() -> status.Status:
        builds.append(drops["no_space"])
        return status.build(snapshot())

    publisher = status.Publisher(
        None, str(tmp_path / "echod.status"), lambda: "thread mode; 0 open; 9 served",
        build, lambda: drops["no_space"],
    )  # fmt: skip
    publisher.publish(force=True)
    clock[0] += 5
    publisher.publish()
    assert builds == [0]  # nothing changed
    drops["no_space"] = 91
    publisher.publish()
    assert builds == [0, 91]
    drops["no_space"] = 100
    clock[0] += 0.5
    publisher.publish()
    assert builds == [0, 91]  # within the second
    clock[0] += 1
    publisher.publish()
    assert builds == [0, 91, 100]


def test_the_metrics_are_the_snapshot() -> None:
    """The exposition of a snapshot: the workers' totals and the supervisor's facts."""
    from tests.unit.test_metrics import parse

    values = parse(metrics.render_snapshot(snapshot(S.DRAINING)))
    assert values["echod_connections_opened_total"][()] == 95
    assert values["echod_connections_open"][()] == 5
    assert values["echod_workers"][(("state", "running"),)] == 1
    assert values["echod_workers"][(("state", "retiring"),)] == 1
    assert values["echod_workers"][(("state", "stopping"),)] == 0
    assert values["echod_worker_restarts_total"][()] == 1
    assert values["echod_reloads_total"][(("result", "ok"),)] == 4
    assert values["echod_draining"][()] == 1
    assert values["echod_log_lines_dropped_total"][(("reason", "no_space"),)] == 12
    assert values["echod_log_lines_dropped_total"][(("reason", "io_error"),)] == 0


def test_the_worker_states_exposed_are_those_of_a_live_worker() -> None:
    """metrics.WORKER_STATES is derived from WorkerState: the states of a live process."""
    assert metrics.WORKER_STATES == ("starting", "running", "retiring", "stopping")


# -- the endpoint -------------------------------------------------------------------------------


def test_the_endpoint_serves_what_it_is_given_and_moves_on_reload(
    selector: selectors.BaseSelector,
) -> None:
    """The endpoint binds where the configuration says, serves the callables it was given,
    moves to a new address on reload, and keeps the old one (saying so) when the new
    cannot be bound."""
    import dataclasses

    endpoint = Endpoint(lambda: b"exposition", lambda: "draining", structlog.get_logger)
    cfg = dataclasses.replace(default_config(), metrics="127.0.0.1:0")
    endpoint.open(cfg, selector)
    try:
        assert endpoint.server is not None
        (address,) = endpoint.addresses()
        assert endpoint.server.render() == b"exposition"
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = f"127.0.0.1:{taken.getsockname()[1]}"
            with capture_logs() as logs:
                endpoint.reconfigure(dataclasses.replace(cfg, metrics=busy), selector)
        assert endpoint.addresses() == [address]
        assert logs[0]["event"] == "metrics_unavailable" and logs[0]["kept"] == "127.0.0.1:0"
        endpoint.reconfigure(dataclasses.replace(cfg, metrics=None), selector)
        assert endpoint.server is None and endpoint.addresses() == []
    finally:
        endpoint.close()


# -- the pool's part of an upgrade -----------------------------------------------------------------


class Owner:
    def worker_ready(self, handle: WorkerHandle) -> None: ...

    def worker_failed(self, handle: WorkerHandle, failures: int) -> None: ...

    def worker_quit(self, handle: WorkerHandle) -> None: ...

    def counts_changed(self, force: bool) -> None: ...


def test_a_pool_hands_over_and_adopts_its_workers(selector: selectors.BaseSelector) -> None:
    """What one pool hands over another adopts: the workers (their states, counts, live
    control sockets), the counts of the gone, the crash window, the totals."""
    old = WorkerPool(Owner(), structlog.get_logger, lambda: None)
    old.start(selector)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    handle = WorkerHandle(2, 9, 4, 4242, control=ours, mode="async", started=5.0)
    handle.apply(control.Heartbeat(3, 17), 6.0)
    handle.move(W.RUNNING, structlog.get_logger())
    old.workers[handle.pid] = handle
    old.serial, old.restarts = 9, 2
    old.gone.served, old.gone.crashes.times.append(1.5)
    old.totals.report(9, {"opened": 20})
    state = old.hand_over()
    again = handover.Handover.from_json(
        handover.Handover(
            from_version="x", config_path=None, pidfile_required=False, started=0.0,
            started_wall=0.0, generation=4, reloads=0, reload_serial=0, listeners=[],
            udp_enabled=False, adopted=False, pidfile_path=None, pidfile_fd=None, pool=state,
        ).to_json()
    ).pool  # fmt: skip
    with selectors.DefaultSelector() as other:
        new = WorkerPool(Owner(), structlog.get_logger, lambda: None)
        new.start(other)
        control_fd = os.dup(ours.fileno())  # what the exec would have kept open
        again.workers[0].control = control_fd
        listeners = Listeners()
        try:
            assert new.adopt(again, listeners) == [4242]
            adopted = new.workers[4242]
            assert (adopted.index, adopted.serial, adopted.generation, adopted.mode) == (
                2, 9, 4, "async",
            )  # fmt: skip
            assert (adopted.state, adopted.open, adopted.served) == (W.RUNNING, 3, 17)
            assert adopted.booted and adopted.listeners is listeners
            assert (new.serial, new.restarts) == (9, 2)
            assert list(new.gone.crashes.times) == [1.5]
            assert new.totals.snapshot() == {"opened": 20}
            theirs.send(b"hb 1 18")
            new.on_readable(adopted)
            assert (adopted.open, adopted.served) == (1, 18)
        finally:
            new.close()
            adopted.control.close()
    old.close()
    ours.close()
    theirs.close()


def test_a_pool_forgives_silence_after_a_pause() -> None:
    """After a gap in the supervisor's loop no worker is older than the gap's end."""
    pool = WorkerPool(Owner(), structlog.get_logger, lambda: None)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        handle = WorkerHandle(1, 1, 1, 4242, control=ours, mode="thread", started=10.0)
        pool.workers[handle.pid] = handle
        pool.forgive_silence(60.0)
        assert handle.last_seen == 60.0
        pool.forgive_silence(50.0)  # never backwards
        assert handle.last_seen == 60.0
        assert pool.healthy(60.0 + 29, 30) and not pool.healthy(60.0 + 31, 30)


def test_the_worker_that_failed_is_logged_at_warning_with_what_it_lost() -> None:
    """A worker killed (the OOM killer) is a warning, with the signal and its connections."""
    pool = WorkerPool(Owner(), structlog.get_logger, lambda: None)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    with ours, theirs:
        handle = WorkerHandle(1, 1, 1, 4242, control=ours, mode="process", started=1.0)
        handle.move(W.RUNNING, structlog.get_logger())
        handle.apply(control.Heartbeat(7, 30), 2.0)
        pool.workers[handle.pid] = handle
        killed = 0x09  # a wait status: killed by SIGKILL
        with capture_logs() as logs:
            assert pool.exited(4242, killed, default_config(), stopping=False)
    (failed,) = [e for e in logs if e["event"] == "worker_state"]
    assert failed["log_level"] == "warning"
    assert (failed["state"], failed["signal"], failed["lost"]) == ("failed", "SIGKILL", 7)
    assert not pool.exited(4242, killed, default_config(), stopping=False)  # (gone already)


def test_the_check_module_is_a_command_line() -> None:
    """`python -m echod.upgrade` prints the version, and the format only when asked."""
    import subprocess

    from echod import __version__
    from echod.upgrader import FORMAT_QUERY_ENV

    plain = subprocess.run(
        [sys.executable, "-m", "echod.upgrade", "--defaults"],
        capture_output=True, text=True, timeout=60, check=True,
        env={k: v for k, v in os.environ.items() if k != FORMAT_QUERY_ENV},
    )  # fmt: skip
    assert plain.stdout == f"{__version__}\n"
    asked = subprocess.run(
        [sys.executable, "-m", "echod.upgrade", "--defaults"],
        capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, FORMAT_QUERY_ENV: "1"},
    )  # fmt: skip
    assert asked.stdout == f"{__version__}\nhandover {handover.FORMAT}\n"
