"""The control protocol between supervisor and workers: every message round-trips, and
anything else is refused with ValueError (garbage, truncation, oversize), never a crash."""

from __future__ import annotations

import socket

import pytest

from echod import control

COUNTERS = {"opened": 10, "closed:client_closed": 9, "bytes_in": 1234, "refused:per_ip": 2}

MESSAGES: list[control.Message] = [
    control.Ready(),
    control.Heartbeat(3, 17),
    control.Heartbeat(0, 0, COUNTERS),
    control.Bye(16, 1, 17),
    control.Bye(0, 0, 0, {"x.y-z": control.MAX_VALUE}),
    control.Stop(),
    control.Retire(),
    control.RetireListeners(),
    control.Reopen(),
    control.Quit(),
]


@pytest.mark.parametrize("message", MESSAGES, ids=repr)
def test_every_message_round_trips(message: control.Message) -> None:
    """decode(encode(m)) == m for each message type, counters included."""
    assert control.decode(control.encode(message)) == message


def test_the_encoding_is_compact_text() -> None:
    """A heartbeat is its tag, its counts and name=value pairs, space separated."""
    assert control.encode(control.Heartbeat(3, 17, {"opened": 20})) == b"hb 3 17 opened=20"
    assert control.encode(control.RetireListeners()) == b"retire-listeners"


GARBAGE = [
    b"",
    b"hello",
    b"READY",
    b"ready now",
    b"hb",
    b"hb 1",
    b"hb 1 x",
    b"hb -1 2",
    b"hb +1 2",
    b"hb 1_0 2",
    b"hb 1 2 opened",
    b"hb 1 2 opened=",
    b"hb 1 2 =3",
    b"hb 1 2 opened=1 opened=2",
    b"hb 1 2 bad name=1",
    b"hb 1 2  opened=1",
    b"hb 1 2 opened=99999999999999999999",
    b"bye 1 2",
    b"stop 1",
    b"\xff\xfe",
    "hb \u0661 2".encode(),
]


@pytest.mark.parametrize("data", GARBAGE, ids=repr)
def test_garbage_is_a_value_error(data: bytes) -> None:
    """Malformed packets raise ValueError, saying what is wrong."""
    with pytest.raises(ValueError, match=r"."):
        control.decode(data)


def test_every_truncation_of_a_heartbeat_is_refused_or_a_prefix_message() -> None:
    """Cut at every byte, a heartbeat either fails to decode or decodes to a heartbeat whose
    fields are a truncation of the original: never an exception other than ValueError."""
    data = control.encode(control.Heartbeat(12, 345, COUNTERS))
    refused = 0
    for end in range(len(data)):
        try:
            message = control.decode(data[:end])
        except ValueError:
            refused += 1
            continue
        assert isinstance(message, control.Heartbeat)
    assert refused >= len(data) // 2


def test_oversize_is_refused_both_ways() -> None:
    """encode refuses a message over MAX_MESSAGE; decode refuses a packet over it."""
    huge = {f"counter_{i:06d}": i for i in range(control.MAX_MESSAGE // 10)}
    with pytest.raises(ValueError, match="over"):
        control.encode(control.Heartbeat(0, 0, huge))
    with pytest.raises(ValueError, match="over"):
        control.decode(b"hb 0 0 " + b"a=1 " * (control.MAX_MESSAGE // 4))


@pytest.mark.parametrize(
    "message",
    [
        control.Heartbeat(-1, 0),
        control.Heartbeat(True, 0),
        control.Bye(0, 0, control.MAX_VALUE + 1),
        control.Heartbeat(0, 0, {"with space": 1}),
        control.Heartbeat(0, 0, {"a=b": 1}),
        control.Heartbeat(0, 0, {"": 1}),
        control.Heartbeat(0, 0, {"neg": -5}),
    ],
    ids=repr,
)
def test_encode_refuses_what_decode_could_not_read(message: control.Message) -> None:
    """Negative, boolean or too large counts and names outside the alphabet are refused."""
    with pytest.raises(ValueError, match=r"."):
        control.encode(message)


def test_over_a_real_seqpacket_pair() -> None:
    """A large heartbeat crosses a SOCK_SEQPACKET pair whole; an oversize packet arrives cut
    at MAX_MESSAGE + 1 bytes and is refused; a closed peer reads as b""."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * control.MAX_MESSAGE)
        ours.setblocking(False)
        assert control.receive(ours) is None
        many = {f"c{i}": i for i in range(3000)}
        assert control.send(theirs, control.Heartbeat(1, 2, many))
        data = control.receive(ours)
        assert data is not None and control.decode(data) == control.Heartbeat(1, 2, many)
        theirs.send(b"x" * (control.MAX_MESSAGE + 100))
        data = control.receive(ours)
        assert data is not None and len(data) == control.MAX_MESSAGE + 1
        with pytest.raises(ValueError, match="over"):
            control.decode(data)
        theirs.close()
        assert control.receive(ours) == b""
        assert control.send(ours, control.Stop()) is False
