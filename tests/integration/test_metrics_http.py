"""The metrics endpoint on a real loopback socket, driven by a selector loop shaped like the
supervisor's: every path, HEAD, errors, hostile clients, and promtool on the exposition."""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from echod import exitcodes, metrics
from echod.errors import OperatorError
from echod.httpserve import MAX_REQUEST, MetricsServer
from tests.support import (
    DEADLINE,
    ROOT,
    free_port,
    open_files,
    rlimit_nofile,
    wait_for,
    wait_text,
)


class Loop:
    """A thread running one selector loop the way the supervisor does: it dispatches the
    server's events, sleeps until the server's next deadline, and runs its timers."""

    def __init__(self, server: MetricsServer) -> None:
        self.server = server
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        self.selector.register(self.wake_r, selectors.EVENT_READ, None)
        self.stopping = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="loop", daemon=True)

    def start(self) -> Loop:
        self.server.open(self.selector)
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self.stopping:
                deadline = self.server.next_deadline()
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                for key, mask in self.selector.select(timeout):
                    if key.data is not None:
                        key.data(key.fileobj, mask)
                    else:
                        self.wake_r.recv(64)
                self.server.run_timers(time.monotonic())
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def stop(self) -> None:
        self.stopping = True
        self.wake_w.send(b"x")
        self.thread.join(DEADLINE)
        assert not self.thread.is_alive(), "loop did not stop"
        self.server.close()
        self.selector.close()
        self.wake_r.close()
        self.wake_w.close()
        if self.error is not None:
            raise self.error


class State:
    """What the loop's health() and render() read: set by the test."""

    def __init__(self) -> None:
        self.health = "serving"
        self.renders = 0
        self.fail = False

    def render(self) -> bytes:
        self.renders += 1
        if self.fail:
            raise RuntimeError("broken renderer")
        counters = metrics.WorkerCounters()
        counters.opened()
        counters.closed("client_closed", 1234, 1234)
        facts = metrics.SupervisorFacts(
            open_connections=0, workers={"running": 1}, start_time=time.time()
        )
        return metrics.render(counters.snapshot(), facts)


@pytest.fixture
def state() -> State:
    return State()


@pytest.fixture
def endpoint(state: State) -> Iterator[tuple[int, Loop]]:
    server = MetricsServer(
        "127.0.0.1", 0, state.render, lambda: state.health, max_clients=4, client_timeout=2.0
    )
    loop = Loop(server).start()
    try:
        yield server.bound_port(), loop
    finally:
        loop.stop()


def exchange(port: int, request: bytes) -> bytes:
    """Send ``request``, half-close, and return the whole answer (to EOF)."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        return read_to_eof(sock)


def read_to_eof(sock: socket.socket) -> bytes:
    answer = bytearray()
    while chunk := sock.recv(65536):
        answer += chunk
    return bytes(answer)


def split(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status code, headers (lower-case names) and body of an HTTP answer."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return int(status.split()[1]), {k.lower(): v for k, v in headers.items()}, body


def get(port: int, path: str, method: str = "GET", version: str = "1.1") -> bytes:
    return exchange(port, f"{method} {path} HTTP/{version}\r\nHost: x\r\n\r\n".encode())


def test_metrics_answers_the_exposition(endpoint: tuple[int, Loop]) -> None:
    """GET /metrics is 200 with the 0.0.4 text content type and the rendered metrics."""
    port, _ = endpoint
    code, headers, body = split(get(port, "/metrics"))
    assert code == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert int(headers["content-length"]) == len(body)
    assert headers["connection"] == "close"
    assert b"echod_received_bytes_total 1234.0\n" in body


def test_query_string_and_http10_are_served(endpoint: tuple[int, Loop]) -> None:
    """An HTTP/1.0 request and a query string still reach /metrics."""
    port, _ = endpoint
    assert split(get(port, "/metrics?x=1", version="1.0"))[0] == 200
    assert split(exchange(port, b"GET /healthz HTTP/1.0\n\n"))[0] == 200


def test_head_has_headers_and_no_body(endpoint: tuple[int, Loop], state: State) -> None:
    """HEAD /metrics gives the GET's headers, Content-Length included, and no body."""
    port, _ = endpoint
    code, headers, body = split(get(port, "/metrics", method="HEAD"))
    assert code == 200 and body == b""
    assert int(headers["content-length"]) > 100


