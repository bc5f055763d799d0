"""SIGHUP reloads and SIGUSR1 log reopening, through a real echod process.

A reload must never drop or reset an open connection, whatever it changes (the mode, the
port); a broken edit must leave the old configuration serving and say why, with the message
``echod check-config`` prints; a log reopen must leave no process writing to the rotated
file and lose no line.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from echod import cli, status
from tests.support import (
    ROOT,
    Echod,
    children_of,
    descendants,
    echo_roundtrip,
    echod,
    echod_command,
    free_port,
    open_files,
    recv_exactly,
    refused,
    settled,
    wait_for,
)

MODES = ["thread", "process"] + (
    ["async"] if (ROOT / "echod" / "workers" / "async_.py").exists() else []
)
# Each mode reloads into the next one, and the last into the first.
MODE_CHANGES = [(MODES[i], MODES[(i + 1) % len(MODES)]) for i in range(len(MODES))]


class Pinger(threading.Thread):
    """Echoes numbered messages over one connection until stopped; records what went wrong.

    It runs while the reload happens, so an interruption of the echo (a reset, a close, a
    lost or reordered byte) is caught however briefly it lasts.
    """

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.done = threading.Event()
        self.rounds = 0
        self.error: str | None = None

    def run(self) -> None:
        for i in range(1_000_000):  # bounded; stopped by `done` long before
            if self.done.is_set():
                return
            message = f"ping {i:08d}\n".encode()
            try:
                self.sock.sendall(message)
                echoed = recv_exactly(self.sock, len(message))
            except OSError as exc:
                self.error = f"round {i}: {exc!r}"
                return
            if echoed != message:
                self.error = f"round {i}: sent {message!r}, got {echoed!r}"
                return
            self.rounds += 1

    def finish(self, at_least: int) -> int:
        """Let it run ``at_least`` more rounds, stop it, and return how many it made."""
        target = self.rounds + at_least
        wait_for(lambda: self.rounds >= target or self.error, what="more echo rounds")
        self.done.set()
        self.join(10)
        assert self.error is None, self.error
        return self.rounds


def check_config_message(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """What ``echod check-config`` says about ``path``, without the ``echod: `` prefix
    (run in this process: the same code as the command, without a Python start-up)."""
    capsys.readouterr()
    assert cli.main(["check-config", "--config", str(path)]) == 78
    captured = capsys.readouterr()
    line = captured.err.strip()
    assert captured.out == "" and line.startswith("echod: ") and "\n" not in line, line
    return line.removeprefix("echod: ")


def reloads(server: Echod) -> int:
    return len(server.events("reload"))


def generation_pids(server: Echod, generation: int) -> set[int]:
    return {
        e["worker_pid"]
        for e in server.events("worker_state")
        if e["generation"] == generation and e["state"] == "running"
    }


@pytest.mark.parametrize(("old_mode", "new_mode"), MODE_CHANGES)
def test_reload_changes_mode_and_port_without_dropping_a_connection(
    tmp_path: Path, old_mode: str, new_mode: str
) -> None:
    """A connection keeps echoing through a reload to another mode and port; the new port
    serves in the new mode, the old one stops accepting only once the new generation runs."""
    with echod(tmp_path, mode=old_mode, workers=2, idle_timeout=0) as server:
        old_port = server.port
        held = server.connect()
        pinger = Pinger(held)
        pinger.start()
        wait_for(lambda: pinger.rounds >= 20 or pinger.error, what="echo before the reload")

        new_port = free_port()
        server.write_config(mode=new_mode, port=new_port)
        server.signal(signal.SIGHUP)
        reload = server.wait_event("reload")
        assert reload["generation"] == 2
        assert reload["changes"]["mode"] == [old_mode, new_mode]
        assert reload["changes"]["port"] == ["0", str(new_port)]
        server.wait_event("worker_state", lambda e: e["state"] == "retiring", count=2)

        with socket.create_connection(("127.0.0.1", new_port), timeout=10) as fresh:
            assert echo_roundtrip(fresh, b"new port\n" * 1000) == b"new port\n" * 1000
        fresh_open = server.wait_event("conn_open", lambda e: e["local_port"] == new_port)
        assert fresh_open["mode"] == new_mode
        wait_for(lambda: refused("127.0.0.1", old_port), what="old port closed")
        pinger.finish(at_least=50)  # the held connection still echoes after all that

        # The old workers stopped accepting only after every new worker was running.
        events = server.events()
        new_running = [
            i
            for i, e in enumerate(events)
            if e.get("event") == "worker_state" and e["generation"] == 2 and e["state"] == "running"
        ]
        old_draining = [
            i
            for i, e in enumerate(events)
            if e.get("event") == "worker_draining" and e["pid"] in generation_pids(server, 1)
        ]
        assert len(new_running) == 2
        assert old_draining and min(old_draining) > max(new_running)

        held.shutdown(socket.SHUT_WR)
        assert held.recv(1) == b""
        held.close()
        close = server.wait_event("conn_close", lambda e: e["local_port"] == old_port)
        assert close["reason"] == "client_closed"
        assert close["mode"] == old_mode
        # With its last connection over, the old generation exits and is not replaced.
        server.wait_event(
            "worker_state", lambda e: e["generation"] == 1 and e["state"] == "exited", count=2
        )
        wait_for(
            lambda: set(children_of(server.pid)) == generation_pids(server, 2),
            what="only the new generation left",
        )
        assert not [e for e in server.events("worker_state") if e["state"] == "failed"]


@pytest.mark.parametrize("mode", MODES)
def test_connections_queued_on_the_old_port_are_served_not_reset(tmp_path: Path, mode: str) -> None:
    """Clients still waiting in the old port's backlog when the reload retires its worker
    are accepted and echoed: closing that listener would otherwise reset them."""
    with echod(tmp_path, mode=mode) as server:
        (old_worker,) = generation_pids(server, 1)
        os.kill(old_worker, signal.SIGSTOP)  # so that the clients stay queued
        try:
            queued = [server.connect() for _ in range(40)]
            server.write_config(port=free_port())
            server.signal(signal.SIGHUP)
            server.wait_event("worker_state", lambda e: e["state"] == "retiring")
        finally:
            os.kill(old_worker, signal.SIGCONT)
        for i, sock in enumerate(queued):
            with sock:
                message = f"queued {i}".encode()
                assert echo_roundtrip(sock, message) == message
        server.wait_event("conn_close", count=40)
        assert {e["reason"] for e in server.events("conn_close")} == {"client_closed"}


BROKEN_EDITS: dict[str, str] = {
    "syntax": "mode: thread\nport: [1\n",
    "bad_value": "mode: thread\nport: 70000\n",
    "unknown_key": "mode: thread\nprot: 7\n",
}


@pytest.mark.parametrize("mode", MODES)
def test_broken_edits_keep_the_old_configuration(
    tmp_path: Path, mode: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A syntax error, a bad value, an unknown key and a port in use each give a
    reload_failed event with check-config's message; the old configuration keeps serving."""
    with echod(tmp_path, mode=mode) as server, server.connect() as held:
        held.sendall(b"before")
        assert recv_exactly(held, 6) == b"before"
        good = server.config_path.read_text()
        for count, (name, text) in enumerate(BROKEN_EDITS.items(), start=1):
            server.config_path.write_text(text)
            expected = check_config_message(server.config_path, capsys)
            server.signal(signal.SIGHUP)
            failed = server.wait_event("reload_failed", count=count)
            assert failed["error"] == expected, name
            assert failed["config_file"] == str(server.config_path)

        with socket.socket() as occupier:
            occupier.bind(("127.0.0.1", 0))
            occupier.listen()
            busy = occupier.getsockname()[1]
            server.config_path.write_text(good)
            server.write_config(port=busy, mode="process" if mode == "thread" else "thread")
            server.signal(signal.SIGHUP)
            failed = server.wait_event("reload_failed", count=len(BROKEN_EDITS) + 1)
        assert failed["error"] == f"cannot listen on tcp 127.0.0.1:{busy}: address already in use"

        assert reloads(server) == 0
        held.sendall(b"after")
        assert recv_exactly(held, 5) == b"after"
        with server.connect() as fresh:
            assert echo_roundtrip(fresh, b"still serving") == b"still serving"
        assert {e["mode"] for e in server.events("conn_open")} == {mode}
        assert len(children_of(server.pid)) == 1


