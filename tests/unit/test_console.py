"""The console form: one short line per event for a person, nothing lost but identity noise."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from echod import console, log
from echod.config import LogConfig
from tests.support import in_child

pytestmark = pytest.mark.timeout(60)

TIMESTAMP = "2026-12-01T11:53:30.274533Z"
SUPERVISOR = {
    "pid": 349,
    "ppid": 1,
    "process": "supervisor",
    "thread_id": 140177710966464,
    "native_thread_id": 349,
    "thread_name": "MainThread",
}
THREAD = {
    "pid": 392,
    "ppid": 349,
    "process": "worker-1",
    "thread_id": 140177710966465,
    "native_thread_id": 454,
    "thread_name": "conn-1-1",
}
PROCESS = {
    "pid": 23325,
    "ppid": 23090,
    "process": "conn-1-1",
    "thread_id": 140177710966466,
    "native_thread_id": 23325,
    "thread_name": "MainThread",
}
ASYNC = {**THREAD, "native_thread_id": 392, "thread_name": "MainThread"}
CONN = {"conn_id": "1-1", "local_port": 9999, "peer": "127.0.0.1", "peer_port": 57830}
CLOSE = {"bytes_in": 6, "bytes_out": 6, "duration": 0.003839, "reason": "client_closed"}
ANSI = re.compile(r"\x1b\[[0-9;]*m")


#: Each mode's identity fields and who the console says served the connection.
SERVED_BY = [
    ("thread", THREAD, "worker-1 pid 392 thread conn-1-1 tid 454"),
    ("process", PROCESS, "process conn-1-1 pid 23325 worker pid 23090"),
    ("async", ASYNC, "worker-1 pid 392 async conn-1-1"),
]


def render(
    event: str, level: str = "info", colors: bool = False, close_alone: bool = False,
    **fields: Any,
) -> str:  # fmt: skip
    event_dict = {**fields, "event": event, "level": level, "timestamp": TIMESTAMP}
    return console.ConsoleRenderer(colors, close_alone)(None, level, event_dict)


@pytest.mark.parametrize(("mode", "identity", "served_by"), SERVED_BY)
def test_conn_open_says_who_served_which_peer(
    mode: str, identity: dict[str, Any], served_by: str
) -> None:
    """conn_open is the time, the event, the peer and who served it, in that order."""
    line = render("conn_open", **CONN, mode=mode, **identity)
    assert line == f"11:53:30 conn_open  127.0.0.1:57830 {served_by}"
    assert len(line) <= 80


@pytest.mark.parametrize("identity", [THREAD, PROCESS, ASYNC], ids=["thread", "process", "async"])
def test_conn_close_names_the_connection_and_how_it_ended(identity: dict[str, Any]) -> None:
    """conn_close is the peer, the connection's name, bytes, duration and reason."""
    line = render("conn_close", **CONN, mode="thread", **CLOSE, **identity)
    assert line == "11:53:30 conn_close 127.0.0.1:57830 conn-1-1 6 B echoed 3.8 ms client_closed"


@pytest.mark.parametrize(("mode", "identity", "served_by"), SERVED_BY)
def test_a_close_line_alone_says_who_served_it(
    mode: str, identity: dict[str, Any], served_by: str
) -> None:
    """With log.connections close there is no open line: the close line says who served the
    connection in the open line's words, then how it ended."""
    line = render("conn_close", close_alone=True, **CONN, mode=mode, **CLOSE, **identity)
    assert line == (
        f"11:53:30 conn_close 127.0.0.1:57830 {served_by} 6 B echoed 3.8 ms client_closed"
    )


def test_conn_close_with_an_error_and_unequal_bytes() -> None:
    """A close that lost bytes says both counts, the reason and the error."""
    close = {**CLOSE, "bytes_out": 4, "duration": 2.5, "reason": "reset"}
    line = render("conn_close", **CONN, mode="thread", **close, error="Connection reset", **THREAD)
    assert line.endswith(" conn-1-1 6 B in, 4 B out 2.5 s reset (Connection reset)")


def test_peer_behind_a_proxy_header() -> None:
    """With proxy_peer and proxy_peer_port the line says the client and, via, the proxy."""
    line = render(
        "conn_open", **CONN, proxy_peer="10.0.0.1", proxy_peer_port=4000, mode="thread", **THREAD
    )
    assert " 127.0.0.1:57830 via 10.0.0.1:4000 worker-1 pid 392 " in line
    assert "proxy_peer" not in line


