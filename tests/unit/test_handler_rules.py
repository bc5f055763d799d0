"""EchoHandler's edges on real loopback sockets: socket options, the reasons a connection ends,
the slow write path, a shared descriptor, and the close event's fields.

These are the checks the mutation run (``make mutation``) found missing.
"""

from __future__ import annotations

import signal
import socket
import struct
import threading
import time
from typing import Any

import pytest
from structlog.testing import capture_logs

from echod.handler import (
    CLIENT_CLOSED,
    ERROR,
    IDLE_TIMEOUT,
    RESET,
    SHUTDOWN,
    WRITE_TIMEOUT,
    EchoHandler,
    peer_fields,
    timeval,
)
from tests.support import wait_for
from tests.unit.handler_kit import (
    FlagStopper,
    queued,
    send_quietly,
    serve_in_thread,
    settings,
    waiting,
)

pytestmark = pytest.mark.timeout(30)

TIMEVAL = struct.calcsize("@ll")


def timeouts(sock: socket.socket) -> tuple[float, float]:
    """The socket's SO_RCVTIMEO and SO_SNDTIMEO in seconds."""
    found = []
    for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
        seconds, micro = struct.unpack("@ll", sock.getsockopt(socket.SOL_SOCKET, option, TIMEVAL))
        found.append(seconds + micro / 1e6)
    return found[0], found[1]


def about(seconds: float) -> Any:
    """A timeout as the kernel keeps it: rounded up to its clock tick (at most 10 ms)."""
    return pytest.approx(seconds, abs=0.011)


def test_timeval_never_rounds_up_to_a_whole_second() -> None:
    """Just under a second gives 999999 microseconds, never 1000000 (which the kernel refuses)."""
    assert struct.unpack("@ll", timeval(0.9999995)) == (0, 999999)
    assert struct.unpack("@ll", timeval(2.9999995)) == (2, 999999)


def test_peer_fields_of_a_one_element_tuple() -> None:
    """A tuple too short to hold a port is shown whole, with no port."""
    assert peer_fields(("x",)) == {"peer": "('x',)", "peer_port": None}


@pytest.mark.parametrize(("idle", "write"), [(0.5, 0.25), (0.0, 2.0), (3.0, 0.0), (0.0, 0.0)])
def test_setup_sets_the_kernel_timeouts(
    tcp_pair: tuple[socket.socket, socket.socket, Any], idle: float, write: float
) -> None:
    """setup makes the socket blocking and hands each timeout to the kernel, 0 leaving none."""
    _, server_side, peer = tcp_pair
    server_side.settimeout(5.0)
    handler = EchoHandler(
        server_side,
        peer,
        "1-1",
        settings(idle_timeout=idle, write_timeout=write, log_connections=False),
        FlagStopper(),
    )
    handler.setup()
    assert server_side.gettimeout() is None
    assert timeouts(server_side) == (about(idle), about(write))
    assert handler.started > 0


def test_open_event_uses_the_address_it_was_given(
    tcp_pair: tuple[socket.socket, socket.socket, Any],
) -> None:
    """A local address handed in by the worker is logged as is, without asking the socket."""
    _, server_side, peer = tcp_pair
    local = ("192.0.2.7", 4242)
    handler = EchoHandler(server_side, peer, "1-2", settings(), FlagStopper(), local=local)
    with capture_logs() as logs:
        handler.setup()
    assert logs == [
        {
            "event": "conn_open",
            "log_level": "info",
            "conn_id": "1-2",
            "mode": "thread",
            "local_address": "192.0.2.7",
            "local_port": 4242,
            "peer": peer[0],
            "peer_port": peer[1],
        }
    ]


def test_open_event_asks_the_socket_behind_a_wildcard(
    tcp_pair: tuple[socket.socket, socket.socket, Any],
) -> None:
    """Without an address from the worker (a wildcard listener), the socket says the address
    and port the client reached."""
    _, server_side, peer = tcp_pair
    handler = EchoHandler(server_side, peer, "1-4", settings(), FlagStopper())
    with capture_logs() as logs:
        handler.setup()
    assert (logs[0]["local_address"], logs[0]["local_port"]) == server_side.getsockname()


