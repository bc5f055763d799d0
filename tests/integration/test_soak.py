"""Soak: 100 clients per mode stream verified data for a minute (ECHOD_SOAK_SECONDS) while the
test reloads the configuration, SIGKILLs a worker and rotates the log under the daemon.

Every mode runs at once, each on its own daemon, through the same timeline: SIGKILL the
busiest worker at a quarter of the time, SIGHUP at half, rename the log and SIGUSR1 at three
quarters. Clients whose connection the killed worker served see an EOF or an error and
reconnect; every other connection must return every byte it sent, unaltered.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from echod import exitcodes
from tests.support import (
    MODES,
    Echod,
    Stream,
    Streamers,
    connection_owners,
    event_time,
    running_workers,
    session_pids,
    wait_for,
    wait_workers,
)

SOAK_SECONDS = float(os.environ.get("ECHOD_SOAK_SECONDS", "60"))
CLIENTS = 100


def read_events(path: Path) -> list[dict[str, Any]]:
    """Every event in a log file; a torn or partial line fails the test."""
    return [json.loads(line) for line in path.read_text().splitlines()]


class Soak:
    """One daemon and its clients through the soak's timeline."""

    def __init__(self, tmp_path: Path, mode: str) -> None:
        tmp_path.mkdir()
        self.mode = mode
        self.server = Echod(
            tmp_path, mode=mode, workers=2, max_connections=110, backlog=256, idle_timeout=300
        )
        self.streams: Streamers | None = None
        self.originals: list[Stream] = []
        self.victim = 0
        self.victim_ports: set[int] = set()
        self.respawn = 0.0
        self.reopened_at = 0.0

    def start(self) -> None:
        self.server.start()
        wait_workers(self.server, 2)
        self.streams = Streamers(
            self.server.port, CLIENTS, chunk=4096, interval=0.05, reconnect=True, stall_after=10
        ).start()
        self.server.wait_event("conn_open", count=CLIENTS)

    def kill_a_worker(self) -> None:
        """SIGKILL the worker that serves the most clients."""
        assert self.streams is not None
        owners = connection_owners(self.server)
        self.originals = list(self.streams.streams)
        workers = running_workers(self.server)
        counts = {pid: sum(owners[s.port] == pid for s in self.originals)
                  for pid in workers.values()}
        index, self.victim = max(workers.items(), key=lambda item: counts[item[1]])
        self.victim_ports = {s.port for s in self.originals if owners[s.port] == self.victim}
        killed_at = time.time()
        os.kill(self.victim, signal.SIGKILL)
        running = self.server.wait_event(
            "worker_state",
            lambda e: e["worker"] == index and e["state"] == "running"
            and e["worker_pid"] != self.victim,
        )
        self.respawn = event_time(running) - killed_at

    def reload(self) -> None:
        self.server.write_config(idle_timeout=301)
        self.server.signal(signal.SIGHUP)
        reload = self.server.wait_event("reload")
        assert reload["changes"] == {"idle_timeout": ["300.0", "301.0"]}
        self.server.wait_event(
            "worker_state", lambda e: e["generation"] == 2 and e["state"] == "running", count=2
        )

    def rotate_log(self) -> None:
        os.rename(self.server.log_path, self.server.log_path.with_suffix(".log.1"))
        self.server.signal(signal.SIGUSR1)
        self.reopened_at = event_time(self.server.wait_event("log_reopened"))

    def finish(self) -> None:
        assert self.streams is not None
        streams = self.streams.finish()
        assert self.server.stop() == exitcodes.OK
        wait_for(lambda: not session_pids(self.server.pid), what="every echod process to exit")
        theirs = [s for s in self.originals if s.port in self.victim_ports]
        ours = [s for s in streams if s not in theirs]
        total = sum(s.received for s in streams)
        print(
            f"{self.mode}: {len(streams)} connections ({len(streams) - CLIENTS} reconnects), "
            f"{total / (1 << 20):.0f} MiB verified; worker with {len(theirs)} clients killed, "
            f"serving again in {self.respawn * 1000:.0f} ms"
        )
        assert theirs and ours
        for stream in streams:
            assert stream.corrupt_at is None, f"{self.mode}: byte {stream.corrupt_at} altered"
            assert not stream.stalled, f"{self.mode}: connection {stream.port} hung"
        for stream in ours:
            assert stream.ended is None and stream.eof, f"{self.mode}: {stream.ended}"
            assert stream.received == stream.sent > 0
        for stream in theirs:
            assert stream.ended in ("eof", "ConnectionResetError", "BrokenPipeError")
        assert self.respawn < 5.0  # at once, not after a backoff (printed above)
        self.check_logs()

    def check_logs(self) -> None:
        """Every connection opened is logged closed once, across both files; after the
        reopen nothing is written to the renamed file."""
        old = read_events(self.server.log_path.with_suffix(".log.1"))
        new = read_events(self.server.log_path)
        assert any(e["event"] == "log_reopened" for e in new)
        late = [e for e in old if event_time(e) > self.reopened_at + 1.0]
        assert not late, f"{self.mode}: written to the old file after the reopen: {late[:3]}"
        events = old + new
        opened = [e["conn_id"] for e in events if e["event"] == "conn_open"]
        closed = [e["conn_id"] for e in events if e["event"] == "conn_close"]
        assert len(set(opened)) == len(opened)
        # The connections the killed worker served (in process mode, its connection
        # processes, which die with it) could not log their close.
        lost = {e["conn_id"] for e in events if e["event"] == "conn_open"
                and self.victim in (e["pid"], e["ppid"])}
        assert len(lost) == len(self.victim_ports)
        assert sorted(closed) == sorted(set(opened) - lost)


def pace(start: float, fraction: float) -> None:
    """Let the soak run until ``fraction`` of its time has passed."""
    threading.Event().wait(max(0.0, start + SOAK_SECONDS * fraction - time.monotonic()))


@pytest.mark.timeout(SOAK_SECONDS + 120)
def test_soak_reload_kill_and_rotate_under_load(tmp_path: Path) -> None:
    """100 clients per mode stream for the soak's duration through a worker kill, a reload
    and a log rotation; no byte is lost or altered on connections the killed worker did not
    serve, its own end with EOF or an error and never hang, and no log line is lost."""
    soaks = [Soak(tmp_path / mode, mode) for mode in MODES]
    try:
        for soak in soaks:
            soak.start()
        start = time.monotonic()
        pace(start, 0.25)
        for soak in soaks:
            soak.kill_a_worker()
        pace(start, 0.5)
        for soak in soaks:
            soak.reload()
        pace(start, 0.75)
        for soak in soaks:
            soak.rotate_log()
        pace(start, 1.0)
        for soak in soaks:
            soak.finish()
    finally:
        for soak in soaks:
            soak.server.kill()