def test_ipv6_peer_is_bracketed() -> None:
    """An IPv6 peer is written [host]:port."""
    line = render("conn_open", **{**CONN, "peer": "::1"}, mode="async", **ASYNC)
    assert " [::1]:57830 " in line


def test_supervisor_lines_carry_no_identity_noise() -> None:
    """A supervisor event names neither its process, thread nor parent."""
    ready = {"addresses": ["127.0.0.1:9999"], "port": 9999, "mode": "thread", "workers": 1}
    line = render("ready", **ready, startup_seconds=0.271, **SUPERVISOR)
    assert line == "11:53:30 ready      127.0.0.1:9999, thread mode, 1 worker, in 271 ms"


@pytest.mark.parametrize(
    ("event", "fields", "expected"),
    [
        (
            "start",
            {"version": "1.2.3", "config_file": "/etc/echod.yaml", "python": "3.11.7"},
            "start      echod 1.2.3 pid 349, python 3.11.7, /etc/echod.yaml",
        ),
        (
            "stopping",
            {"reason": "SIGTERM", "open": 2, "timeout": 10.0},
            "stopping   SIGTERM, 2 open, drain 10 s",
        ),
        (
            "stopped",
            {"exit_code": 0, "finished": 3, "cut": 1, "served": 4, "uptime": 12.25},
            "stopped    exit 0, 4 served, 3 finished, 1 cut, up 12.2 s",
        ),
        (
            "stopping",
            {"reason": "SIGTERM", "open": 2, "unconfirmed": 0, "timeout": 10.0},
            "stopping   SIGTERM, 2 open, drain 10 s",
        ),
        (
            "stopping",
            {"reason": "SIGTERM", "open": 2, "unconfirmed": 1, "timeout": 10.0},
            "stopping   SIGTERM, 2 open, 1 worker(s) unconfirmed, drain 10 s",
        ),
        (
            "stopped",
            {"exit_code": 0, "open": 4, "finished": 1, "cut": 3, "killed": 2, "served": 9},
            "stopped    exit 0, 9 served, 4 open, 1 finished, 3 cut, 2 of them killed",
        ),
        (
            "stopped",
            {"exit_code": 0, "open": 4, "finished": 4, "cut": 0, "killed": 0, "served": 9},
            "stopped    exit 0, 9 served, 4 open, 4 finished, 0 cut",
        ),
        (
            "worker_state",
            {"worker": 2, "worker_pid": 400, "generation": 1, "mode": "async", "state": "running"},
            "worker_state worker-2 pid 400 running (async, gen 1)",
        ),
        (
            "worker_state",
            {"worker": 2, "worker_pid": 400, "state": "failed", "signal": "SIGKILL", "delay": 0.5},
            "worker_state worker-2 pid 400 failed, signal SIGKILL, retry in 500 ms",
        ),
        (
            "reload",
            {
                "config_file": "/etc/echod.yaml",
                "generation": 2,
                "changes": {"workers": ["1", "2"]},
                "addresses": ["127.0.0.1:9999"],
            },
            "reload     generation 2: workers 1 -> 2, on 127.0.0.1:9999, config /etc/echod.yaml",
        ),
    ],
)
def test_lifecycle_lines(event: str, fields: dict[str, Any], expected: str) -> None:
    """Each lifecycle event has its own short phrase after the time."""
    assert render(event, **fields, **SUPERVISOR) == f"11:53:30 {expected}"


def test_reload_failed_says_the_error_once() -> None:
    """reload_failed is marked ERROR; a message naming the file does not repeat the file."""
    error = "/etc/echod.yaml:3:7: port: 70000 is out of range"
    line = render(
        "reload_failed", "error", error=error, config_file="/etc/echod.yaml", **SUPERVISOR
    )
    assert line == f"11:53:30 ERROR reload_failed {error}"


def test_worker_events_name_the_worker_once() -> None:
    """An event a worker logs names the worker and its pid, without a worker=N field."""
    line = render("limit_reached", "warning", worker=1, limit="max_connections", open=1024, **ASYNC)
    assert line == "11:53:30 WARNING limit_reached worker-1 pid 392 max_connections 1024 open"


def test_fields_without_a_phrase_follow_as_key_value() -> None:
    """Fields an event's phrase does not use are kept as key=value, quoted when needed."""
    line = render(
        "ready",
        addresses=["127.0.0.1:9999"],
        port=9999,
        shiny=True,
        note="two words",
        nothing=None,
        nested={"a": [1, 2]},
        **SUPERVISOR,
    )
    assert line.endswith(
        ' 127.0.0.1:9999 shiny=true note="two words" nothing=null nested={"a":[1,2]}'
    )


