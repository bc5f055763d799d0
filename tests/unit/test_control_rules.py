"""The control messages' refusals, pinned word for word, the size limit at its edge, and
receive on a socket that fails.

These are the checks the mutation run (``make mutation``) found missing.
"""

from __future__ import annotations

import select
import socket

import pytest

from echod import control

pytestmark = pytest.mark.timeout(30)


def refusal(data: bytes) -> str:
    """What decode says when it refuses ``data``."""
    with pytest.raises(ValueError) as caught:
        control.decode(data)
    return str(caught.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"stop 1", "stop takes no arguments: b'stop 1'"),
        (b"hb 1", "hb needs 2 counts: b'hb 1'"),
        (b"bye 1 2", "bye needs 3 counts: b'bye 1 2'"),
        (b"stopping", "stopping needs 1 count: b'stopping'"),
        (b"stopping 3 opened=1", "stopping takes only 1 count: b'stopping 3 opened=1'"),
        (b"hb 1 2 nope", "bad counter b'nope'"),
        (b"hb 1 2 a=b=1", "bad count b'b=1' in b'hb 1 2 a=b=1'"),
        (b"hb 1 2 a=1 a=2", "counter a given twice"),
        (b"hb +1 2", "bad count b'+1' in b'hb +1 2'"),
        (b"hb 9999999999999999999 2", "count 9999999999999999999 is too large"),
        (b"hello", "unknown message b'hello'"),
        (b"conns 7 1", "conns needs its data: b'conns 7 1'"),
        (b"conns 7 1 ", "conns needs its data: b'conns 7 1 '"),
        (b"conns x 1 []", "bad count b'x' in b'conns x 1 []'"),
        (b"cut 7 0 12 x", "bad count b'x' in b'cut 7 0 12 x'"),
        (b"cut-done 7 -1", "bad count b'-1' in b'cut-done 7 -1'"),
    ],
)
def test_decode_says_what_is_wrong(data: bytes, message: str) -> None:
    """Each refusal names the fault and quotes the bytes at fault."""
    assert refusal(data) == message


def test_a_long_bad_message_is_quoted_to_eighty_bytes() -> None:
    """Up to 80 bytes are quoted whole; past 80 the quote is cut there and marked."""
    assert refusal(b"x" * 80) == f"unknown message {b'x' * 80!r}"
    assert refusal(b"y" * 81) == f"unknown message {b'y' * 80!r}..."


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (control.Heartbeat(0, 0, {"caf\u00e9": 1}), "not a counter name: 'caf\u00e9'"),
        (control.Heartbeat(-1, 0), "not a count: -1"),
    ],
)
def test_encode_says_what_is_wrong(message: control.Message, reason: str) -> None:
    """A name outside the alphabet (non-ASCII too) and a negative count are named."""
    with pytest.raises(ValueError) as caught:
        control.encode(message)
    assert str(caught.value) == reason


def exactly_max() -> control.Heartbeat:
    """A heartbeat whose packet is MAX_MESSAGE bytes exactly."""
    counters = {f"c{i:05d}": 0 for i in range((control.MAX_MESSAGE - 6) // 9)}
    counters["c00000"] = 10  # " c00000=0" is 9 bytes: one more digit makes up the rest
    return control.Heartbeat(0, 0, counters)


def test_a_message_of_exactly_the_limit_goes_both_ways() -> None:
    """MAX_MESSAGE bytes is allowed: encoded, and decoded back to the same message."""
    message = exactly_max()
    data = control.encode(message)
    assert len(data) == control.MAX_MESSAGE
    assert control.decode(data) == message
    with pytest.raises(ValueError) as caught:
        control.decode(data + b"0")
    assert str(caught.value) == (
        f"message of {control.MAX_MESSAGE + 1} bytes or more is over {control.MAX_MESSAGE}"
    )


def test_receive_on_a_failing_socket_is_the_end() -> None:
    """A socket whose recv fails (never connected) reads as the other side gone: b""."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.setblocking(False)
        assert control.receive(sock) == b""


class Poller:
    """Stands in for ``select.poll()`` in :func:`control.send`: records what it is asked,
    and at each poll makes room (the reader takes one packet) or not."""

    def __init__(self, reader: socket.socket | None) -> None:
        self.reader = reader
        self.registered: list[tuple[object, int]] = []
        self.timeouts: list[object] = []

    def register(self, sock: object, mask: int) -> None:
        self.registered.append((sock, mask))

    def poll(self, timeout: object) -> list[tuple[int, int]]:
        self.timeouts.append(timeout)
        if self.reader is not None:
            self.reader.recv(control.MAX_MESSAGE + 1)
        return []


def full_pair() -> tuple[socket.socket, socket.socket]:
    """A SOCK_SEQPACKET pair whose writer (the second) is non-blocking with a full queue."""
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    writer.setblocking(False)
    for _ in range(100_000):  # bounded: the queue fills long before
        try:
            writer.send(b"ready")
        except BlockingIOError:
            return reader, writer
    raise AssertionError("the queue never filled")


def test_a_full_queue_without_wait_is_not_waited_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """By default (the supervisor's way) a full queue is False at once: no poll at all."""
    reader, writer = full_pair()
    with reader, writer:
        monkeypatch.setattr(select, "poll", lambda: pytest.fail("send polled"))
        assert control.send(writer, control.Stop()) is False


def test_a_wait_polls_for_room_on_its_socket_for_what_is_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With ``wait`` a full queue is polled for POLLOUT on the socket itself, for the time
    left in milliseconds, and the message goes once there is room, however short the wait."""
    reader, writer = full_pair()
    with reader, writer:
        poller = Poller(reader)
        monkeypatch.setattr(select, "poll", lambda: poller)
        assert control.send(writer, control.Stop(), wait=0.5) is True
        assert poller.registered == [(writer, select.POLLOUT)]
        assert len(poller.timeouts) == 1
        timeout = poller.timeouts[0]
        assert isinstance(timeout, int) and 300 <= timeout <= 500


def test_a_queue_that_never_drains_ends_false(monkeypatch: pytest.MonkeyPatch) -> None:
    """A socket that stays full while poll keeps returning at once cannot hold the sender:
    the passes are bounded, and the message is not sent."""
    reader, writer = full_pair()
    with reader, writer:
        poller = Poller(None)
        monkeypatch.setattr(select, "poll", lambda: poller)
        assert control.send(writer, control.Stop(), wait=3600.0) is False
        assert len(poller.timeouts) == 100_000  # one a pass
