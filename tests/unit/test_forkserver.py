"""The connection source (echod.forkserver) and the worker's end of it, with real processes
and sockets: what it imports, how it forks, reports and ends, how it fails to start."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import echod
from echod import sinks
from echod.connection import SHUTDOWN
from echod.cutboard import CUT_REASONS, ChildStopper, CutBoard
from echod.handler import HandlerSettings
from echod.workers import forksource
from echod.workers.forksource import ForkSource, SourceLost, SourcePlan
from tests.support import children_of, is_fork_source

pytestmark = pytest.mark.timeout(60)

#: A fresh interpreter (run with -P, as the source is) finds this echod there.
ENV = {**os.environ, "PYTHONPATH": str(Path(echod.__file__).resolve().parent.parent)}

#: What a fork of the source must not pay for: modules whose at-fork handlers run Python in
#: every child (threading, logging), or that are large (structlog, PyYAML, asyncio).
HEAVY = ("threading", "logging", "structlog", "yaml", "asyncio", "subprocess")


def test_the_source_imports_nothing_heavy() -> None:
    """A fresh interpreter that imports echod.forkserver has none of HEAVY loaded."""
    probe = "import sys, echod.forkserver; print(sorted(sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-P", "-c", probe], capture_output=True, text=True, timeout=30,
        check=True, env=ENV,
    ).stdout  # fmt: skip
    modules = set(json.loads(loaded.replace("'", '"')))
    assert modules.isdisjoint(HEAVY), sorted(modules.intersection(HEAVY))


def log_spec(fd: int | None, path: str | None) -> dict[str, object]:
    return {"format": "json", "level": 20, "colors": False, "close_alone": False,
            "fd": fd, "path": path, "journal": None}  # fmt: skip


def settings() -> HandlerSettings:
    return HandlerSettings(
        mode="process", buffer_size=65536, idle_timeout=5.0, write_timeout=5.0,
        log_connections=True,
    )  # fmt: skip


@pytest.fixture
def source(tmp_path: Path) -> Iterator[tuple[ForkSource, Path]]:
    path = tmp_path / "echod.log"
    sink = sinks.FdSink.open_path(str(path))
    board = CutBoard()
    plan = SourcePlan(
        index=1, settings=settings(), board_fd=board.fileno(),
        drops_fd=sinks.counts().fileno(), mailbox_fd=None, oom_score=None,
        proxy_timeout=3.0, log=log_spec(sink.fileno(), str(path)),
    )  # fmt: skip
    forks = ForkSource.start(plan)
    try:
        yield forks, path
    finally:
        forks.close()
        _, status = os.waitpid(forks.pid, 0)  # the source exits once let go: ours to reap
        forks.closed()
        sink.close()
        assert os.waitstatus_to_exitcode(status) == 0


def exits_of(forks: ForkSource, count: int) -> list[tuple[int, int]]:
    """The first ``count`` exit reports, read as the worker reads them: when the exit
    channel is readable (within 10 s)."""
    found: list[tuple[int, int]] = []
    deadline = time.monotonic() + 10
    while len(found) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"exit reports: {found}"
        readable, _, _ = select.select([forks.exit_channel], [], [], left)
        if readable:
            found.extend(forks.exits())
            assert len(found) >= count or not forks.gone, f"the source went; reports: {found}"
    return found


def test_the_source_forks_serves_and_reports(source: tuple[ForkSource, Path]) -> None:
    """Asked to fork a connection, the source answers with the pid (and a pidfd) of a
    process that echoes it byte for byte and logs it with the worker as ppid; its exit
    comes back as a wait status, and the source exits once let go (the fixture's reap)."""
    forks, path = source
    ours, theirs = socket.socketpair()
    with ours, theirs:
        pid, pidfd = forks.fork(
            theirs, ["127.0.0.1", 40000], "1-1", slot=0, local=["127.0.0.1", 7], link=None,
            asks=False,
        )  # fmt: skip
        theirs.close()
        assert pidfd is not None  # the process itself, whatever its pid comes to mean
        signal.pidfd_send_signal(pidfd, 0)
        ours.settimeout(10)
        data = os.urandom(10_000)
        ours.sendall(data)
        got = b""
        while len(got) < len(data):
            got += ours.recv(65536)
        assert got == data
        ours.shutdown(socket.SHUT_WR)
        assert ours.recv(10) == b""
    assert exits_of(forks, 1) == [(pid, 0)]
    with pytest.raises(ProcessLookupError):  # reaped by the source: the pidfd says so
        signal.pidfd_send_signal(pidfd, 0)
    os.close(pidfd)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["event"] for line in lines] == ["conn_open", "conn_close"]
    assert {line["pid"] for line in lines} == {pid}
    assert {line["ppid"] for line in lines} == {os.getpid()}
    assert lines[1]["bytes_in"] == lines[1]["bytes_out"] == 10_000


