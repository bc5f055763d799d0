"""echod.log's connection lines: made from parts rendered once (the bound fields, the
thread's identity), and byte for byte what structlog's chain made before, in every form."""

from __future__ import annotations

import _thread
import dataclasses
import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from echod import events, log, logline, sinks
from echod.config import LogConfig
from echod.console import ConsoleRenderer
from tests.support import in_child

pytestmark = pytest.mark.timeout(60)

#: A fixed clock for both paths (time.time() as logline.py calls it), so that lines compare.
NOW = 1_765_000_000.123456
OPEN_FIELDS: dict[str, Any] = {
    "conn_id": "3-17",
    "mode": "thread",
    "local_port": 7007,
    "peer": "127.0.0.1",
    "peer_port": 45678,
}
CLOSE_FIELDS: dict[str, Any] = {
    "bytes_in": 64,
    "bytes_out": 60,
    "duration": 0.000123,
    "reason": "reset",
    "error": "[Errno 104] Connection reset by peer",
}
#: Values that JSON renders in unusual ways: non-ASCII, a separator, None, str() of an object.
ODD_FIELDS: dict[str, Any] = {
    "conn_id": "1-1",
    "mode": "async",
    "local_port": None,
    "peer": "/run/echo é\u2028.sock",
    "peer_port": None,
    "proxy_peer": Path("/balancer"),
    "proxy_peer_port": 0,
}


def identity_before(_logger: Any, _method: str, event_dict: Any) -> Any:
    """add_identity as it was before the identity was rendered once per thread."""
    event_dict["pid"] = log._identity.pid
    event_dict["ppid"] = log._identity.ppid
    event_dict["process"] = log._identity.process
    event_dict["thread_id"] = threading.get_ident()
    event_dict["native_thread_id"] = threading.get_native_id()
    name = log._thread_name.name
    event_dict["thread_name"] = threading.current_thread().name if name is None else name
    return event_dict


class FakeJournal:
    """Stands in for systemd.JournalSender: keeps what it is sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, dict[str, Any]]] = []

    def send(self, message: str, priority: int, fields: dict[str, Any]) -> None:
        self.sent.append((message, priority, dict(fields)))

    def close(self) -> None:
        """Nothing to close."""


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put structlog's configuration, echod.log's state and the process name back."""
    config = structlog.get_config()
    state = dataclasses.replace(log._state)
    name = log.process_name()
    yield
    structlog.configure(**config)
    for field in dataclasses.fields(state):
        setattr(log._state, field.name, getattr(state, field.name))
    log.set_process_name(name)
    log._thread_name.name = None


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logline.time, "time", lambda: NOW)


def renderer_for(fmt: str) -> Callable[..., Any]:
    if fmt == "json":
        return logline.render_json
    if fmt == "console":
        return ConsoleRenderer(colors=False)
    return logline.render_journal