def test_open_event_of_a_socket_that_cannot_say_its_port() -> None:
    """When getsockname fails the open event says local_address and local_port None, and
    serving goes on."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.close()
    handler = EchoHandler(
        sock, ("127.0.0.1", 1), "1-3", settings(idle_timeout=0, write_timeout=0), FlagStopper()
    )
    with capture_logs() as logs:
        handler.setup()
    assert (logs[0]["local_address"], logs[0]["local_port"]) == (None, None)


def test_an_unexpected_error_is_logged_with_its_type(
    tcp_pair: tuple[socket.socket, socket.socket, Any],
) -> None:
    """An exception that is not the peer's doing ends the connection with reason error and
    the exception's type and text, and the close event still comes."""
    client, server_side, peer = tcp_pair
    stopper = FlagStopper()
    handler = EchoHandler(server_side, peer, "1-4", settings(buffer_size=-1), stopper)
    with capture_logs() as logs:
        handler.serve()
    assert (handler.reason, handler.error) == (ERROR, "ValueError: negative buffersize in recv")
    assert logs[-1]["event"] == "conn_close"
    assert (logs[-1]["reason"], logs[-1]["error"]) == (ERROR, handler.error)
    assert stopper.before_close_calls == 1
    assert client.recv(1) == b""


def test_close_event_fields(tcp_pair: tuple[socket.socket, socket.socket, Any]) -> None:
    """The close event counts the bytes both ways and gives a duration in seconds, rounded to
    the microsecond."""
    client, server_side, peer = tcp_pair
    handler = EchoHandler(server_side, peer, "1-5", settings(), FlagStopper())
    with capture_logs() as logs:
        thread = serve_in_thread(handler)
        client.sendall(b"12345")
        assert client.recv(5) == b"12345"
        client.shutdown(socket.SHUT_WR)
        assert client.recv(1) == b""
        thread.join(10)
    closed = logs[-1]
    assert (closed["bytes_in"], closed["bytes_out"], closed["reason"]) == (5, 5, CLIENT_CLOSED)
    assert isinstance(closed["duration"], float)
    assert 0 <= closed["duration"] < 10
    assert closed["duration"] == round(closed["duration"], 6)
    assert "error" not in closed


def test_durations_are_rounded_to_the_microsecond() -> None:
    """Every close event's duration has at most six decimals, over several connections."""
    with capture_logs() as logs:
        for number in range(6):
            with socket.create_server(("127.0.0.1", 0)) as listener:
                client = socket.create_connection(listener.getsockname(), timeout=10)
                server_side, peer = listener.accept()
            with client:
                client.shutdown(socket.SHUT_WR)
                EchoHandler(server_side, peer, f"2-{number}", settings(), FlagStopper()).serve()
    durations = [e["duration"] for e in logs if e["event"] == "conn_close"]
    assert len(durations) == 6
    assert [round(d, 6) for d in durations] == durations


def test_a_cut_wins_over_a_reset(tcp_pair: tuple[socket.socket, socket.socket, Any]) -> None:
    """A connection the worker has cut ends with reason shutdown even when the peer reset it."""
    client, server_side, peer = tcp_pair
    stopper = FlagStopper()
    handler = EchoHandler(server_side, peer, "1-6", settings(), stopper)
    thread = serve_in_thread(handler)
    client.sendall(b"x")
    assert client.recv(1) == b"x"
    stopper.cut = True
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    thread.join(10)
    assert (handler.reason, handler.error) == (SHUTDOWN, None)


def test_a_cut_wins_over_an_idle_timeout(
    tcp_pair: tuple[socket.socket, socket.socket, Any],
) -> None:
    """A cut connection whose receive timeout expires ends with reason shutdown."""
    _, server_side, peer = tcp_pair
    stopper = FlagStopper()
    stopper.cut = True
    handler = EchoHandler(server_side, peer, "1-7", settings(idle_timeout=0.05), stopper)
    handler.serve()
    assert handler.reason == SHUTDOWN


def test_idle_timeout_below_a_second_is_honoured(
    tcp_pair: tuple[socket.socket, socket.socket, Any],
) -> None:
    """An idle timeout of a fraction of a second closes a silent client with idle_timeout."""
    client, server_side, peer = tcp_pair
    handler = EchoHandler(server_side, peer, "1-8", settings(idle_timeout=0.3), FlagStopper())
    started = time.monotonic()
    handler.serve()
    assert handler.reason == IDLE_TIMEOUT
    assert 0.25 <= time.monotonic() - started < 5
    assert client.recv(1) == b""