def test_quick_reloads_do_not_leak_workers_or_descriptors(tmp_path: Path) -> None:
    """Reloads sent before the previous one finished (changing mode and port each time)
    leave exactly the last generation's workers, and the supervisor's descriptors as before."""
    with echod(tmp_path, mode="thread", workers=2) as server:
        # (Settled: just after ready the supervisor may still hold a descriptor of its start.)
        fds_before = settled(lambda: len(open_files(server.pid)))
        rounds = 8
        for i in range(1, rounds + 1):
            server.write_config(mode=MODES[i % len(MODES)], port=free_port())
            server.signal(signal.SIGHUP)
            # Do not wait for the generation to be ready: the next reload overtakes it.
            server.wait_event("reload", count=i)
        last = server.events("reload")[-1]["generation"]
        assert last == rounds + 1
        final_port = server.settings["port"]

        def only_the_last() -> bool:
            newest = generation_pids(server, last)
            return len(newest) == 2 and set(children_of(server.pid)) == newest

        wait_for(only_the_last, what="only the last generation's two workers")
        wait_for(lambda: len(open_files(server.pid)) == fds_before, what="descriptors back")
        with socket.create_connection(("127.0.0.1", final_port), timeout=10) as sock:
            assert echo_roundtrip(sock, b"last") == b"last"
        assert not [e for e in server.events("worker_state") if e["state"] == "failed"]
        exited = [e for e in server.events("worker_state") if e["state"] == "exited"]
        assert len(exited) == rounds * 2