def logger_before(sink: sinks.Sink, fmt: str, level: str) -> Any:
    """The chain configure() installed before, with identity_before, on ``sink``."""
    return structlog.wrap_logger(
        log.SinkLogger(sink),
        processors=[
            structlog.processors.add_log_level,
            log.add_timestamp,
            identity_before,
            log._dropping_failures(renderer_for(fmt)),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(log.LEVELS[level]),
    )


def connection_events(logger_for: Callable[[dict[str, Any]], Any]) -> None:
    """What a connection logs, and the unusual cases the lines must get right as well."""
    first = logger_for(OPEN_FIELDS)
    first.info(events.CONN_OPEN)
    first.info(events.CONN_CLOSE, **CLOSE_FIELDS)
    quiet = logger_for(ODD_FIELDS)
    quiet.debug(events.CONN_OPEN)
    quiet.debug(events.CONN_CLOSE, bytes_in=0, bytes_out=0, duration=1.5, reason="proxy_error")
    # A field of the event named as a bound one, or as one the chain adds: the chain's order.
    logger_for(OPEN_FIELDS).info(events.CONN_CLOSE, peer="10.0.0.9", reason="x")
    logger_for(OPEN_FIELDS).info(events.CONN_CLOSE, pid=1, level="odd")
    logger_for({}).info(events.CONN_OPEN)
    logger_for({}).info(events.CONN_CLOSE, **CLOSE_FIELDS)
    logger_for(OPEN_FIELDS).warning("oddity", value={"nested": [1, 2.5, None]})
    logger_for(OPEN_FIELDS).error("oddity", value="é\n")


def in_threads(work: Callable[[], None]) -> None:
    """Run ``work`` in this thread, a threading.Thread and a _thread thread that names
    itself (as connection threads do), one after the other."""
    work()
    thread = threading.Thread(target=work, name="conn-worker-thread")
    thread.start()
    thread.join(10)
    done = threading.Event()

    def named() -> None:
        try:
            log.set_thread_name("conn-3-17")
            work()
            log.set_thread_name("conn-3-18")  # a spare thread serving the next connection
            work()
        finally:
            done.set()

    _thread.start_new_thread(named, ())
    assert done.wait(10)


def lines_of(path: Path) -> list[str]:
    # Not splitlines(): a line may hold U+2028, which JSON keeps as it is.
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def both(reference: Any) -> Callable[[], None]:
    """A connection's events through log.bind() and, in the same thread, through
    ``reference`` (the chain before): their lines must be the same."""

    def work() -> None:
        connection_events(lambda fields: log.bind(**fields))
        connection_events(lambda fields: reference.bind(**fields))

    return work


@pytest.mark.parametrize("fmt", ["json", "console"])
@pytest.mark.parametrize("level", ["info", "debug"])
def test_lines_match_the_chain_before(
    tmp_path: Path, fmt: str, level: str, restore_logging: None, frozen_clock: None
) -> None:
    """log.bind()'s lines, in JSON and in the console form, from three kinds of threads, are
    those the chain with the identity processor before made, byte for byte."""
    log.set_process_name("worker-3")
    cfg = LogConfig(format=fmt, target="file", file=str(tmp_path / "now.log"), level=level,
                    connections="both")  # fmt: skip
    log.configure(cfg)
    # JSON lines are made by echod.log itself; the console form's by structlog's chain.
    assert isinstance(log.bind(conn_id="1-1"), log.ConnectionLogger) == (fmt == "json")
    before = log.FdSink.open_path(str(tmp_path / "before.log"))
    try:
        in_threads(both(logger_before(before, fmt, level)))
    finally:
        before.close()
    now, then = lines_of(tmp_path / "now.log"), lines_of(tmp_path / "before.log")
    assert len(now) == (40 if level == "debug" else 32)
    assert now == then


def test_journal_fields_match_the_chain_before(
    restore_logging: None, frozen_clock: None
) -> None:
    """In the journal, each connection event's message, priority and fields are those the
    chain with the identity processor before sent."""
    log.set_process_name("worker-3")
    now, then = FakeJournal(), FakeJournal()
    cfg = LogConfig(format="auto", target="journal", file=None, level="debug", connections="both")
    log.configure(cfg, sink=sinks.JournalSink(now))  # type: ignore[arg-type]
    in_threads(both(logger_before(sinks.JournalSink(then), "journal", "debug")))  # type: ignore[arg-type]
    assert len(now.sent) == 40
    assert now.sent == then.sent


def lean_chain(fmt: str, level: str, sink: Any) -> logline.LineChain:
    """The chain a connection source's process logs with (echod.forkserver), for this
    thread as the process ``conn-3-17`` whose worker is this process's parent."""
    chain = logline.LineChain(renderer_for(fmt), logline.LEVELS[level], sink)
    chain.identity = logline.single_thread_identity("conn-3-17", os.getppid())
    return chain


@pytest.mark.parametrize("fmt", ["json", "console", "journal"])
@pytest.mark.parametrize("level", ["info", "debug"])
def test_a_connection_sources_lines_match_the_chain(
    tmp_path: Path, fmt: str, level: str, restore_logging: None, frozen_clock: None
) -> None:
    """A connection source's process makes its lines without structlog (logline.LineChain):
    in every form they are those structlog's chain makes in a process forked from the
    worker, byte for byte (in the journal: message, priority and fields)."""
    log.set_process_name("conn-3-17")
    assert threading.current_thread() is threading.main_thread()
    if fmt == "journal":
        now, then = FakeJournal(), FakeJournal()
        cfg = LogConfig(format="auto", target="journal", file=None, level=level,
                        connections="both")  # fmt: skip
        log.configure(cfg, sink=sinks.JournalSink(now))  # type: ignore[arg-type]
        lean = lean_chain(fmt, level, sinks.JournalSink(then))  # type: ignore[arg-type]
        connection_events(lambda fields: log.bind(**fields))
        connection_events(lambda fields: lean.bind(**fields))
        assert len(now.sent) == (10 if level == "debug" else 8)
        assert now.sent == then.sent
        return
    cfg = LogConfig(format=fmt, target="file", file=str(tmp_path / "chain.log"), level=level,
                    connections="both")  # fmt: skip
    log.configure(cfg)
    sink = log.FdSink.open_path(str(tmp_path / "lean.log"))
    try:
        lean = lean_chain(fmt, level, sink)
        connection_events(lambda fields: log.bind(**fields))
        connection_events(lambda fields: lean.bind(**fields))
    finally:
        sink.close()
    chain, lines = lines_of(tmp_path / "chain.log"), lines_of(tmp_path / "lean.log")
    assert len(chain) == (10 if level == "debug" else 8)
    assert lines == chain


def masked(line: str) -> str:
    """``line`` with the identity's numbers, which differ from run to run, masked."""
    return re.sub(
        r'"pid":\d+,"ppid":\d+,(.*)"thread_id":\d+,"native_thread_id":\d+',
        r'"pid":PID,"ppid":PPID,\1"thread_id":TID,"native_thread_id":NTID',
        line,
    )


#: A connection's lines recorded from echod before the change (identity masked): thread
#: mode (fields bound per connection), async mode (the same fields passed per event).
RECORDED_THREAD = [
    '{"conn_id":"1-7","mode":"thread","local_port":49561,"peer":"127.0.0.1",'
    '"peer_port":52552,"event":"conn_open","level":"info",'
    '"timestamp":"2025-12-06T05:46:40.123456Z","pid":PID,"ppid":PPID,"process":"worker-1",'
    '"thread_id":TID,"native_thread_id":NTID,"thread_name":"conn-1-7"}',
    '{"conn_id":"1-7","mode":"thread","local_port":49561,"peer":"127.0.0.1",'
    '"peer_port":52552,"bytes_in":64,"bytes_out":64,"duration":0.000411,'
    '"reason":"client_closed","event":"conn_close","level":"info",'
    '"timestamp":"2025-12-06T05:46:40.123456Z","pid":PID,"ppid":PPID,"process":"worker-1",'
    '"thread_id":TID,"native_thread_id":NTID,"thread_name":"conn-1-7"}',
]
RECORDED_ASYNC = [
    '{"conn_id":"2-9","mode":"async","local_port":49561,"peer":"::1","peer_port":40000,'
    '"event":"conn_open","level":"info","timestamp":"2025-12-06T05:46:40.123456Z",'
    '"pid":PID,"ppid":PPID,"process":"worker-2","thread_id":TID,"native_thread_id":NTID,'
    '"thread_name":"MainThread"}',
    '{"conn_id":"2-9","mode":"async","local_port":49561,"peer":"::1","peer_port":40000,'
    '"bytes_in":0,"bytes_out":0,"duration":2.000001,"reason":"idle_timeout",'
    '"event":"conn_close","level":"info","timestamp":"2025-12-06T05:46:40.123456Z",'
    '"pid":PID,"ppid":PPID,"process":"worker-2","thread_id":TID,"native_thread_id":NTID,'
    '"thread_name":"MainThread"}',
]


def test_lines_match_lines_recorded_before(
    tmp_path: Path, restore_logging: None, frozen_clock: None
) -> None:
    """A connection's two JSON lines, in a connection thread and on the async worker's main
    thread, are those echod wrote before, but for the identity's numbers (masked)."""
    log.set_process_name("worker-1")
    path = tmp_path / "now.log"
    log.configure(LogConfig(format="json", target="file", file=str(path), level="info",
                            connections="both"))  # fmt: skip
    done = threading.Event()

    def connection() -> None:
        try:
            log.set_thread_name("conn-1-7")
            clog = log.bind(conn_id="1-7", mode="thread", local_port=49561, peer="127.0.0.1",
                            peer_port=52552)  # fmt: skip
            clog.info(events.CONN_OPEN)
            clog.info(events.CONN_CLOSE, bytes_in=64, bytes_out=64, duration=0.000411,
                      reason="client_closed")  # fmt: skip
        finally:
            done.set()

    _thread.start_new_thread(connection, ())
    assert done.wait(10)
    log.set_process_name("worker-2")
    clog = log.bind(conn_id="2-9", mode="async", local_port=49561, peer="::1", peer_port=40000)
    clog.info(events.CONN_OPEN)
    clog.info(events.CONN_CLOSE, bytes_in=0, bytes_out=0, duration=2.000001, reason="idle_timeout")
    assert [masked(line) for line in lines_of(path)] == RECORDED_THREAD + RECORDED_ASYNC


def test_identity_is_made_once_per_thread_and_renewed_when_it_changes(
    restore_logging: None,
) -> None:
    """A thread's identity fields are made on its first event and reused, and made anew
    after its name or the process's role name changes."""
    log.set_process_name("worker-1")
    first = log.thread_identity().fields
    assert log.thread_identity().fields is first
    log.set_process_name("worker-2")
    second = log.thread_identity().fields
    assert second is not first and second is not None
    assert second["process"] == "worker-2"
    log.set_thread_name("conn-2-1")
    third = log.thread_identity().fields
    assert third is not None and third["thread_name"] == "conn-2-1"
    assert log.thread_identity().json == "," + json.dumps(third, separators=(",", ":"))[1:-1]


def test_identity_is_renewed_in_a_forked_child(restore_logging: None) -> None:
    """A child process's events carry its own pid, not the identity its parent made."""
    log.thread_identity()
    pid, output = in_child(lambda: json.dumps(log.thread_identity().fields).encode())
    seen = json.loads(output)
    assert (seen["pid"], seen["ppid"]) == (pid, os.getpid())


def test_bind_follows_a_test_capturing_the_log(tmp_path: Path, restore_logging: None) -> None:
    """Under structlog.testing.capture_logs, log.bind()'s events are captured, not written."""
    path = tmp_path / "now.log"
    log.configure(LogConfig(format="json", target="file", file=str(path), level="info",
                            connections="both"))  # fmt: skip
    with capture_logs() as captured:
        log.bind(conn_id="1-1").info(events.CONN_OPEN, peer="x")
    assert captured == [
        {"conn_id": "1-1", "peer": "x", "event": events.CONN_OPEN, "log_level": "info"}
    ]
    assert not path.exists() or path.read_text() == ""


def test_a_value_that_cannot_be_rendered_is_dropped_and_counted(
    tmp_path: Path, restore_logging: None
) -> None:
    """An event field JSON cannot render (a circular list) drops its line and counts it,
    as the chain does; the next line is written."""
    path = tmp_path / "now.log"
    log.configure(LogConfig(format="json", target="file", file=str(path), level="info",
                            connections="both"))  # fmt: skip
    loop: list[Any] = []
    loop.append(loop)
    before = sinks.counts().snapshot()["error"]
    clog = log.bind(conn_id="1-1")
    clog.info(events.CONN_CLOSE, value=loop)
    clog.info(events.CONN_CLOSE, value=1)
    assert sinks.counts().snapshot()["error"] == before + 1
    assert [json.loads(line)["value"] for line in lines_of(path)] == [1]