def test_shared_descriptor_is_shut_down_so_the_client_sees_the_end(
    tcp_pair: tuple[socket.socket, socket.socket, Any],
) -> None:
    """With another descriptor of the socket open (process mode), finish shuts the connection
    down, so a client that went idle gets its EOF although that descriptor stays open."""
    client, server_side, peer = tcp_pair
    other = server_side.dup()
    try:
        handler = EchoHandler(
            server_side,
            peer,
            "1-9",
            settings(idle_timeout=0.05),
            FlagStopper(),
            shared_descriptor=True,
        )
        handler.serve()
        assert handler.reason == IDLE_TIMEOUT
        client.settimeout(5)
        assert client.recv(1) == b""
        with pytest.raises(OSError):
            other.send(b"late")
    finally:
        other.close()


def test_an_unshared_descriptor_is_only_closed(
    tcp_pair: tuple[socket.socket, socket.socket, Any],
) -> None:
    """By default (the thread mode: no other process holds the socket) finish closes its
    descriptor without shutting the connection down, so another descriptor of it still works."""
    client, server_side, peer = tcp_pair
    other = server_side.dup()
    try:
        handler = EchoHandler(server_side, peer, "1-12", settings(idle_timeout=0.05), FlagStopper())
        handler.serve()
        assert handler.reason == IDLE_TIMEOUT
        assert server_side.fileno() == -1
        other.sendall(b"still open")
        client.settimeout(5)
        assert client.recv(64) == b"still open"
    finally:
        other.close()


def test_serving_without_connection_logs_returns_cleanly(
    tcp_pair: tuple[socket.socket, socket.socket, Any],
) -> None:
    """With log.connections off, serve echoes and returns without a close event to write."""
    client, server_side, peer = tcp_pair
    client.sendall(b"abc")
    client.shutdown(socket.SHUT_WR)
    handler = EchoHandler(server_side, peer, "1-13", settings(log_connections=False), FlagStopper())
    with capture_logs() as logs:
        assert handler.serve() is None
    assert (handler.reason, logs) == (CLIENT_CLOSED, [])
    assert client.recv(3) == b"abc"


def blocked_one_byte_at_a_time(
    tcp_pair: tuple[socket.socket, socket.socket, Any], write_timeout: float
) -> tuple[EchoHandler, threading.Thread, socket.socket]:
    """A handler that reads one byte at a time from a client that sends and never reads, so
    that it ends up blocked sending a byte that cannot be sent at all."""
    client, server_side, peer = tcp_pair
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    handler = EchoHandler(
        server_side,
        peer,
        "1-14",
        settings(buffer_size=1, write_timeout=write_timeout),
        FlagStopper(),
    )
    thread = serve_in_thread(handler)
    sender = threading.Thread(target=lambda: send_quietly(client, b"o" * (1 << 20)), daemon=True)
    sender.start()
    return handler, thread, client


def test_a_byte_that_cannot_be_sent_ends_with_write_timeout(
    tcp_pair: tuple[socket.socket, socket.socket, Any],
) -> None:
    """When not one byte of the echo can be sent within write_timeout, the connection ends
    with write_timeout, that byte read but not echoed."""
    handler, thread, _ = blocked_one_byte_at_a_time(tcp_pair, 0.2)
    thread.join(20)
    assert not thread.is_alive()
    assert handler.reason == WRITE_TIMEOUT
    assert handler.bytes_in == handler.bytes_out + 1


def test_a_reset_while_blocked_sending_ends_with_reset(
    tcp_pair: tuple[socket.socket, socket.socket, Any],
) -> None:
    """A client that resets while the handler waits to send it a byte ends with reason reset."""
    handler, thread, client = blocked_one_byte_at_a_time(tcp_pair, 0.0)
    last = [-1]

    def stalled() -> bool:
        # No byte echoed since the last look (2 ms or more ago), one read and not yet sent.
        now = handler.bytes_out
        same = now == last[0]
        last[0] = now
        return same and handler.bytes_in == now + 1

    wait_for(stalled, 10, what="the handler blocked in send")
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    thread.join(10)
    assert not thread.is_alive()
    assert handler.reason == RESET
    assert handler.error in ("[Errno 104] Connection reset by peer", "[Errno 32] Broken pipe")