def test_healthz_follows_the_state(endpoint: tuple[int, Loop], state: State) -> None:
    """/healthz is 200 ok while serving and 503 with the state while draining or stopping."""
    port, _ = endpoint
    assert split(get(port, "/healthz"))[::2] == (200, b"ok\n")
    state.health = "draining"
    assert split(get(port, "/healthz"))[::2] == (503, b"draining\n")
    state.health = "stopping"
    assert split(get(port, "/healthz"))[::2] == (503, b"stopping\n")


def test_agent_check_answers(endpoint: tuple[int, Loop], state: State) -> None:
    """A first line 'agent' gets HAProxy's agent-check words for the state."""
    port, _ = endpoint
    assert exchange(port, b"agent\n") == b"up ready\n"
    state.health = "draining"
    assert exchange(port, b"agent\r\n") == b"drain\n"
    state.health = "stopping"
    assert exchange(port, b"agent\n") == b"down\n"


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        (b"GET /nothing HTTP/1.1\r\n\r\n", 404),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
        (b"DELETE /healthz HTTP/1.1\r\n\r\n", 405),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
        (b"GET /metrics\r\n\r\n", 400),
        (b"GET /metrics SPDY/3\r\n\r\n", 400),
        (b"\r\n\r\n", 400),
    ],
)
def test_errors(endpoint: tuple[int, Loop], request_bytes: bytes, code: int) -> None:
    """Unknown paths are 404, other methods 405 (with Allow), garbage 400."""
    port, _ = endpoint
    got, headers, _ = split(exchange(port, request_bytes))
    assert got == code
    if code == 405:
        assert headers["allow"] == "GET, HEAD"


def test_oversize_request_is_refused(endpoint: tuple[int, Loop], state: State) -> None:
    """Headers past MAX_REQUEST get 431, without a render."""
    port, _ = endpoint
    request = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * MAX_REQUEST + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it may answer and close before all of it is sent
        answer = read_to_eof(sock)
    assert split(answer)[0] == 431
    assert state.renders == 0


def test_trickled_request_is_served(endpoint: tuple[int, Loop]) -> None:
    """A request sent one byte at a time is answered once complete."""
    port, _ = endpoint
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in request:
            sock.send(bytes([byte]))
        assert split(read_to_eof(sock))[0] == 200


def test_slowloris_does_not_block_others(endpoint: tuple[int, Loop]) -> None:
    """A client that never finishes its request neither delays a second one nor outlives
    its deadline."""
    port, _ = endpoint
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as slow:
        slow.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
        started = time.monotonic()
        assert split(get(port, "/metrics"))[0] == 200
        assert slow.recv(1) == b""  # closed by its deadline, unanswered
        assert time.monotonic() - started < DEADLINE


def test_idle_clients_cannot_lock_out_a_scraper(endpoint: tuple[int, Loop]) -> None:
    """Past max_clients, the oldest idle connection is closed to make room."""
    port, _ = endpoint
    idle = [socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) for _ in range(4)]
    try:
        assert split(get(port, "/healthz"))[0] == 200
        assert idle[0].recv(1) == b""  # the oldest was pushed out
    finally:
        for sock in idle:
            sock.close()


def test_render_failure_is_a_500_and_logged(endpoint: tuple[int, Loop], state: State) -> None:
    """A renderer that raises costs that request a 500; the loop goes on serving."""
    port, loop = endpoint
    state.fail = True
    with capture_logs() as logs:
        assert split(get(port, "/metrics"))[0] == 500
    assert [e["event"] for e in logs] == ["metrics_error"]
    assert "broken renderer" in logs[0]["error"]
    state.fail = False
    assert split(get(port, "/metrics"))[0] == 200
    assert loop.thread.is_alive()


