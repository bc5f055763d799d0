"""echod.log: the identity processor, the JSON renderer, the file sink and its reopen, and
whole lines when 100 processes log to one file at once."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from echod import log
from echod.config import LogConfig
from tests.support import in_child

pytestmark = pytest.mark.timeout(60)


def log_config(path: Path, fmt: str = "json") -> LogConfig:
    return LogConfig(format=fmt, target="file", file=str(path), level="info", connections="both")


@pytest.fixture
def process_name() -> Iterator[None]:
    """Restore this process's role name after a test changes it."""
    before = log.process_name()
    yield
    log.set_process_name(before)


def test_add_identity_says_which_process_and_thread(process_name: None) -> None:
    """add_identity adds pid, ppid, process name and the thread's ids and name."""
    log.set_process_name("worker-7")
    seen: dict[str, Any] = {}
    expected: dict[str, Any] = {}

    def in_thread() -> None:
        expected["thread_id"] = threading.get_ident()
        expected["native_thread_id"] = threading.get_native_id()
        seen.update(log.add_identity(None, "info", {"event": "x"}))

    thread = threading.Thread(target=in_thread, name="conn-1-9")
    thread.start()
    thread.join(10)
    assert seen == {
        "event": "x",
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "process": "worker-7",
        "thread_name": "conn-1-9",
        **expected,
    }
    assert seen["native_thread_id"] != os.getpid()


def test_add_identity_is_refreshed_after_fork() -> None:
    """In a forked child, add_identity reports the child's pid and its parent as ppid."""
    pid, output = in_child(lambda: json.dumps(log.add_identity(None, "info", {})).encode())
    fields = json.loads(output)
    assert fields["pid"] == pid
    assert fields["ppid"] == os.getpid()
    assert fields["native_thread_id"] == pid


class Odd:
    def __str__(self) -> str:
        return "odd\nobject"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"\xff\x00bytes", "b'\\xff\\x00bytes'"),
        (Path("/var/log/echod.log"), "/var/log/echod.log"),
        (datetime.datetime(2024, 1, 2, 3, 4, 5), "2024-01-02 03:04:05"),
        (decimal.Decimal("1.10"), "1.10"),
        (ValueError("bad value"), "bad value"),
        (Odd(), "odd\nobject"),
        ({1, 2} - {1, 2}, "set()"),
        ("line one\nline two\r\n", "line one\nline two\r\n"),
        ("héllo ✓ \u2028", "héllo ✓ \u2028"),
        (
            {"nested": [1, None, True, {"deep": b"x"}]},
            {"nested": [1, None, True, {"deep": "b'x'"}]},
        ),
        (float("nan"), None),
        (10**40, 10**40),
    ],
    ids=lambda v: type(v).__name__,
)
def test_render_json_handles_odd_values(value: Any, expected: Any) -> None:
    """render_json turns any value into one line of JSON: unusual values become their str."""
    line = log.render_json(None, "info", {"event": "odd", "value": value})
    assert "\n" not in line and "\r" not in line
    parsed = json.loads(line)
    assert parsed["event"] == "odd"
    if expected is None:
        assert parsed["value"] != parsed["value"]  # NaN
    else:
        assert parsed["value"] == expected


def test_render_json_is_compact_and_keeps_non_ascii() -> None:
    """render_json writes no spaces between fields and keeps non-ASCII text as is."""
    line = log.render_json(None, "info", {"event": "e", "peer": "ü"})
    assert line == '{"event":"e","peer":"ü"}'


def test_fd_sink_writes_lines_and_survives_lone_surrogates(tmp_path: Path) -> None:
    """FdSink writes each line with its newline; an unencodable character is escaped."""
    path = tmp_path / "x.log"
    sink = log.FdSink.open_path(str(path))
    try:
        sink.write("one")
        sink.write("two \ud800 three")
    finally:
        fd = sink.fileno()
        assert fd is not None
        os.close(fd)
    assert path.read_bytes() == b"one\ntwo \\ud800 three\n"


