"""The control protocol between supervisor and workers: every message round-trips, and
anything else is refused with ValueError (garbage, truncation, oversize), never a crash."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from collections.abc import Iterator

import pytest
import structlog
from structlog.testing import capture_logs

from echod import control
from echod.pool import WorkerHandle, WorkerPool
from echod.states import WorkerState

COUNTERS = {"opened": 10, "closed:client_closed": 9, "bytes_in": 1234, "refused:per_ip": 2}

MESSAGES: list[control.Message] = [
    control.Ready(),
    control.Heartbeat(3, 17),
    control.Heartbeat(0, 0, COUNTERS),
    control.Stopping(0),
    control.Stopping(5000),
    control.Bye(16, 1, 17),
    control.Bye(0, 0, 0, {"x.y-z": control.MAX_VALUE}),
    control.Stop(),
    control.Retire(),
    control.RetireListeners(),
    control.Reopen(),
    control.Quit(),
    control.ListConnections(7),
    # A listing's data is the rest of the packet, spaces (leading ones too) and all.
    control.Connections(7, 1, b' [{"conn_id": "3-1", "thread": "conn 3 1"}]'),
    control.Connections(0, 0, b"[]"),
    control.Cut(7, 0, (12, 15)),
    control.Cut(1, 3),
    control.CutDone(7, (12, 15)),
    control.CutDone(2),
    control.Limits(100, 0, 2500),
    control.RetireBy(30000),
]


@pytest.mark.parametrize("message", MESSAGES, ids=repr)
def test_every_message_round_trips(message: control.Message) -> None:
    """decode(encode(m)) == m for each message type, counters included."""
    assert control.decode(control.encode(message)) == message


def test_the_encoding_is_compact_text() -> None:
    """A heartbeat is its tag, its counts and name=value pairs, space separated."""
    assert control.encode(control.Heartbeat(3, 17, {"opened": 20})) == b"hb 3 17 opened=20"
    assert control.encode(control.RetireListeners()) == b"retire-listeners"
    assert control.encode(control.Stopping(3)) == b"stopping 3"
    assert control.encode(control.Cut(7, 0, (12, 15))) == b"cut 7 0 12 15"
    assert control.encode(control.CutDone(7, (12, 15))) == b"cut-done 7 12 15"
    assert control.encode(control.Connections(7, 1, b'[{"a": 1}]')) == b'conns 7 1 [{"a": 1}]'
    assert control.encode(control.Limits(100, 0, 2500)) == b"limits 100 0 2500"


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
    b"stopping",
    b"stopping x",
    b"stopping -1",
    b"stopping 1 2",
    b"stopping 1 opened=1",
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


def test_a_full_queue_waits_for_room_in_order_or_not_at_all() -> None:
    """On a non-blocking socket whose queue is full: without ``wait`` the message is not
    sent (False); with it, it goes as soon as the reader makes room, after everything sent
    before it, and nothing is lost."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        theirs.setblocking(False)
        sent = 0
        for _ in range(100_000):  # bounded: the queue fills long before
            if not control.send(theirs, control.Connections(sent, 0, b"[]")):
                break
            sent += 1
        assert 0 < sent < 100_000
        reader_done: list[list[control.Message]] = []

        def read_all() -> None:
            got = []
            ours.settimeout(10)
            for _ in range(sent + 1):
                got.append(control.decode(ours.recv(control.MAX_MESSAGE + 1)))
            reader_done.append(got)

        reader = threading.Thread(target=read_all)
        reader.start()
        assert control.send(theirs, control.Connections(sent, 1, b"[]"), wait=10.0)
        reader.join(15)
        assert reader_done, "the reader did not get every message"
        assert reader_done[0] == [
            control.Connections(n, int(n == sent), b"[]") for n in range(sent + 1)
        ]


class Owner:
    """Records what the pool tells the supervisor."""

    def __init__(self) -> None:
        self.ready: list[int] = []
        self.changes = 0

    def worker_ready(self, handle: WorkerHandle) -> None:
        self.ready.append(handle.pid)

    def worker_failed(self, handle: WorkerHandle, failures: int) -> None:
        raise AssertionError("no worker fails here")

    def worker_quit(self, handle: WorkerHandle) -> None:
        raise AssertionError("no worker quits here")

    def counts_changed(self, force: bool) -> None:
        self.changes += 1


@contextlib.contextmanager
def pool_with_a_worker() -> Iterator[tuple[Owner, WorkerPool, WorkerHandle, socket.socket]]:
    """A pool reading one worker's real channel: (its owner, the pool, the worker's handle,
    the worker's end of the channel)."""
    owner = Owner()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs, selectors.DefaultSelector() as selector:
        ours.setblocking(False)
        pool = WorkerPool(owner, structlog.get_logger, lambda: None)
        pool.selector = selector
        handle = WorkerHandle(1, 1, 1, 4242, control=ours, mode="thread", started=0.0)
        selector.register(ours, selectors.EVENT_READ, handle)
        yield owner, pool, handle, theirs


def test_the_supervisor_side_logs_garbage_once_and_keeps_the_worker() -> None:
    """Packets that are not messages, read from a real channel, are logged once per worker
    and change nothing; the messages around them are taken as usual."""
    with pool_with_a_worker() as (owner, pool, handle, theirs):
        sent = [
            b"ready",
            b"hb 1 2 opened=3",
            b"hb one two",
            b"\x00\xff" * 100,
            b"x" * (control.MAX_MESSAGE + 10),
            b"hb 0 5 opened=6",
        ]
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * control.MAX_MESSAGE)
        for packet in sent:
            theirs.send(packet)
        with capture_logs() as logs:
            for _ in sent:
                pool.on_readable(handle)
        garbled = [e for e in logs if e["event"] == "control_garbled"]
        assert len(garbled) == 1 and garbled[0]["worker_pid"] == 4242
        assert pool.garbled[handle.serial] == 3
        assert owner.ready == [4242] and handle.state is WorkerState.RUNNING
        assert (handle.open, handle.served) == (0, 5)
        assert pool.totals.snapshot() == {"opened": 6}


def test_the_supervisor_side_keeps_the_count_at_the_stop_and_the_bye() -> None:
    """A worker's answer to the stop is kept as its count at the stop (and its open count);
    heartbeats after it change the open count only; the bye says it ended by itself."""
    with pool_with_a_worker() as (_owner, pool, handle, theirs):
        control.send(theirs, control.Heartbeat(9, 20))
        control.send(theirs, control.Stopping(7))
        pool.on_readable(handle)
        pool.on_readable(handle)
        assert (handle.stop_open, handle.open, handle.said_bye) == (7, 7, False)
        control.send(theirs, control.Heartbeat(2, 25))
        pool.on_readable(handle)
        assert (handle.stop_open, handle.open) == (7, 2)
        control.send(theirs, control.Bye(5, 2, 27))
        pool.on_readable(handle)
        assert (handle.stop_open, handle.open, handle.said_bye) == (7, 0, True)
        assert (handle.finished, handle.cut, handle.served) == (5, 2, 27)
