"""The stop's counts, per worker: what it is counted for in the stopping event, and how those
connections ended in the stopped event."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from echod.control import Bye, Heartbeat, Stopping
from echod.pool import WorkerHandle
from echod.shutdown import count_at_stop, settle

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def handle() -> Iterator[WorkerHandle]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        yield WorkerHandle(1, 1, 1, 4242, control=ours, mode="thread", started=0.0)


def heard(
    handle: WorkerHandle,
    *,
    open_: int | None = None,
    stop_open: int | None = None,
    bye: tuple[int, int] | None = None,
) -> None:
    """The worker's messages, in the order a worker sends them: a heartbeat (``open_``), its
    answer to the stop, then its bye (finished, cut)."""
    if stop_open is not None:
        handle.apply(Stopping(stop_open), 1.0)
    if open_ is not None:
        handle.apply(Heartbeat(open_, 0), 2.0)
    if bye is not None:
        handle.apply(Bye(bye[0], bye[1], 0), 3.0)


def test_a_worker_that_answered_is_counted_by_its_answer(handle: WorkerHandle) -> None:
    """Its own count at the stop is taken, not its heartbeat's, and it is confirmed."""
    heard(handle, open_=9)
    heard(handle, stop_open=7)
    assert count_at_stop(handle) == (7, True)


def test_a_worker_that_answered_zero_is_confirmed(handle: WorkerHandle) -> None:
    """An answer of 0 is an answer (not a missing one)."""
    heard(handle, open_=3)
    heard(handle, stop_open=0)
    assert count_at_stop(handle) == (0, True)


def test_a_worker_gone_with_its_bye_before_the_stop_had_nothing_open(
    handle: WorkerHandle,
) -> None:
    """A retiring worker that drained and exited before the stop reached it counts 0."""
    heard(handle, bye=(4, 0))
    assert count_at_stop(handle) == (0, True)


def test_a_silent_worker_is_counted_by_its_heartbeat_unconfirmed(handle: WorkerHandle) -> None:
    """No answer and no bye: its last heartbeat's count, marked unconfirmed."""
    heard(handle, open_=5)
    assert count_at_stop(handle) == (5, False)


def test_a_bye_splits_the_count_into_finished_and_cut(handle: WorkerHandle) -> None:
    """After a bye: cut is the bye's, finished the rest, nothing killed."""
    heard(handle, stop_open=7, bye=(5, 2))
    assert settle(7, handle) == (5, 2, 0)


def test_a_bye_never_cuts_more_than_was_counted(handle: WorkerHandle) -> None:
    """A count that was only a heartbeat's, lower than the bye's cut, caps the cut."""
    heard(handle, bye=(0, 4))
    assert settle(3, handle) == (0, 3, 0)


def test_a_worker_killed_after_answering_loses_what_its_last_report_had_open(
    handle: WorkerHandle,
) -> None:
    """Without a bye, what its last report had open counts as cut and killed."""
    heard(handle, stop_open=7, open_=3)
    assert settle(7, handle) == (4, 3, 3)


def test_a_killed_worker_never_loses_more_than_was_counted(handle: WorkerHandle) -> None:
    """A late report of more than the stopping event counted is capped at that count."""
    heard(handle, open_=9)
    assert settle(6, handle) == (0, 6, 6)


@pytest.mark.parametrize(
    ("stop_open", "open_", "cut", "said_bye"),
    [(0, 0, 0, True), (10, 0, 10, True), (10, 0, 0, True), (10, 10, 0, False), (3, 0, 0, False)],
)
def test_finished_and_cut_always_add_up_to_the_count(
    handle: WorkerHandle, stop_open: int, open_: int, cut: int, said_bye: bool
) -> None:
    """Whatever the worker said, finished + cut is what the stopping event counted."""
    bye = (stop_open - cut, cut) if said_bye else None
    heard(handle, stop_open=stop_open, open_=open_, bye=bye)
    counted, _confirmed = count_at_stop(handle)
    finished, cut_, killed = settle(counted, handle)
    assert finished + cut_ == counted and 0 <= killed <= cut_