def log_holders(server: Echod, path: Path) -> list[int]:
    """The echod processes (supervisor and all below it) with ``path`` open."""
    pids = [server.pid, *descendants(server.pid)]
    return [pid for pid in pids if str(path) in open_files(pid)]


@pytest.mark.parametrize("mode", MODES)
def test_sigusr1_after_rotation_moves_every_process_to_the_new_file(
    tmp_path: Path, mode: str
) -> None:
    """After the log is renamed and SIGUSR1 sent, no process (supervisor, workers, open
    connection processes) writes to the rotated file, and no event is lost."""
    # One connection per worker at most, so that each worker holds one connection open.
    with echod(tmp_path, mode=mode, workers=2, max_connections=2) as server:
        rotated = tmp_path / "echod.log.1"
        held = [server.connect() for _ in range(2)]
        for sock in held:
            sock.sendall(b"x")
            assert recv_exactly(sock, 1) == b"x"
        server.wait_event("conn_open", count=2)
        serving = {e["pid"] if mode != "process" else e["ppid"] for e in server.events("conn_open")}
        assert len(serving) == 2  # both workers hold a connection

        # Short connections keep every process logging while the file is rotated.
        churned: list[int] = []
        stop = threading.Event()

        def churn() -> None:
            for _ in range(10_000):
                if stop.is_set():
                    return
                try:
                    with server.connect() as sock:
                        sock.sendall(b"c")
                        sock.shutdown(socket.SHUT_WR)
                        if sock.recv(1) == b"c":
                            churned.append(1)
                except OSError:
                    return

        # Both workers are full, so the churn waits in the backlog: let one go first.
        held.pop().close()
        churner = threading.Thread(target=churn, daemon=True)
        churner.start()
        wait_for(lambda: len(churned) >= 5, what="churn before the rotation")
        os.rename(server.log_path, rotated)
        holders = log_holders(server, rotated)
        assert server.pid in holders and len(holders) >= 3  # supervisor, workers (, children)
        server.signal(signal.SIGUSR1)
        wait_for(lambda: server.events("log_reopened"), what="log_reopened in the new file")
        wait_for(
            lambda: not log_holders(server, rotated), what="no process holding the rotated file"
        )
        rotated_size = rotated.stat().st_size
        wait_for(lambda: len(server.events("conn_open")) >= 5, what="churn after the rotation")
        stop.set()
        churner.join(20)
        assert not churner.is_alive()
        for sock in held:  # its connection process was open all through the rotation
            sock.close()

        total = 2 + len(churned)
        server.stop()
        assert server.proc is not None and server.proc.returncode == 0

    # Nothing was written to the rotated file once every process had let go of it ...
    assert rotated.stat().st_size == rotated_size
    names_old = [e["event"] for e in read_events(rotated)]
    names_new = [e["event"] for e in server.events()]
    assert "log_reopened" not in names_old
    assert "stopped" in names_new
    # ... and across the two files, every connection was logged opening and closing once.
    assert names_old.count("conn_open") + names_new.count("conn_open") == total
    assert names_old.count("conn_close") + names_new.count("conn_close") == total


