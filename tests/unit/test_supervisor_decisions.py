"""The supervisor's decisions, without processes: states and their transitions, backoff,
the crash window, the totals that outlive workers, config changes, reload outcomes and the
status file."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import stat
from pathlib import Path

import pytest

from echod import exitcodes, handover, signals, status
from echod.config import MODES, ConfigError, default_config
from echod.errors import OperatorError
from echod.pool import CrashWindow, backoff_delay
from echod.reload import ReloadOutcome, config_changes
from echod.states import (
    SUPERVISOR_TRANSITIONS,
    WORKER_TRANSITIONS,
    IllegalTransition,
    SupervisorState,
    WorkerState,
    check,
)
from echod.totals import Totals
from echod.workers import module_name, worker_class

W = WorkerState
S = SupervisorState


def test_every_state_has_a_row() -> None:
    """Each transition table lists every state of its Enum, and only those."""
    assert set(WORKER_TRANSITIONS) == set(WorkerState)
    assert set(SUPERVISOR_TRANSITIONS) == set(SupervisorState)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (W.STARTING, W.RUNNING),
        (W.RUNNING, W.RETIRING),
        (W.RUNNING, W.STOPPING),
        (W.RUNNING, W.EXITED),
        (W.RUNNING, W.FAILED),
        (W.RETIRING, W.EXITED),
        (W.FAILED, W.BACKOFF),
    ],
)
def test_legal_worker_transitions(old: WorkerState, new: WorkerState) -> None:
    """The lifecycle's expected moves are allowed."""
    assert check(WORKER_TRANSITIONS, old, new) is new


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (W.EXITED, W.RUNNING),
        (W.FAILED, W.RUNNING),
        (W.RETIRING, W.RUNNING),
        (W.STOPPING, W.RETIRING),
        (W.STARTING, W.RETIRING),
        (W.BACKOFF, W.STARTING),
        (W.RUNNING, W.RUNNING),
    ],
)
def test_illegal_worker_transitions(old: WorkerState, new: WorkerState) -> None:
    """A move the table does not list raises IllegalTransition naming both states."""
    with pytest.raises(IllegalTransition, match=f"{old.value} -> {new.value}"):
        check(WORKER_TRANSITIONS, old, new)


def test_supervisor_transitions() -> None:
    """Running drains then stops; stopping never goes back to serving; stopped is final."""
    assert check(SUPERVISOR_TRANSITIONS, S.RUNNING, S.DRAINING) is S.DRAINING
    assert check(SUPERVISOR_TRANSITIONS, S.DRAINING, S.STOPPING) is S.STOPPING
    assert check(SUPERVISOR_TRANSITIONS, S.STARTING, S.STOPPING) is S.STOPPING
    for old, new in [(S.STOPPING, S.RUNNING), (S.DRAINING, S.RUNNING), (S.STOPPED, S.STARTING),
                     (S.STARTING, S.DRAINING)]:  # fmt: skip
        with pytest.raises(IllegalTransition):
            check(SUPERVISOR_TRANSITIONS, old, new)


def test_backoff_delay_doubles_with_jitter_and_is_capped() -> None:
    """0 for the first failure, 0.1 s (+-50 %) for the second, doubling, at most 10 s x 1.5."""
    assert backoff_delay(0) == backoff_delay(1) == 0.0
    for _ in range(50):
        assert 0.05 <= backoff_delay(2) <= 0.15
        assert 0.1 <= backoff_delay(3) <= 0.3
        assert 5.0 <= backoff_delay(40) <= 15.0


def test_crash_window_counts_only_recent_failures() -> None:
    """Failures older than the window fall out of the count."""
    window = CrashWindow()
    assert [window.record(t, 10.0) for t in (0.0, 1.0, 2.0)] == [1, 2, 3]
    assert window.record(11.5, 10.0) == 2  # 0.0 and 1.0 are more than 10 s old
    assert window.record(100.0, 10.0) == 1


def test_a_wait_status_in_fields_and_words() -> None:
    """A wait status becomes exit_code or signal, and words; a real-time signal, which
    signal.Signals does not name, is named too (a worker killed by one must not fail the
    supervisor that reaps it)."""
    assert signals.status_fields(0) == {"exit_code": 0}
    assert signals.status_fields(3 << 8) == {"exit_code": 3}
    assert signals.status_fields(9) == {"signal": "SIGKILL"}
    assert signals.status_words(3 << 8) == "exited with 3"
    assert signals.status_words(9) == "was killed by SIGKILL"
    rt = signal.SIGRTMIN + 5
    assert signals.status_fields(rt) == {"signal": "SIGRTMIN+5"}
    assert signals.status_words(rt) == "was killed by SIGRTMIN+5"
    assert signals.name(signal.SIGRTMIN) == "SIGRTMIN"
    assert signals.name(signal.SIGRTMAX) == "SIGRTMAX"
    assert signals.ended_by(0) is None


