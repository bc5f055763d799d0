"""The sinks under real write failures: a full tmpfs, /dev/full, a pipe whose reader left, a
full pipe, a descriptor not open for writing. Every failure drops the line whole and counts
it; nothing raises; writing resumes by itself."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from echod import sinks
from echod.sinks import DropCounts, DropWatch, Fallback, FdSink
from tests.support import in_child, mounted_tmpfs


@pytest.fixture
def drops(monkeypatch: pytest.MonkeyPatch) -> Iterator[DropCounts]:
    """Fresh shared counts for this test (the sinks count into the process's one)."""
    fresh = DropCounts.create()
    monkeypatch.setattr(sinks._held, "counts", fresh)
    yield fresh
    fresh.close()


@pytest.fixture
def full_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs, mounted for this test (needs root)."""
    with mounted_tmpfs(tmp_path / "tmpfs", "64k") as mount:
        yield mount


def line_of(n: int, size: int = 300) -> str:
    """A JSON line of about ``size`` characters that says which it is."""
    return json.dumps({"n": n, "pad": "x" * size})


def test_a_full_file_system_drops_whole_lines_and_counts_them(
    full_tmpfs: Path, drops: DropCounts
) -> None:
    """Writing past the end of the space: each line is in the file whole or not at all (a
    part written before the space ran out is cut off again), the file ends with a line
    break, and every line not there is counted as no_space."""
    sink = FdSink.open_path(str(full_tmpfs / "echod.log"))
    try:
        for n in range(400):  # 400 x ~320 bytes: twice the space
            sink.write(line_of(n))
    finally:
        os.close(sink.fileno() or -1)
    data = (full_tmpfs / "echod.log").read_bytes()
    assert data.endswith(b"\n")
    written = [json.loads(line)["n"] for line in data.splitlines()]
    assert written == list(range(len(written)))  # whole, in order, none torn
    assert 100 < len(written) < 400
    assert drops.snapshot()["no_space"] == 400 - len(written)
    assert drops.total() == 400 - len(written)
    assert drops.failing
    assert drops.last_error() == os.strerror(errno.ENOSPC)


def test_writing_resumes_when_space_returns(full_tmpfs: Path, drops: DropCounts) -> None:
    """Once space is freed the next line is written, and the recovery is recorded."""
    (full_tmpfs / "filler").write_bytes(b"\0" * 60_000)
    sink = FdSink.open_path(str(full_tmpfs / "echod.log"))
    try:
        for n in range(40):
            sink.write(line_of(n))
        assert drops.total() > 0
        lost = drops.total()
        (full_tmpfs / "filler").unlink()
        sink.write(line_of(1000))
    finally:
        os.close(sink.fileno() or -1)
    assert drops.total() == lost
    assert not drops.failing
    assert drops.recoveries() == 1
    lines = (full_tmpfs / "echod.log").read_bytes().splitlines()
    assert json.loads(lines[-1])["n"] == 1000
    assert all(json.loads(line) for line in lines)


def test_dev_full_drops_every_line_without_raising(drops: DropCounts) -> None:
    """/dev/full (ENOSPC on every write) is counted, not raised."""
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        sink = FdSink(fd)
        for n in range(5):
            sink.write(line_of(n))
    finally:
        os.close(fd)
    assert drops.snapshot()["no_space"] == 5


def test_a_pipe_whose_reader_left_drops_as_pipe_closed(drops: DropCounts) -> None:
    """EPIPE (``echod run | head`` after head exits) is a drop, not an exception."""
    r, w = os.pipe()
    os.close(r)
    try:
        sink = FdSink(w)
        sink.write("one")
        sink.write("two")
    finally:
        os.close(w)
    assert drops.snapshot()["pipe_closed"] == 2


def test_a_full_non_blocking_pipe_drops_as_pipe_full_and_keeps_lines_whole(
    drops: DropCounts,
) -> None:
    """A line larger than PIPE_BUF that only partly fits is cut short; the next line that is
    written starts on a line of its own, so that it is whole."""
    r, w = os.pipe2(os.O_NONBLOCK)
    try:
        capacity = 0
        with contextlib.suppress(BlockingIOError):
            for _ in range(100_000):
                capacity += os.write(w, b"a" * 1000)
        os.read(r, 9000)  # room for part of the next line only (two pages or so)
        sink = FdSink(w)
        sink.write("b" * 20_000)
        assert drops.snapshot()["pipe_full"] == 1
        received = b""
        with contextlib.suppress(BlockingIOError):
            for _ in range(1000):
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                received += chunk
        sink.write("next")
        received += os.read(r, 100)
    finally:
        os.close(r)
        os.close(w)
    assert received.endswith(b"\nnext\n")
    assert b"b" in received  # the part that went is on a line of its own


def test_a_descriptor_not_open_for_writing_drops_as_bad_descriptor(
    tmp_path: Path, drops: DropCounts
) -> None:
    """EBADF (a closed, or read-only, stdout) is counted."""
    path = tmp_path / "ro.log"
    path.write_text("")
    fd = os.open(path, os.O_RDONLY)
    try:
        FdSink(fd).write("lost")
    finally:
        os.close(fd)
    assert drops.snapshot()["bad_descriptor"] == 1
    assert path.read_text() == ""


def test_a_reopen_that_fails_keeps_the_file_in_use(tmp_path: Path, drops: DropCounts) -> None:
    """SIGUSR1 when the log's directory is gone: the sink keeps its file and counts nothing
    lost but the reopen itself."""
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "echod.log"
    sink = FdSink.open_path(str(path))
    fd = sink.fileno()
    assert fd is not None
    try:
        sink.write("before")
        path.unlink()
        directory.rmdir()
        sink.reopen()
        sink.write("after")
        assert os.fstat(fd).st_nlink == 0  # still the (deleted) file in use
    finally:
        os.close(fd)
    assert drops.total() == 1


def test_counts_are_shared_with_forked_children(drops: DropCounts) -> None:
    """Drops counted in a child process (a worker) are seen by the parent (the supervisor)."""

    def child() -> None:
        sink = FdSink(os.open("/dev/full", os.O_WRONLY))
        for _ in range(7):
            sink.write("x")

    in_child(child)
    assert drops.snapshot()["no_space"] == 7


def test_counts_lose_nothing_under_concurrent_writers(drops: DropCounts) -> None:
    """Threads and processes dropping at once: the count is exact (the lock)."""
    threads_each, processes = 200, 3

    def drop_many() -> None:
        for _ in range(threads_each):
            drops.dropped("io_error", errno.EIO)

    pids = []
    for _ in range(processes):
        pid = os.fork()
        if pid == 0:
            try:
                workers = [threading.Thread(target=drop_many) for _ in range(4)]
                for t in workers:
                    t.start()
                for t in workers:
                    t.join()
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    assert drops.snapshot()["io_error"] == processes * 4 * threads_each


def test_adopted_counts_add_what_the_fresh_ones_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An upgrade's new image takes the handed-over counts and keeps its own start's drops."""
    old = DropCounts.create()
    fresh = DropCounts.create()
    monkeypatch.setattr(sinks._held, "counts", fresh)
    old.dropped("no_space", errno.ENOSPC)
    fresh.dropped("pipe_closed", errno.EPIPE)
    handed = os.dup(old.fileno())
    adopted = sinks.adopt_counts(handed)
    try:
        assert sinks.counts() is adopted
        assert {r: n for r, n in adopted.snapshot().items() if n} == {
            "no_space": 1,
            "pipe_closed": 1,
        }
        old.dropped("no_space", errno.ENOSPC)  # an old worker goes on counting
        assert adopted.snapshot()["no_space"] == 2
    finally:
        adopted.close()
        old.close()


def test_the_write_holding_the_interpreter_keeps_it(tmp_path: Path) -> None:
    """write_holding_gil keeps the interpreter lock while it blocks: no other thread runs
    meanwhile. If a Python release changes what ctypes.PyDLL does, this fails."""
    r, w = os.pipe()
    # A full pipe, which a child empties 0.3 s later: the write blocks until then.
    with contextlib.suppress(BlockingIOError):
        os.set_blocking(w, False)
        for _ in range(100_000):
            os.write(w, b"a" * 4096)
    os.set_blocking(w, True)
    reader = subprocess.Popen(
        ["python3", "-c", "import os,sys,time; time.sleep(0.3); os.read(0, 1 << 20)"],
        stdin=r,
    )
    ticks = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            ticks[0] += 1

    def spin_rate() -> float:
        """How fast the spinner counts on its own, over a tenth of a second."""
        before, started = ticks[0], time.monotonic()
        time.sleep(0.1)
        return (ticks[0] - before) / (time.monotonic() - started)

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        rate = spin_rate()
        before = ticks[0]
        started = time.monotonic()
        assert sinks.write_holding_gil(w, b"x" * 100) == 100
        blocked = time.monotonic() - started
        during = ticks[0] - before
        # Measured on both sides: a machine busy elsewhere during one of them would make
        # the rate look too low.
        rate = max(rate, spin_rate())
    finally:
        stop.set()
        spinner.join()
        reader.wait(10)
        os.close(r)
        os.close(w)
    assert blocked > 0.1  # it did wait for the reader
    # ... and the spinner did not run while it did: letting go of the lock would have let it
    # count for all of that time; holding it, for a switch interval or two around the call.
    assert during < rate * blocked / 4, (during, rate, blocked)


class Told:
    """A Fallback that keeps what it is told."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def say(self, text: str) -> str | None:
        self.lines.append(text)
        return "test"


class Logged:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))


def watch(drops: DropCounts, clock: list[float]) -> tuple[DropWatch, Told]:
    told = Told()
    fallback: Any = told
    return DropWatch(drops, "/var/log/echod.log", fallback, clock=lambda: clock[0]), told


def test_an_episode_is_told_once_and_summed_up_when_it_ends(drops: DropCounts) -> None:
    """The first drop is told once (not once a line); the first success after it ends the
    episode with a summary, told and logged."""
    clock = [100.0]
    watcher, told = watch(drops, clock)
    logged = Logged()
    watcher.check(logged)
    assert told.lines == []
    for _ in range(3):
        drops.dropped("no_space", errno.ENOSPC)
    watcher.check(logged)
    drops.dropped("no_space", errno.ENOSPC)
    clock[0] = 101.0
    watcher.check(logged)
    assert len(told.lines) == 1
    assert "No space left on device" in told.lines[0]
    drops.succeeded()
    clock[0] = 102.5
    watcher.check(logged)
    assert len(told.lines) == 2
    assert told.lines[1] == (
        "log lines to /var/log/echod.log are written again: 4 dropped (no_space 4) in 2.5 s"
    )
    assert logged.events == [
        (
            "log_lines_dropped",
            {
                "dropped": 4,
                "reasons": {"no_space": 4},
                "seconds": 2.5,
                "target": "/var/log/echod.log",
            },
        )
    ]


def test_a_flapping_log_is_told_at_most_once_a_quiet_period(drops: DropCounts) -> None:
    """Episodes that begin within a minute of the last message are folded into the next
    summary instead of being told one by one."""
    clock = [0.0]
    watcher, told = watch(drops, clock)
    logged = Logged()
    for second in range(1, 30):
        clock[0] = float(second)
        drops.dropped("pipe_full", errno.EAGAIN)
        watcher.check(logged)
        drops.succeeded()
        clock[0] += 0.5
        watcher.check(logged)
    assert len(told.lines) == 2  # the first episode's beginning and its end
    clock[0] = 100.0
    drops.dropped("pipe_full", errno.EAGAIN)
    watcher.check(logged)
    drops.succeeded()
    watcher.check(logged)
    assert len(told.lines) == 4
    assert "28 dropped" not in told.lines[3]
    assert "29 dropped (pipe_full 29)" in told.lines[3]  # the folded ones and this one


def test_stderr_is_no_fallback_when_it_is_the_failing_sink_or_dev_null(tmp_path: Path) -> None:
    """The fallback skips stderr when it is the file that fails, or /dev/null."""
    saved = os.dup(2)
    try:
        path = tmp_path / f"{uuid.uuid4()}.log"
        failing = os.open(path, os.O_WRONLY | os.O_CREAT)
        os.dup2(failing, 2)
        assert "stderr" not in dict(Fallback(failing, False).channels())
        other = os.open(tmp_path / "other.log", os.O_WRONLY | os.O_CREAT)
        assert "stderr" in dict(Fallback(other, False).channels())
        null = os.open("/dev/null", os.O_WRONLY)
        os.dup2(null, 2)
        assert "stderr" not in dict(Fallback(other, False).channels())
        for fd in (failing, other, null):
            os.close(fd)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