def slow_write(
    tcp_pair: tuple[socket.socket, socket.socket, Any], write_timeout: float
) -> tuple[EchoHandler, threading.Thread, socket.socket]:
    """A handler in its slow path: its first read is far larger than the client's window and
    the client reads none of the echo, so the first send returns part-way at write_timeout."""
    client, server_side, peer = tcp_pair
    server_side.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    handler = EchoHandler(
        server_side,
        peer,
        "1-10",
        settings(buffer_size=4 << 20, write_timeout=write_timeout),
        FlagStopper(),
    )
    sender = threading.Thread(target=lambda: send_quietly(client, b"z" * (4 << 20)))
    sender.daemon = True
    sender.start()
    wait_for(lambda: waiting(server_side) >= 256 << 10, 10, what="256 KiB to read")
    thread = serve_in_thread(handler)
    wait_for(lambda: 0 < handler.bytes_out < handler.bytes_in, 10, what="a partial send")
    return handler, thread, client


def test_a_reset_during_a_slow_write_ends_with_reset(
    tcp_pair: tuple[socket.socket, socket.socket, Any],
) -> None:
    """A client that resets while the handler is still writing its echo ends with reason
    reset and the OS's words for it."""
    client, server_side, peer = tcp_pair
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    handler = EchoHandler(server_side, peer, "1-12", settings(buffer_size=4 << 20), FlagStopper())
    thread = serve_in_thread(handler)
    sender = threading.Thread(target=lambda: send_quietly(client, b"r" * (1 << 20)), daemon=True)
    sender.start()
    # The first send has queued part of a read and waits for room: a reset now cuts it short.
    wait_for(lambda: handler.bytes_in > 0 and queued(server_side) > 0, 10, what="a blocked send")
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    thread.join(10)
    assert not thread.is_alive()
    assert handler.reason == RESET
    assert handler.error in ("[Errno 104] Connection reset by peer", "[Errno 32] Broken pipe")


def test_write_timeout_bounds_the_whole_slow_write(
    tcp_pair: tuple[socket.socket, socket.socket, Any],
) -> None:
    """A client that takes its echo a trickle at a time cannot stretch a write past
    write_timeout: the handler ends it with write_timeout although each bit moved."""
    handler, thread, client = slow_write(tcp_pair, 0.5)
    started = time.monotonic()
    client.settimeout(0.05)
    deadline = started + 10
    while thread.is_alive() and time.monotonic() < deadline:
        try:
            client.recv(65536)  # paced by the join below: enough for a write to progress
        except TimeoutError:
            pass
        except OSError:
            break
        thread.join(0.05)
    assert not thread.is_alive()
    assert handler.reason == WRITE_TIMEOUT
    assert time.monotonic() - started < 5


def interrupted_send(
    tcp_pair: tuple[socket.socket, socket.socket, Any], then: Any, write_timeout: float = 1.0
) -> tuple[EchoHandler, socket.socket]:
    """Serve in this (the main) thread a client that sends 1 MiB without reading; once the
    first send is blocked, interrupt it with a signal, so that it returns having sent part of
    its bytes, early, then run ``then(client, handler)`` from a helper thread."""
    client, server_side, peer = tcp_pair
    server_side.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    handler = EchoHandler(
        server_side,
        peer,
        "1-15",
        settings(buffer_size=1 << 20, write_timeout=write_timeout),
        FlagStopper(),
    )
    main = threading.main_thread().ident
    assert main is not None and main == threading.get_ident()
    sender = threading.Thread(target=lambda: send_quietly(client, b"s" * (1 << 20)))
    sender.daemon = True
    sender.start()
    # A first read far larger than the client's window, so that its echo must block.
    wait_for(lambda: waiting(server_side) >= 256 << 10, 10, what="256 KiB to read")

    def helper() -> None:
        wait_for(
            lambda: handler.bytes_in > 0 and handler.bytes_out == 0 and queued(server_side) > 0,
            10,
            what="the first send blocked",
        )
        signal.pthread_kill(main, signal.SIGUSR1)
        wait_for(lambda: handler.bytes_out > 0, 10, what="the interrupted send")
        then(client, handler)

    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        worker = threading.Thread(target=helper, daemon=True)
        worker.start()
        handler.serve()
        SERVED.set()
        worker.join(10)
    finally:
        signal.signal(signal.SIGUSR1, previous)
        SERVED.clear()
    return handler, client