def test_client_that_resets_does_not_hurt(endpoint: tuple[int, Loop]) -> None:
    """Clients that reset mid-request or vanish before reading leave the server serving."""
    import struct

    port, _ = endpoint
    for payload in (b"GET /met", b"GET /metrics HTTP/1.1\r\n\r\n"):
        sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        sock.sendall(payload)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    assert split(get(port, "/metrics"))[0] == 200


def test_close_frees_the_port_and_descriptors(state: State) -> None:
    """After close() the port can be bound again and no descriptor is left open."""
    before = len(open_files(os.getpid()))
    server = MetricsServer("127.0.0.1", 0, state.render, lambda: state.health)
    loop = Loop(server).start()
    port = server.bound_port()
    held = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    wait_for(lambda: server.clients, what="the held client accepted")
    loop.stop()
    assert held.recv(1) == b""
    held.close()
    with socket.socket() as again:
        # SO_REUSEADDR admits the closed connection's TIME_WAIT, not a listener still open.
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
        again.listen()
    assert len(open_files(os.getpid())) == before


def test_port_in_use_is_an_operator_error(state: State) -> None:
    """Binding a port that is taken raises OperatorError with exit code 69 and says metrics."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = MetricsServer("127.0.0.1", port, state.render, lambda: state.health)
        with selectors.DefaultSelector() as selector, pytest.raises(OperatorError) as caught:
            server.open(selector)
    assert caught.value.exit_code == exitcodes.EX_UNAVAILABLE
    assert str(caught.value).startswith("metrics: cannot listen on tcp 127.0.0.1:")
    assert "address already in use" in str(caught.value)


def test_ipv6_and_names_bind(state: State) -> None:
    """'localhost' binds what it resolves to and answers on the port it reports."""
    port = free_port()
    server = MetricsServer("localhost", port, state.render, lambda: state.health)
    loop = Loop(server).start()
    try:
        assert server.bound_port() == port
        assert all(a.startswith("http://") for a in server.addresses())
        assert split(get(port, "/healthz"))[0] == 200
    finally:
        loop.stop()


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: apt-get install prometheus (.ci/run does)")
    return path


def check_metrics(text: bytes) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), "check", "metrics"],
        input=text.decode(),
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )


def test_promtool_accepts_the_exposition(endpoint: tuple[int, Loop]) -> None:
    """promtool check metrics (Prometheus's own linter) finds nothing in what is served."""
    port, _ = endpoint
    code, _, body = split(get(port, "/metrics"))
    assert code == 200
    result = check_metrics(body)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


def test_promtool_catches_a_bad_exposition() -> None:
    """The check above can fail: promtool rejects a counter without _total."""
    result = check_metrics(b"# HELP x_bytes y\n# TYPE x_bytes counter\nx_bytes 1\n")
    assert result.returncode != 0
    assert '"_total" suffix' in result.stdout + result.stderr


def test_out_of_descriptors_pauses_then_recovers(tmp_path: Path) -> None:
    """With no descriptor left, the endpoint (in a process of its own) stops accepting
    instead of failing, and serves again once clients leave."""
    port = free_port()
    out = tmp_path / "exporter.txt"
    with open(out, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fleet.exporter", f"127.0.0.1:{port}"],
            stdout=sink, stderr=sink, cwd=ROOT, start_new_session=True,
            preexec_fn=rlimit_nofile(16),  # noqa: PLW1509 - only setrlimit
        )
    held: list[socket.socket] = []
    try:
        wait_text(out, lambda text: "ready" in text, what="exporter ready")
        free = 16 - len(os.listdir(f"/proc/{proc.pid}/fd"))
        # More clients than it has descriptors: the last ones wait in its backlog.
        held = [socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
                for _ in range(free + 3)]
        wait_for(lambda: len(os.listdir(f"/proc/{proc.pid}/fd")) == 16, what="fds exhausted")
        for sock in held:
            sock.close()
        held = []
        assert split(get(port, "/healthz"))[0] == 200
        assert proc.poll() is None
        assert "Traceback" not in out.read_text()
    finally:
        for sock in held:
            sock.close()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(DEADLINE)
