"""What a real echod logs: identity fields on every connection event, the console and JSON
forms, and whole lines when many connection processes log to one file at once."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from echod.proxy import v1_header
from tests.support import (
    MODES as ALL_MODES,
)
from tests.support import (
    ROOT,
    Echod,
    echo_roundtrip,
    echod,
    echod_command,
    recv_exactly,
    wait_text,
    worker_pids,
)

pytestmark = pytest.mark.timeout(60)

MODES = ["thread", "process"]
IDENTITY = (
    "conn_id",
    "peer",
    "peer_port",
    "local_port",
    "mode",
    "pid",
    "ppid",
    "process",
    "thread_id",
    "native_thread_id",
    "thread_name",
)
SCRUBBED_ENV = ("ECHOD_CONFIG", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "JOURNAL_STREAM")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def ping(sock: socket.socket, data: bytes = b"ping") -> None:
    sock.sendall(data)
    assert recv_exactly(sock, len(data)) == data


def is_json(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


@pytest.mark.parametrize("mode", MODES)
def test_connection_events_carry_the_identity_of_who_served_them(tmp_path: Path, mode: str) -> None:
    """conn_open and conn_close carry every identity field: one pid and distinct threads in
    thread mode, a distinct pid per connection (child of the worker) in process mode."""
    with echod(tmp_path, mode=mode) as server:
        (worker,) = worker_pids(server)
        socks = [server.connect() for _ in range(5)]
        for sock in socks:
            ping(sock)  # all five are served at the same time
        client_ports = {sock.getsockname()[1] for sock in socks}
        for sock in socks:
            sock.close()
        server.wait_event("conn_close", count=5)
    opens, closes = server.events("conn_open"), server.events("conn_close")
    assert len(opens) == len(closes) == 5
    for event in opens + closes:
        missing = [field for field in IDENTITY if field not in event]
        assert not missing, f"{event['event']} lacks {missing}"
        assert event["mode"] == mode
        assert event["peer"] == "127.0.0.1"
        assert event["local_port"] == server.port
    assert {e["peer_port"] for e in opens} == client_ports
    assert len({e["conn_id"] for e in opens}) == 5
    by_id = {e["conn_id"]: e for e in opens}
    for close in closes:
        opened = by_id[close["conn_id"]]
        for field in IDENTITY:
            assert close[field] == opened[field], f"{field} changed between open and close"
    if mode == "thread":
        assert {e["pid"] for e in opens} == {worker}
        assert {e["ppid"] for e in opens} == {server.pid}
        assert {e["process"] for e in opens} == {"worker-1"}
        assert len({e["thread_id"] for e in opens}) == 5
        assert len({e["native_thread_id"] for e in opens}) == 5
        assert worker not in {e["native_thread_id"] for e in opens}
        assert all(e["thread_name"] == f"conn-{e['conn_id']}" for e in opens)
    else:
        assert len({e["pid"] for e in opens}) == 5
        assert worker not in {e["pid"] for e in opens}
        assert {e["ppid"] for e in opens} == {worker}
        assert all(e["process"] == f"conn-{e['conn_id']}" for e in opens)
        # The connection process is single-threaded: its one thread is the process itself.
        assert all(e["native_thread_id"] == e["pid"] for e in opens)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_connections_close_logs_one_event_with_the_whole_identity(
    tmp_path: Path, mode: str
) -> None:
    """log.connections close: no conn_open; each conn_close carries everything conn_open
    would have (the identity, the peer, the local address; behind PROXY the real client and
    the balancer), whatever ended the connection."""
    (tmp_path / "plain").mkdir()
    with echod(tmp_path / "plain", mode=mode, log={"connections": "close"}) as server:
        socks = [server.connect() for _ in range(3)]
        for sock in socks:
            ping(sock)
        ports = {sock.getsockname()[1] for sock in socks}
        for sock in socks:
            sock.close()
        server.wait_event("conn_close", count=3)
        closes = server.events("conn_close")
        assert not server.events("conn_open")
    assert {e["peer_port"] for e in closes} == ports
    for event in closes:
        missing = [field for field in (*IDENTITY, "local_address") if field not in event]
        assert not missing, f"conn_close lacks {missing}"
        assert (event["mode"], event["peer"]) == (mode, "127.0.0.1")
        assert event["local_port"] == server.port
        assert event["reason"] == "client_closed"
        assert event["bytes_in"] == event["bytes_out"] == 4
    (tmp_path / "proxied").mkdir()
    proxied = {"proxy_protocol": "v1", "proxy_trusted": ["127.0.0.1"]}
    log = {"connections": "close"}
    with echod(tmp_path / "proxied", mode=mode, log=log, **proxied) as server:
        sock = server.connect()
        port = sock.getsockname()[1]
        sock.sendall(v1_header(("203.0.113.10", 40001), ("127.0.0.1", server.port)))
        ping(sock)
        sock.close()
        close = server.wait_event("conn_close")
        assert not server.events("conn_open")
    assert (close["peer"], close["peer_port"]) == ("203.0.113.10", 40001)
    assert (close["proxy_peer"], close["proxy_peer_port"]) == ("127.0.0.1", port)
    assert not [field for field in IDENTITY if field not in close]


def test_console_format_is_readable_not_json(tmp_path: Path) -> None:
    """With log.format console the log holds short readable lines, not JSON."""
    server = Echod(tmp_path, mode="thread", log={"format": "console"})
    try:
        server.start(wait=False)
        port = int(
            wait_text(
                server.log_path,
                lambda text: (m := re.search(r"\bready +127\.0\.0\.1:(\d+)", text)) and m.group(1),
                what="a console ready line",
            )
        )
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            assert echo_roundtrip(sock, b"hello") == b"hello"
        text = wait_text(
            server.log_path, lambda t: "conn_close" in t and t, what="a console conn_close line"
        )
    finally:
        server.kill()
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines
    assert not any(is_json(line) for line in lines)
    assert "\x1b[" not in text  # no colours in a file
    (close,) = [line for line in lines if "conn_close" in line]
    assert re.search(r" conn_close 127\.0\.0\.1:\d+ conn-1-1 5 B echoed .* client_closed$", close)
    (open_,) = [line for line in lines if "conn_open" in line]
    assert re.search(r" worker-1 pid \d+ thread conn-1-1 tid \d+$", open_)


def test_json_is_the_default_off_a_terminal(tmp_path: Path) -> None:
    """With log.format auto and standard output a file, every line is a JSON object."""
    server = Echod(tmp_path, log={"file": None, "format": "auto", "target": "auto"})
    out = server.stderr_path  # stdout and stderr both go there
    try:
        server.start(wait=False)
        wait_text(out, lambda t: '"event":"ready"' in t, what="a JSON ready line")
        ready = next(
            e for e in map(json.loads, out.read_text().splitlines()) if e["event"] == "ready"
        )
        with socket.create_connection(("127.0.0.1", ready["port"]), timeout=10) as sock:
            assert echo_roundtrip(sock, b"hi") == b"hi"
        wait_text(out, lambda t: '"event":"conn_close"' in t, what="a JSON conn_close line")
        assert server.stop() == 0
    finally:
        server.kill()
    lines = out.read_text().splitlines()
    assert lines and all(is_json(line) for line in lines)
    assert json.loads(lines[-1])["event"] == "stopped"


def test_console_is_the_default_on_a_terminal(tmp_path: Path) -> None:
    """With log.format auto and standard output a terminal, echod logs the console form."""
    server = Echod(tmp_path, log={"file": None, "format": "auto", "target": "auto"})
    server.write_config()
    master, slave = pty.openpty()
    output = bytearray()
    proc = subprocess.Popen(
        echod_command("run", "--config", str(server.config_path)),
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV},
        start_new_session=True,
    )
    os.close(slave)
    try:
        deadline = time.monotonic() + 20
        while b"ready" not in output:
            assert time.monotonic() < deadline, f"no ready line on the terminal: {output!r}"
            assert proc.poll() is None, f"echod exited: {output!r}"
            if select.select([master], [], [], 0.5)[0]:
                output += os.read(master, 65536)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        # The whole group, even once echod has exited: its workers may have outlived it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        os.close(master)
    text = ANSI.sub("", output.decode("utf-8", "replace"))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    ready = next(line for line in lines if re.search(r"\bready\b", line))
    assert not is_json(ready)
    assert re.search(r"\bready +127\.0\.0\.1:\d+, thread mode", ready)


def test_process_mode_with_100_concurrent_connections_keeps_lines_whole(tmp_path: Path) -> None:
    """100 connection processes logging to one file at once: every line is whole JSON and
    the counts are exact."""
    payloads = [os.urandom(8192) for _ in range(100)]
    with echod(tmp_path, mode="process", backlog=256) as server:
        socks = [server.connect() for _ in range(100)]
        results: list[bytes | None] = [None] * 100
        start = threading.Barrier(100, timeout=20)

        def client(i: int) -> None:
            start.wait()
            results[i] = echo_roundtrip(socks[i], payloads[i])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(100)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert results == payloads
        server.wait_event("conn_close", count=100)
        assert server.stop() == 0
    text = server.log_path.read_text()
    assert text.endswith("\n")
    events: list[dict[str, Any]] = [json.loads(line) for line in text.splitlines()]
    opens = [e for e in events if e["event"] == "conn_open"]
    closes = [e for e in events if e["event"] == "conn_close"]
    assert len(opens) == len(closes) == 100
    assert len({e["conn_id"] for e in closes}) == 100
    assert len({e["pid"] for e in closes}) == 100
    assert all(e["bytes_in"] == e["bytes_out"] == 8192 for e in closes)
    assert [e["event"] for e in events].count("stopped") == 1