def test_an_unknown_event_keeps_every_field_but_identity() -> None:
    """An event without a phrase of its own lists each field; identity stays out."""
    line = render("udp_summary", echoed=3, echoed_bytes=12, dropped={}, **SUPERVISOR)
    assert line == "11:53:30 udp_summary echoed=3 echoed_bytes=12 dropped={}"
    for noise in console.IDENTITY:
        assert f"{noise}=" not in line


def test_every_value_stays_on_one_line() -> None:
    """A value holding a line break or a control character is written escaped."""
    line = render("odd", "error", error="one\ntwo", extra="tab\there\u2028", **SUPERVISOR)
    assert "\n" not in line and "\t" not in line and "\u2028" not in line
    assert 'error="one\\ntwo"' in line


def test_colours_only_when_asked_and_the_text_is_the_same() -> None:
    """With colours the line holds ANSI styles; without them, none; the text is the same."""
    fields = {**CONN, "mode": "thread", **CLOSE, **THREAD, "extra": 1}
    plain = render("conn_close", **fields)
    coloured = render("conn_close", colors=True, **fields)
    assert "\x1b[" not in plain
    assert "\x1b[" in coloured
    assert ANSI.sub("", coloured) == plain


@pytest.fixture
def process_name() -> Iterator[None]:
    """Restore this process's role name after a test changes it."""
    before = log.process_name()
    yield
    log.set_process_name(before)


def test_configure_console_on_a_file_has_no_colours(tmp_path: Path, process_name: None) -> None:
    """configure() with log.format console on a file writes plain console lines."""
    path = tmp_path / "echod.log"

    def child() -> None:  # (in a child: this process's structlog stays untouched)
        log.set_process_name("supervisor")
        log.configure(LogConfig("console", "file", str(path), "info", connections="both"))
        log.get_logger().info("stopping", reason="SIGTERM", open=0, timeout=5)

    in_child(child)
    (line,) = path.read_text().splitlines()
    assert re.fullmatch(r"\d\d:\d\d:\d\d stopping   SIGTERM, 0 open, drain 5 s", line)


@pytest.mark.parametrize(
    ("connections", "who"),
    [("both", "conn-1-7"), ("close", r"worker-1 pid \d+ thread conn-1-7 tid \d+")],
)
def test_configure_tells_the_console_whether_the_close_line_is_alone(
    tmp_path: Path, process_name: None, connections: str, who: str
) -> None:
    """log.connections close reaches the console renderer: its close line says who served
    the connection (the thread); with both, the open line did, and the close line names it."""
    path = tmp_path / "echod.log"

    def child() -> None:  # (in a child: this process's structlog stays untouched)
        log.set_process_name("worker-1")
        log.set_thread_name("conn-1-7")
        log.configure(LogConfig("console", "file", str(path), "info", connections))
        clog = log.bind(conn_id="1-7", mode="thread", peer="127.0.0.1", peer_port=5)
        clog.info("conn_close", bytes_in=1, bytes_out=1, duration=0.1, reason="cut")

    in_child(child)
    (line,) = path.read_text().splitlines()
    pattern = rf"\d\d:\d\d:\d\d conn_close 127\.0\.0\.1:5 {who} 1 B echoed 100 ms cut"
    assert re.fullmatch(pattern, line), line


def test_console_on_a_terminal_is_coloured(process_name: None) -> None:
    """configure() with log.format console on a pseudo-terminal writes ANSI colours."""
    master, slave = os.openpty()
    try:

        def child() -> None:
            log.set_process_name("worker-3")
            cfg = LogConfig("console", "stdout", None, "info", connections="both")
            log.configure(cfg, sink=log.FdSink(slave))
            log.get_logger().bind(worker=3).warning("refused", max_connections=2)

        pid, _ = in_child(child)
        data = os.read(master, 4096).decode()
    finally:
        os.close(master)
        os.close(slave)
    assert "\x1b[" in data
    plain = ANSI.sub("", data).strip()
    assert plain.endswith(f"WARNING refused    worker-3 pid {pid} max_connections=2")


def test_worker_draining_reads_like_stopping() -> None:
    """A worker's drain says which worker, how many are open and for how long it waits."""
    line = render("worker_draining", worker=1, open=2, timeout=10.0, **ASYNC)
    assert line == "11:53:30 worker_draining worker-1 pid 392 2 open, drain 10 s"