SERVED = threading.Event()  # set when interrupted_send's handler has returned


@pytest.mark.parametrize("write_timeout", [1.0, 0.0])
def test_an_interrupted_send_goes_on_within_write_timeout(
    tcp_pair: tuple[socket.socket, socket.socket, Any], write_timeout: float
) -> None:
    """A send cut short by a signal goes on with the rest, under what is left of
    write_timeout (or without limit when it is 0): a client that then reads gets its whole
    echo."""
    received = bytearray()

    def read_all(client: socket.socket, handler: EchoHandler) -> None:
        while len(received) < 1 << 20:
            chunk = client.recv(1 << 20)
            if not chunk:
                return
            received.extend(chunk)
        client.shutdown(socket.SHUT_WR)

    handler, _ = interrupted_send(tcp_pair, read_all, write_timeout)
    assert handler.reason == CLIENT_CLOSED
    assert handler.bytes_in == handler.bytes_out == len(received) == 1 << 20


def test_a_reset_after_an_interrupted_send_ends_with_reset(
    tcp_pair: tuple[socket.socket, socket.socket, Any],
) -> None:
    """A client that resets while the rest of an interrupted send waits ends with reason
    reset and the OS's words for it."""

    def reset(client: socket.socket, handler: EchoHandler) -> None:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()

    handler, _ = interrupted_send(tcp_pair, reset)
    assert handler.reason == RESET
    assert handler.error in ("[Errno 104] Connection reset by peer", "[Errno 32] Broken pipe")


def test_the_rest_of_an_interrupted_send_keeps_the_deadline(
    tcp_pair: tuple[socket.socket, socket.socket, Any],
) -> None:
    """After a signal cut a send short, the rest must go within what is left of
    write_timeout: a client that takes nothing more is closed with write_timeout in time."""
    started = time.monotonic()
    handler, _ = interrupted_send(tcp_pair, lambda client, handler: None)
    assert handler.reason == WRITE_TIMEOUT
    assert time.monotonic() - started < 5


def test_the_rest_of_an_interrupted_send_is_sent_bit_by_bit(
    tcp_pair: tuple[socket.socket, socket.socket, Any],
) -> None:
    """A client that takes the rest of an interrupted send slowly gets it a part at a time
    until write_timeout runs out, then the connection ends with write_timeout."""

    def trickle(client: socket.socket, handler: EchoHandler) -> None:
        client.settimeout(0.05)
        deadline = time.monotonic() + 15
        while not SERVED.is_set() and time.monotonic() < deadline:
            try:
                client.recv(16384)
            except TimeoutError:
                pass
            except OSError:
                return
            SERVED.wait(0.05)  # paces the client: about 300 KB a second

    handler, _ = interrupted_send(tcp_pair, trickle)
    assert handler.reason == WRITE_TIMEOUT
    assert 0 < handler.bytes_out < handler.bytes_in


@pytest.mark.parametrize("write_timeout", [7.0, 0.75])
def test_the_send_timeout_is_restored_after_a_slow_write(
    tcp_pair: tuple[socket.socket, socket.socket, Any], write_timeout: float
) -> None:
    """After the slow path has sent everything, the socket's send timeout is write_timeout
    again, not what was left of it."""
    client, server_side, peer = tcp_pair
    handler = EchoHandler(
        server_side, peer, "1-11", settings(write_timeout=write_timeout), FlagStopper()
    )
    handler.setup()
    data = b"w" * 100_000
    reader = threading.Thread(target=lambda: _recv_exactly(client, len(data)), daemon=True)
    reader.start()
    # As if the first send had taken half a second: the rest goes under a shorter timeout.
    handler._send_rest(memoryview(data), time.monotonic() - write_timeout / 2)
    reader.join(10)
    assert handler.bytes_out == len(data)
    assert timeouts(server_side)[1] == about(write_timeout)


def _recv_exactly(sock: socket.socket, size: int) -> None:
    got = 0
    while got < size:
        chunk = sock.recv(65536)
        if not chunk:
            return
        got += len(chunk)
