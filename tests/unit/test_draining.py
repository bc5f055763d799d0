"""A worker's stop as a state machine: the states, the deadlines and what each asks for,
without a worker (echod.draining)."""

from __future__ import annotations

import json

import pytest

from echod.conntable import listing_parts
from echod.draining import CUT_GRACE, Drain, Due, WorkerDrain

pytestmark = pytest.mark.timeout(10)


def never() -> int:
    raise AssertionError("asked what is open when nothing was due")


def test_a_stop_cuts_at_its_deadline_and_kills_after_the_grace() -> None:
    drain = WorkerDrain()
    assert not drain.stopping
    assert drain.begin(2.0, open_now=5, now=10.0) is Drain.SERVING
    assert drain.state is Drain.STOPPING and drain.stopping
    assert drain.open_at_stop == 5 and drain.deadlines() == [12.0]
    assert drain.due(11.9, never) == Due()
    assert drain.due(12.0, lambda: 3) == Due(cut=True)
    assert drain.state is Drain.CUT and drain.cut == 3 and drain.finished == 2
    assert drain.deadlines() == [12.0 + CUT_GRACE]
    assert drain.due(12.0 + CUT_GRACE, never) == Due(kill=True)
    assert drain.deadlines() == []
    assert drain.due(100.0, never) == Due()


def test_nothing_open_at_the_deadline_cuts_nothing_and_kills_nothing() -> None:
    drain = WorkerDrain()
    drain.begin(0.0, open_now=1, now=5.0)
    assert drain.due(5.0, lambda: 0) == Due()
    assert drain.state is Drain.CUT and drain.cut == 0 and drain.finished == 1
    assert drain.deadlines() == []


def test_a_second_stop_brings_the_cut_forward_never_back() -> None:
    drain = WorkerDrain()
    drain.begin(10.0, open_now=1, now=0.0)
    assert drain.begin(20.0, open_now=1, now=1.0) is None
    assert drain.deadlines() == [10.0]
    assert drain.begin(0.0, open_now=1, now=2.0) is None
    assert drain.deadlines() == [2.0]


def test_a_retirement_has_no_deadline_until_one_is_set() -> None:
    drain = WorkerDrain()
    assert drain.begin(None, open_now=4, now=0.0) is Drain.SERVING
    assert drain.state is Drain.RETIRING and drain.deadlines() == []
    assert drain.due(1e9, never) == Due()
    drain.retire_by(30.0)
    assert drain.due(29.0, never) == Due()
    assert drain.due(30.0, never) == Due(retire=True)
    assert drain.state is Drain.RETIRING and drain.deadlines() == []


def test_retire_by_is_ignored_unless_retiring() -> None:
    serving = WorkerDrain()
    serving.retire_by(1.0)
    assert serving.deadlines() == []
    stopping = WorkerDrain()
    stopping.begin(5.0, open_now=0, now=0.0)
    stopping.retire_by(1.0)
    assert stopping.deadlines() == [5.0]


def test_a_stop_during_a_retirement_counts_from_the_stop() -> None:
    """What finished while it retired is not in the stop's counts; its retirement's cut is
    replaced by the stop's."""
    drain = WorkerDrain()
    drain.begin(None, open_now=6, now=0.0)
    drain.retire_by(100.0)
    assert drain.begin(3.0, open_now=2, now=10.0) is Drain.RETIRING
    assert drain.state is Drain.STOPPING and drain.open_at_stop == 2
    assert drain.due(13.0, lambda: 1) == Due(cut=True)
    # The retirement's deadline asks nothing now; the kill is due.
    assert drain.due(100.0, never) == Due(kill=True)
    assert drain.finished == 1


def test_once_cut_nothing_changes() -> None:
    drain = WorkerDrain()
    drain.begin(0.0, open_now=2, now=0.0)
    drain.due(0.0, lambda: 2)
    assert drain.begin(0.0, open_now=9, now=1.0) is None
    assert drain.state is Drain.CUT and drain.open_at_stop == 2 and drain.cut == 2


def test_listing_parts_fit_the_limit_and_keep_every_row() -> None:
    rows = [{"conn_id": f"1-{n}", "peer": "127.0.0.1:" + str(40000 + n)} for n in range(50)]
    parts = listing_parts(rows, 200)
    assert len(parts) > 1 and all(len(part) <= 200 for part in parts)
    assert [row for part in parts for row in json.loads(part)] == rows
    assert listing_parts([], 200) == [b"[]"]
    huge = [{"x": "y" * 500}]
    assert [json.loads(part) for part in listing_parts(huge, 200)] == [huge]
