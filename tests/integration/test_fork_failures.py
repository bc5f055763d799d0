"""A worker that cannot be forked: the task limit of a pids cgroup (what systemd's TasksMax
sets), or a descriptor limit that leaves no room for its control channel. The daemon serves on
with the workers it has: a respawn is tried again after a backoff and fills the slot once
forking works again; a reload fails, and the generation before serves on; only the first
start ends, with exit 71 and the reason.

The tests of a task limit skip where no pids cgroup can be made (see tests/cgroups.py).
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from echod import exitcodes, status
from tests.cgroups import Cgroup, cgroup
from tests.integration.test_upgrade import Installed
from tests.support import (
    Echod,
    connect_to,
    echo_roundtrip,
    free_port,
    open_descriptors,
    refused,
    run_echod,
    running_workers,
    thread_count,
    wait_for,
    wait_workers,
)

pytestmark = pytest.mark.timeout(90)

#: The mode under the limits: an async worker serves a new client without a new task, so
#: the worker that is left serves while no task can be started.
MODE = "async"


def assert_no_internal_error(server: Echod) -> None:
    assert not server.events("internal_error")
    assert "Traceback" not in server.stderr_path.read_text()


def published(server: Echod) -> status.Status:
    path = status.path_for(server.settings["pidfile"])
    return wait_for(lambda: status.read(path), what="the status file")  # type: ignore[no-any-return]


@contextlib.contextmanager
def started_in_cgroup(tmp_path: Path, **settings: object) -> Iterator[tuple[Echod, Cgroup]]:
    """An echod whose supervisor (and so every process it forks) runs in a pids cgroup of
    its own; killed, and the cgroup removed, afterwards."""
    with cgroup("pids") as group:
        server = Echod(tmp_path, mode=MODE, **settings)
        try:
            server.start(preexec_fn=group.join_fn())
            yield server, group
        finally:
            server.kill()


# -- a respawn -------------------------------------------------------------------------------------


def kill_one_without_room(
    server: Echod, no_room: Callable[[int], None], room: Callable[[], None], shortage: str
) -> None:
    """Of two workers, SIGKILL one after ``no_room(victim)`` left none for its successor:
    the daemon stays up and says so (worker_spawn_failed, at warning, with the slot and the
    ``shortage``), the other worker serves on, the slot is tried again after a backoff;
    after ``room()`` it is filled again, and the daemon stops cleanly."""
    workers = wait_workers(server, 2)
    (victim_index, victim), (other_index, other) = sorted(workers.items())
    no_room(victim)
    os.kill(victim, signal.SIGKILL)

    failed = server.wait_event("worker_spawn_failed")
    assert failed["level"] == "warning"
    assert (failed["worker"], failed["generation"]) == (victim_index, 1)
    assert failed["error"].startswith(f"cannot start worker {victim_index} of generation 1: ")
    assert shortage in failed["error"]
    assert failed["delay"] > 0  # never at once: a fork refused now is refused again now
    lost = server.wait_event(
        "worker_state", lambda e: e["worker_pid"] == victim and e["state"] == "failed"
    )
    assert lost["signal"] == "SIGKILL"
    assert running_workers(server) == {other_index: other}
    with server.connect() as sock:
        assert echo_roundtrip(sock, b"served on") == b"served on"
    server.wait_event("worker_spawn_failed", count=2)  # tried again, after its backoff

    room()
    successor = server.wait_event(
        "worker_state",
        lambda e: (
            e["worker"] == victim_index and e["state"] == "running" and e["worker_pid"] != victim
        ),
    )
    assert running_workers(server) == {victim_index: successor["worker_pid"], other_index: other}
    with server.connect() as sock:
        assert echo_roundtrip(sock, b"whole again") == b"whole again"
    assert_no_internal_error(server)
    assert server.stop() == 0


def test_a_respawn_that_cannot_fork_is_tried_again_until_it_can(tmp_path: Path) -> None:
    """Under a task limit with no room left once a worker is gone, its respawn cannot fork:
    the daemon serves on with the other worker, and fills the slot once the limit is
    lifted (kill_one_without_room)."""
    with started_in_cgroup(tmp_path, workers=2) as (server, group):

        def no_room(victim: int) -> None:
            # What is left once the victim is gone, and not one task more.
            group.set_pids_max(group.tasks() - thread_count(victim))

        kill_one_without_room(server, no_room, lambda: group.set_pids_max(None), "task limit")
        assert group.pids_max_hits() > 0


def test_a_respawn_without_descriptors_for_its_channel_is_tried_again(tmp_path: Path) -> None:
    """With the supervisor's soft RLIMIT_NOFILE at its lowest free descriptor, a dead worker's
    control channel (a socketpair) cannot be made: treated as a fork that failed
    (kill_one_without_room)."""
    server = Echod(tmp_path, mode=MODE, workers=2)
    try:
        server.start()
        before = resource.prlimit(server.pid, resource.RLIMIT_NOFILE)

        def no_room(_victim: int) -> None:
            # Not one free descriptor below the limit: once the victim's channel is closed,
            # one at most, and a socketpair takes two.
            in_use = set(open_descriptors(server.pid))
            lowest_free = next(fd for fd in range(len(in_use) + 1) if fd not in in_use)
            resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (lowest_free, before[1]))

        def room() -> None:
            resource.prlimit(server.pid, resource.RLIMIT_NOFILE, before)

        kill_one_without_room(server, no_room, room, "out of file descriptors (socketpair")
    finally:
        server.kill()


# -- a reload, an upgrade --------------------------------------------------------------------------


def test_a_reload_that_cannot_fork_its_workers_fails_and_the_old_ones_serve_on(
    tmp_path: Path,
) -> None:
    """With room for one task more, a reload to another port forks the first worker of its
    generation and not the second. The reload fails visibly (reload_failed with the reason;
    failed, exit 71, in the status file), the new worker is stopped again and the new port
    closed (it goes as a retired worker goes: it takes nothing queued and cuts nothing), the
    old generation serves on on the old port; once the limit is lifted the next
    reload binds that port again and serves, in a generation of its own."""
    pidfile = str(tmp_path / "echod.pid")
    with started_in_cgroup(tmp_path, workers=2, pidfile=pidfile) as (server, group):
        old = wait_workers(server, 2)
        old_addresses = [f"127.0.0.1:{server.port}"]
        new_port = free_port()
        group.set_pids_max(group.tasks() + 1)
        server.write_config(port=new_port)
        server.signal(signal.SIGHUP)

        failed = server.wait_event("reload_failed")
        assert failed["level"] == "error"
        assert failed["error"].startswith("cannot start worker 2 of generation 2: task limit")
        spawn = server.wait_event("worker_spawn_failed")
        assert (spawn["worker"], spawn["generation"]) == (2, 2)
        server.wait_event("worker_state", lambda e: e["generation"] == 2 and e["state"] == "exited")
        new = [
            (e["worker"], e["state"]) for e in server.events("worker_state") if e["generation"] == 2
        ]
        assert new == [(1, "starting"), (1, "stopping"), (1, "exited")]
        # It went as a retired worker goes, not as in a stop's drain: it took nothing queued
        # on a socket, and would have cut nothing (timeout null).
        (abandoned,) = {e["worker_pid"] for e in server.events("worker_state")
                        if e["generation"] == 2}  # fmt: skip
        (draining,) = [e for e in server.events("worker_draining") if e["pid"] == abandoned]
        assert draining["timeout"] is None
        now = published(server)
        assert (now.reload_result, now.reload_exit_code) == ("failed", exitcodes.EX_OSERR)
        assert now.reload_error == failed["error"]
        assert (now.generation, now.reloads, now.addresses) == (1, 0, old_addresses)
        assert refused("127.0.0.1", new_port)
        assert {(w.index, w.pid, w.generation, w.state) for w in now.workers} == {
            (index, pid, 1, "running") for index, pid in old.items()
        }
        assert running_workers(server) == old
        with server.connect() as sock:
            assert echo_roundtrip(sock, b"old generation") == b"old generation"
        assert server.events("conn_open")[-1]["pid"] in old.values()
        assert group.pids_max_hits() > 0

        group.set_pids_max(None)
        server.signal(signal.SIGHUP)
        wait_for(lambda: published(server).reload_result == "ok", what="the next reload")
        assert published(server).generation == 3
        with connect_to("127.0.0.1", new_port) as sock:
            assert echo_roundtrip(sock, b"new port") == b"new port"
        assert_no_internal_error(server)
        assert server.stop() == 0


def test_a_failed_reload_puts_back_the_supervisors_log_and_limits(tmp_path: Path) -> None:
    """A reload that moves the log to another file and cannot fork its workers: the
    supervisor writes to the first file again (the failure said there, and what follows),
    and the limits set at run time hold again, as before the reload."""
    pidfile = str(tmp_path / "echod.pid")
    with started_in_cgroup(tmp_path, workers=2, pidfile=pidfile) as (server, group):
        wait_workers(server, 2)
        config = str(server.config_path)
        assert run_echod("set", "max_connections_per_ip", "5", "--config", config).returncode == 0
        first = dict(server.settings["log"])  # type: ignore[call-overload]
        other = tmp_path / "other.log"
        server.write_config(log={**first, "file": str(other)})
        group.set_pids_max(group.tasks() + 1)
        server.signal(signal.SIGHUP)
        failed = server.wait_event("reload_failed")  # (read from the first file)
        assert failed["pid"] == server.pid
        status = run_echod("status", "--config", config).stdout
        assert "set:         max_connections_per_ip 5" in status, status
        group.set_pids_max(None)
        server.write_config(log=first)
        server.signal(signal.SIGHUP)
        wait_for(lambda: published(server).reload_result == "ok", what="the next reload")
        assert server.events("reload")[-1]["generation"] == 3  # logged in the first file
        assert "reload_failed" not in other.read_text()
        assert_no_internal_error(server)
        assert server.stop() == 0


def test_an_upgrade_whose_new_workers_cannot_fork_fails_and_the_adopted_ones_serve_on(
    tmp_path: Path,
) -> None:
    """The supervisor alone moved into a pids cgroup (its workers stay outside) with room for
    one task more: the upgrade's check runs and exits, the new image adopts the workers and
    forks the first of its generation, not the second. `echod upgrade` exits 71 with the
    reason, upgrade_failed says it, the adopted generation serves on; once the limit is
    lifted the upgrade goes through."""
    with cgroup("pids") as group:
        server = Installed(tmp_path, mode=MODE, workers=2)
        try:
            server.start()
            old = wait_workers(server, 2)
            group.add(server.pid)
            group.set_pids_max(group.tasks() + 1)

            result = server.upgrade()
            assert result.returncode == exitcodes.EX_OSERR, result
            assert result.stderr.startswith(
                "echod: upgrade failed: cannot start worker 2 of generation 2: task limit"
            )
            failed = server.wait_event("upgrade_failed")
            assert failed["generation"] == 1
            server.wait_event(
                "worker_state", lambda e: e["generation"] == 2 and e["state"] == "exited"
            )
            now = server.published()
            assert (now.generation, now.reload_result) == (1, "failed")
            assert running_workers(server) == old
            with server.connect() as sock:
                assert echo_roundtrip(sock, b"adopted") == b"adopted"

            group.set_pids_max(None)
            assert server.upgrade().returncode == 0
            assert server.published().generation == 2
            assert_no_internal_error(server)
            assert server.stop() == 0
        finally:
            server.kill()


# -- the first start -------------------------------------------------------------------------------


def test_a_first_start_that_cannot_fork_ends_with_exit_71_and_says_why(tmp_path: Path) -> None:
    """Room for the supervisor and one worker of two: the second cannot fork. echod ends
    with EX_OSERR (71) and start_failed saying why, the worker that started is stopped
    (nothing is left in the cgroup), and there is no internal error."""
    with cgroup("pids") as group:
        group.set_pids_max(2)
        server = Echod(tmp_path, mode=MODE, workers=2)
        try:
            server.start(wait=False, preexec_fn=group.join_fn())
            assert server.proc is not None
            assert server.proc.wait(30) == exitcodes.EX_OSERR
            failed = server.wait_event("start_failed")
            assert failed["exit_code"] == exitcodes.EX_OSERR
            assert failed["error"].startswith("cannot start worker 2 of generation 1: task limit")
            assert server.events("worker_spawn_failed")[0]["worker"] == 2
            states = [(e["worker"], e["state"]) for e in server.events("worker_state")]
            assert states[0] == (1, "starting") and states[-1] == (1, "exited")
            assert server.events("stopped")[-1]["exit_code"] == exitcodes.EX_OSERR
            assert not group.pids()
            assert_no_internal_error(server)
        finally:
            server.kill()