def test_fd_sink_reopen_keeps_the_descriptor_number(tmp_path: Path) -> None:
    """After the file is rotated, reopen points the same fd at a fresh file at the path."""
    path = tmp_path / "echod.log"
    rotated = tmp_path / "echod.log.1"
    sink = log.FdSink.open_path(str(path))
    fd = sink.fileno()
    assert fd is not None
    try:
        sink.write("before")
        path.rename(rotated)
        sink.write("late")  # still the old file until reopen
        sink.reopen()
        assert sink.fileno() == fd
        sink.write("after")
        flags = os.get_inheritable(fd)
    finally:
        os.close(fd)
    assert rotated.read_text() == "before\nlate\n"
    assert path.read_text() == "after\n"
    assert not flags  # still close-on-exec
    assert oct(path.stat().st_mode & 0o777) == oct(0o640 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_fd_sink_without_a_path_ignores_reopen() -> None:
    """A sink on a stream (no path) keeps its fd on reopen."""
    r, w = os.pipe()
    try:
        sink = log.FdSink(w)
        sink.reopen()
        sink.write("x")
        assert os.read(r, 10) == b"x\n"
    finally:
        os.close(r)
        os.close(w)


def test_configure_writes_json_lines_with_identity(tmp_path: Path, process_name: None) -> None:
    """configure() on a file gives JSON lines with level, timestamp and identity."""
    path = tmp_path / "echod.log"

    def child() -> None:  # (in a child: this process's structlog stays untouched)
        log.set_process_name("supervisor")
        log.configure(log_config(path))
        log.get_logger().info("hello", answer=42)
        log.get_logger().debug("hidden")

    pid, _ = in_child(child)
    (event,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert event["event"] == "hello"
    assert event["answer"] == 42
    assert event["level"] == "info"
    assert event["timestamp"].endswith("Z")
    assert event["pid"] == pid
    assert event["process"] == "supervisor"


WRITERS = 100
EVENTS = 40
#: Field sizes from small to well past PIPE_BUF (4 KiB) and a page, so a torn write shows.
SIZES = [10, 900, 5000, 20000]


def test_100_processes_logging_to_one_file_keep_every_line_whole(tmp_path: Path) -> None:
    """100 forked processes, each configuring echod.log on one file and logging long events
    at once: every line parses, none is torn or interleaved, and the count is exact."""
    path = tmp_path / "shared.log"
    gate_r, gate_w = os.pipe()
    pids: list[int] = []
    try:
        for writer in range(WRITERS):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 1
                try:
                    os.close(gate_w)
                    log.set_process_name(f"writer-{writer}")
                    log.configure(log_config(path))
                    logger = log.get_logger().bind(writer=writer)
                    fill = chr(ord("a") + writer % 26)
                    os.read(gate_r, 1)  # wait until every writer is ready: EOF opens the gate
                    for seq in range(EVENTS):
                        size = SIZES[seq % len(SIZES)]
                        logger.info("burst", seq=seq, payload=fill * size, note='é\n"')
                    code = 0
                finally:
                    os._exit(code)
            pids.append(pid)
        os.close(gate_r)
        os.close(gate_w)  # every child is forked: let them all write at once
        for pid in list(pids):
            _, status = os.waitpid(pid, 0)
            pids.remove(pid)
            assert os.waitstatus_to_exitcode(status) == 0
    finally:
        for pid in pids:  # only after a failure: the children we forked and did not reap
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
    data = path.read_bytes()
    assert data.endswith(b"\n")
    lines = data.decode("utf-8").split("\n")[:-1]
    assert len(lines) == WRITERS * EVENTS
    seen: set[tuple[int, int]] = set()
    for line in lines:
        event = json.loads(line)
        writer, seq = event["writer"], event["seq"]
        assert event["payload"] == chr(ord("a") + writer % 26) * SIZES[seq % len(SIZES)]
        assert event["note"] == 'é\n"'
        assert event["process"] == f"writer-{writer}"
        seen.add((writer, seq))
    assert len(seen) == WRITERS * EVENTS


def test_fd_sink_writes_regular_files_holding_the_interpreter(tmp_path: Path) -> None:
    """A regular file is written by the call that keeps the interpreter lock; a pipe by
    os.write, which lets go of it (a pipe's reader may make it wait)."""
    path = tmp_path / "x.log"
    sink = log.FdSink.open_path(str(path))
    fd = sink.fileno()
    assert fd is not None
    r, w = os.pipe()
    other = os.dup(fd)
    try:
        assert sink._regular
        assert not log.FdSink(w)._regular
        # A file opened elsewhere (stdout redirected to a file) counts as one too.
        assert log.FdSink(other)._regular
        sink.write("é" * 3000)
        sink.write("two")
    finally:
        for each in (r, w, other, fd):
            os.close(each)
    assert path.read_text() == "é" * 3000 + "\ntwo\n"


def test_set_thread_name_names_threads_started_without_threading(tmp_path: Path) -> None:
    """Connection threads are started with _thread; the name they give themselves is the one
    their events carry, and no stand-in Thread object is made for them."""
    import _thread

    done = threading.Event()
    seen: dict[str, Any] = {}

    def main() -> None:
        log.set_thread_name("conn-1-7")
        seen.update(log.add_identity(None, "info", {}))
        seen["dummies"] = threading.active_count()
        done.set()

    before = threading.active_count()
    _thread.start_new_thread(main, ())
    assert done.wait(10)
    assert seen["thread_name"] == "conn-1-7"
    assert seen["thread_id"] != threading.get_ident()
    assert seen["dummies"] == before  # no _DummyThread registered for it
    assert log.add_identity(None, "info", {})["thread_name"] == threading.current_thread().name


def test_bind_binds_on_the_configured_logger(tmp_path: Path) -> None:
    """log.bind() goes through the chain and sink that configure() set, and follows a later
    configure() (another level, another file)."""
    first, second = tmp_path / "a.log", tmp_path / "b.log"

    def child() -> None:  # (in a child: this process's structlog stays untouched)
        log.configure(log_config(first))
        log.bind(conn_id="1-1").info("conn_open", peer="127.0.0.1")
        log.bind(conn_id="1-2").debug("hidden")
        log.configure(dataclasses.replace(log_config(second), level="debug"))
        log.bind(conn_id="1-3").debug("shown")

    in_child(child)
    events = [json.loads(line) for line in first.read_text().splitlines()]
    assert [(e["event"], e["conn_id"]) for e in events] == [("conn_open", "1-1")]
    events = [json.loads(line) for line in second.read_text().splitlines()]
    assert [(e["event"], e["conn_id"]) for e in events] == [("shown", "1-3")]