def test_totals_never_go_backwards_across_a_restart() -> None:
    """A gone worker's last report stays in the sum; a lower report keeps the highest."""
    totals = Totals()
    totals.report(1, {"opened": 5, "bytes_in": 100})
    totals.report(2, {"opened": 3})
    assert totals.snapshot() == {"bytes_in": 100, "opened": 8}
    totals.gone(1)
    totals.report(3, {"opened": 1})  # worker 1's replacement starts from zero
    assert totals.snapshot() == {"bytes_in": 100, "opened": 9}
    totals.report(2, {"opened": 2})  # lower than before: ignored
    assert totals.snapshot()["opened"] == 9
    totals.gone(2)
    totals.gone(3)
    totals.gone(99)  # never reported: nothing to add
    assert totals.snapshot() == {"bytes_in": 100, "opened": 9}


def test_config_changes_names_each_changed_setting() -> None:
    """Only the settings that differ, as [old, new] strings."""
    old = default_config()
    new = dataclasses.replace(old, mode="process", port=7)
    assert config_changes(old, new) == {"mode": ["thread", "process"], "port": ["9999", "7"]}
    assert config_changes(old, old) == {}


def test_reload_outcome_follows_each_request() -> None:
    """pending until the awaited generation serves; a failure keeps its reason and code; a
    late readiness or failure of a finished request changes nothing."""
    outcome = ReloadOutcome()
    assert (outcome.serial, outcome.result) == (0, None)
    outcome.requested()
    outcome.starting(2)
    assert outcome.pending and not outcome.served(1)
    assert outcome.served(2) and (outcome.result, outcome.exit_code) == ("ok", 0)
    assert not outcome.failed("late", 70) and outcome.result == "ok"
    outcome.requested()
    assert outcome.failed("port in use", exitcodes.EX_UNAVAILABLE)
    assert (outcome.serial, outcome.result, outcome.error) == (2, "failed", "port in use")
    assert not outcome.served(5)


def test_status_file_round_trip_and_mode(tmp_path: Path) -> None:
    """write then read gives the same Status; the file is 0644 even under umask 077; a
    file that is not a status reads as None."""
    published = status.Status(
        pid=1, version="x", state="draining", started=1.5, mode="async",
        addresses=["127.0.0.1:7"], config_file=None, open=1, served=2, reloads=0,
        generation=1, workers=[status.WorkerStatus(1, 2, 1, "running", 1)],
        reload_serial=3, reload_result="failed", reload_error="why", reload_exit_code=78,
    )  # fmt: skip
    path = str(tmp_path / "echod.status")
    old = os.umask(0o077)
    try:
        assert status.write(path, published)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert status.read(path) == published
    assert os.listdir(tmp_path) == ["echod.status"]  # no temporary file left
    for text in ("", "[]", "{}", '{"pid": 1}', "not json"):
        Path(path).write_text(text)
        assert status.read(path) is None
    assert status.read(str(tmp_path / "missing")) is None
    assert not status.write(str(tmp_path / "no" / "dir"), published)


def test_status_path_is_beside_the_pidfile() -> None:
    """/run/echod/echod.pid publishes /run/echod/echod.status."""
    assert status.path_for("/run/echod/echod.pid") == "/run/echod/echod.status"


def test_one_definition_of_the_modes_and_signals() -> None:
    """Every configured mode has its worker class; the fork mask is the supervisor's set;
    the worker handles none that it ignores."""
    for mode in MODES:
        assert worker_class(mode).mode == mode
    assert module_name("async") == "echod.workers.async_"
    with pytest.raises(ValueError, match="not a mode"):
        module_name("sideways")
    assert frozenset(signals.SUPERVISOR) == signals.FORK_BLOCKED
    assert set(signals.WORKER) <= signals.FORK_BLOCKED
    assert not set(signals.WORKER) & set(signals.WORKER_IGNORED)


def test_operator_errors_share_one_base() -> None:
    """A configuration error is an OperatorError that exits 78."""
    error = ConfigError("bad", path="/x.yaml", line=2)
    assert isinstance(error, OperatorError)
    assert (str(error), error.exit_code) == ("/x.yaml:2: bad", exitcodes.EX_CONFIG)


def test_totals_survive_a_dump_and_load() -> None:
    """What an upgrade hands over gives the same snapshot, and goes on counting the same."""
    totals = Totals()
    totals.report(1, {"opened": 5})
    totals.report(2, {"opened": 3, "bytes_in": 7})
    totals.gone(1)
    again = Totals.load(json.loads(json.dumps(totals.dump())))
    assert again.snapshot() == totals.snapshot() == {"bytes_in": 7, "opened": 8}
    again.report(2, {"opened": 4})
    again.gone(2)
    assert again.snapshot() == {"bytes_in": 7, "opened": 9}
    for bad in ({}, {"gone": [], "live": {}}, {"gone": {"a": "x"}, "live": {}}):
        with pytest.raises(ValueError, match="not a totals dump"):
            Totals.load(bad)