def read_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


# -- `echod reload` waits for the outcome ------------------------------------------------


def reload_cli(server: Echod, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``echod reload`` for ``server`` to completion; no traceback, whatever happens."""
    result = subprocess.run(
        echod_command("reload", "--config", str(server.config_path), *args),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "ECHOD_CONFIG"},
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert "Traceback" not in result.stdout + result.stderr, result
    return result


def published(server: Echod) -> status.Status:
    found = status.read(status.path_for(server.settings["pidfile"]))
    assert found is not None
    return found


def test_reload_command_returns_once_the_new_configuration_serves(tmp_path: Path) -> None:
    """`echod reload` exits 0 only after the new generation is ready: when it returns, the
    status shows every new worker running, and a new client is served in the new mode."""
    pidfile = str(tmp_path / "echod.pid")
    with echod(tmp_path, mode="thread", workers=2, pidfile=pidfile) as server:
        server.write_config(mode="process")
        result = reload_cli(server)
        assert result.returncode == 0, result
        assert result.stdout == (
            f"echod: reloaded (pid {server.pid}, {server.config_path}): generation 2 serves\n"
        )
        now = published(server)
        assert (now.mode, now.generation, now.reload_result) == ("process", 2, "ok")
        new = [w for w in now.workers if w.generation == 2]
        assert [w.state for w in new] == ["running", "running"]
        with server.connect() as sock:
            assert echo_roundtrip(sock, b"new mode") == b"new mode"
        assert server.wait_event("conn_open")["mode"] == "process"


def test_reload_command_reports_what_the_daemon_refused(tmp_path: Path) -> None:
    """A valid file whose port is taken passes the command's check but not the daemon's:
    `echod reload` exits 69 with the daemon's reason; the old configuration serves on."""
    pidfile = str(tmp_path / "echod.pid")
    with echod(tmp_path, pidfile=pidfile) as server, socket.socket() as occupier:
        occupier.bind(("127.0.0.1", 0))
        occupier.listen()
        busy = occupier.getsockname()[1]
        server.write_config(port=busy)
        result = reload_cli(server)
        assert result.returncode == 69, result
        assert result.stdout == ""
        assert result.stderr == (
            f"echod: reload failed: cannot listen on tcp 127.0.0.1:{busy}: address already in "
            f"use (pid {server.pid}, {server.config_path}; still serving the previous "
            "configuration)\n"
        )
        assert published(server).reload_serial == 1
        with server.connect() as sock:
            assert echo_roundtrip(sock, b"old port") == b"old port"


def test_reload_command_gives_up_after_its_timeout(tmp_path: Path) -> None:
    """A daemon that cannot answer (stopped) makes `echod reload --timeout` exit 75 in
    about that time; once it runs again it carries the reload out."""
    pidfile = str(tmp_path / "echod.pid")
    with echod(tmp_path, pidfile=pidfile) as server:
        server.write_config(workers=2)
        os.kill(server.pid, signal.SIGSTOP)
        try:
            begun = time.monotonic()
            result = reload_cli(server, "--timeout", "0.5")
            took = time.monotonic() - begun
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert result.returncode == 75, result
        assert "did not report the reload's outcome within 0.5 s" in result.stderr
        assert 0.5 <= took < 10
        server.wait_event("reload")
        wait_for(lambda: published(server).reload_result == "ok", what="the reload to finish")