def test_a_source_that_cannot_start_says_why(tmp_path: Path) -> None:
    """A cut board it cannot map (a pipe): the source says so and exits; the worker gets
    SourceLost with the reason, and no process is left behind. A descriptor that is not
    open at all fails in the worker, before any process starts."""
    read, write = os.pipe()
    plan = SourcePlan(
        index=1, settings=settings(), board_fd=read,
        drops_fd=sinks.counts().fileno(), mailbox_fd=None, oom_score=None,
        proxy_timeout=3.0, log=log_spec(write, None),
    )  # fmt: skip
    try:
        with pytest.raises(SourceLost, match=r"could not start: PermissionError: "):
            ForkSource.start(plan)
        with pytest.raises(SourceLost, match=r"did not start: .*Bad file descriptor"):
            ForkSource.start(dataclasses.replace(plan, board_fd=999))
    finally:
        os.close(read)
        os.close(write)
    # Each failed source was reaped (ForkSource.start waits for it): none left, not even as
    # a zombie.
    assert not [pid for pid in children_of(os.getpid()) if is_fork_source(pid)]


def test_a_source_of_another_protocol_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose messages are of another version than the source's code (a worker of
    an older echod after an upgrade replaced the files) gets SourceLost, not a source that
    misreads it."""
    monkeypatch.setattr(forksource, "PROTOCOL", 0)
    board = CutBoard()
    path = tmp_path / "echod.log"
    sink = sinks.FdSink.open_path(str(path))
    plan = SourcePlan(
        index=1, settings=settings(), board_fd=board.fileno(),
        drops_fd=sinks.counts().fileno(), mailbox_fd=None, oom_score=None,
        proxy_timeout=3.0, log=log_spec(sink.fileno(), str(path)),
    )  # fmt: skip
    try:
        with pytest.raises(SourceLost, match=r"ValueError: protocol 0 \(this source: 1\)"):
            ForkSource.start(plan)
    finally:
        sink.close()


def test_a_title_is_written_over_the_command_line() -> None:
    """CommandLine finds this process's command line where the kernel keeps it and writes a
    title over it, cut to the room there is: what /proc/PID/cmdline (ps) and comm show."""
    probe = (
        "import sys; from echod.proctitle import CommandLine\n"
        "line = CommandLine.find(); assert line is not None\n"
        "line.write('echod: connection 1-7'); short = open('/proc/self/cmdline', 'rb').read()\n"
        "line.write('x' * 1000); long = open('/proc/self/cmdline', 'rb').read()\n"
        "comm = open('/proc/self/comm').read()\n"
        "print(repr((short.rstrip(b'\\0'), len(short), len(long.rstrip(b'\\0')), comm)))"
    )
    out = subprocess.run(
        [sys.executable, "-P", "-c", probe, "padding"], capture_output=True, text=True,
        timeout=30, check=True, env=ENV,
    ).stdout  # fmt: skip
    short, size, long_size, comm = ast.literal_eval(out)
    assert short == b"echod: connection 1-7"
    assert long_size == size - 1  # cut, leaving the last byte NUL
    assert comm == "xxxxxxxxxxxxxxx\n"


def test_the_cut_board_says_whether_and_why() -> None:
    """The board, mapped again from its memfd as a connection source maps it, tells a
    process whether it was cut and why, with no signal: 0 is "not cut", every reason
    (the stop's included) is a cut; a process without a slot learns nothing from it."""
    board = CutBoard()
    slot = board.allocate()
    theirs = CutBoard(board.fileno())
    stopper = ChildStopper(None, theirs, slot)
    assert not stopper.cut_requested()
    for reason in CUT_REASONS:
        board.mark(slot, reason)
        assert stopper.cut_requested() and stopper.cut_reason() == reason
    board.clear(slot)  # (a spare process handed its next connection)
    assert not stopper.cut_requested()
    assert not ChildStopper(None, theirs, -1).cut_requested()
    assert theirs.reason(-1) == SHUTDOWN