def handed_state() -> handover.Handover:
    return handover.Handover(
        from_version="1", config_path="/etc/echod.yaml", pidfile_required=False, started=1.0,
        started_wall=2.0, generation=3, reloads=2, reload_serial=4,
        listeners=[handover.HandedListener("::", 7, False, None, [5], [6])],
        udp_enabled=True, adopted=False, pidfile_path="/run/p", pidfile_fd=4,
        pool=handover.PoolState(
            serial=7,
            workers=[handover.HandedWorker(1, 7, 3, 99, 8, "async", "running", 1.5, 1, 2, 3, 4)],
            gone_served=1, gone_finished=1, gone_cut=0, crashes=[0.5], restarts=2,
            totals={"gone": {}, "live": {}},
        ),
        log_drops_fd=9, pending_signals=[15], log_mailbox=[10, 11],
    )  # fmt: skip


def test_handover_round_trip_and_garbage() -> None:
    """An upgrade's state reads back as it was written; anything else is a ValueError."""
    state = handed_state()
    assert handover.Handover.from_json(state.to_json()) == state
    assert sorted(state.descriptors()) == [4, 5, 6, 8, 9, 10, 11]
    for bad in (b"", b"[]", b"{}", b'{"workers": [{"pid": 1}]}', b'{"format": 99}'):
        with pytest.raises(ValueError, match="unreadable upgrade state"):
            handover.Handover.from_json(bad)


def test_handover_to_an_older_image_leaves_out_what_it_cannot_read() -> None:
    """Format 1 (echod 0.1.0) is the flat state without the drop counts, the pending
    signals and the restart count: exactly the keys that version's reader takes."""
    written = json.loads(handed_state().to_json(1))
    assert set(written) == {
        "from_version", "config_path", "pidfile_required", "started", "started_wall",
        "generation", "serial", "reloads", "reload_serial", "host", "port", "udp_enabled",
        "adopted", "tcp", "udp", "pidfile_path", "pidfile_fd", "workers", "gone_served",
        "gone_finished", "gone_cut", "crashes", "totals",
    }  # fmt: skip
    again = handover.Handover.from_json(json.dumps(written).encode())  # and we read it
    assert (again.log_drops_fd, again.pending_signals, again.pool.restarts) == (None, [], 0)
    assert again.pool.workers == handed_state().pool.workers
    assert again.listeners == handed_state().listeners


def test_handover_format_2_has_one_listener_and_no_mailbox() -> None:
    """Format 2 is format 1 and the drop counts, pending signals and restart count: one
    listener (host, port, and every socket in tcp and udp), no log mailbox; read back, it
    is one listener holding every socket."""
    state = handed_state()
    state.listeners.append(handover.HandedListener("127.0.0.1", 9, False, 64, [12], []))
    written = json.loads(state.to_json(2))
    assert written["format"] == 2
    assert (written["host"], written["port"], written["tcp"], written["udp"]) == (
        "::", 7, [5, 12], [6],
    )  # fmt: skip
    assert not {"listeners", "log_mailbox"} & set(written)
    assert {"log_drops_fd", "pending_signals", "restarts"} <= set(written)
    again = handover.Handover.from_json(json.dumps(written).encode())
    assert again.listeners == [handover.HandedListener("::", 7, False, None, [5, 12], [6])]
    assert again.log_mailbox is None


def test_handover_format_3_keeps_every_listener_and_its_options() -> None:
    """Format 3 hands each entry over with its ipv6_only and backlog and its own sockets."""
    state = handed_state()
    state.listeners.append(handover.HandedListener("::1", 0, True, 64, [12], [13]))
    written = json.loads(state.to_json())
    assert written["format"] == handover.FORMAT == 3
    assert not {"host", "port", "tcp", "udp"} & set(written)
    assert handover.Handover.from_json(state.to_json()) == state
    assert sorted(state.descriptors()) == [4, 5, 6, 8, 9, 10, 11, 12, 13]


def test_execute_refuses_an_older_image_while_signals_are_pending() -> None:
    """An image that cannot take pending signals (format 1) is not executed while there
    are any: the upgrade fails and the signals come back to be acted on."""
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK)
    try:
        os.write(write_fd, bytes([signal.SIGTERM]))
        reason, pending = handover.execute(
            lambda _pending: handed_state(), ["/nonexistent"], {}, read_fd, fmt=1
        )
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert pending == [signal.SIGTERM]
    assert "signals came during the upgrade" in reason


def test_a_failed_exec_hands_back_the_pending_signals() -> None:
    """The signals read off the wakeup pipe before the exec are returned when it fails."""
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK)
    try:
        os.write(write_fd, bytes([signal.SIGHUP, signal.SIGTERM]))
        reason, pending = handover.execute(
            lambda _pending: handed_state(), ["/nonexistent/python"], {}, read_fd
        )
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert reason.startswith("cannot execute /nonexistent/python")
    assert pending == [signal.SIGHUP, signal.SIGTERM]


def test_the_upgrade_signal_is_the_supervisors_alone() -> None:
    """SIGUSR2 upgrades the supervisor; a worker ignores it (it reaches the process group)."""
    assert signals.SUPERVISOR[signal.SIGUSR2] is signals.Action.UPGRADE
    assert signal.SIGUSR2 in signals.WORKER_IGNORED
