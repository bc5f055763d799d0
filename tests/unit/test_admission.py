"""Admission: each worker's share of max_connections, the token bucket, and refusals."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import signal
from collections.abc import Callable
from typing import Any

import pytest

from echod.admission import (
    REFUSED_LIMIT,
    REFUSED_PER_IP,
    REFUSED_RATE,
    SUMMARY_INTERVAL,
    Admission,
    SharedIpCounts,
    TokenBucket,
    worker_share,
)
from echod.config import Config, default_config

pytestmark = pytest.mark.timeout(30)


def config(**changes: Any) -> Config:
    return dataclasses.replace(default_config(), **changes)


@pytest.mark.parametrize(
    ("total", "workers", "shares"),
    [
        (1024, 1, [1024]),
        (10, 3, [4, 3, 3]),
        (11, 3, [4, 4, 3]),
        (12, 3, [4, 4, 4]),
        (2, 4, [1, 1, 1, 1]),
        (1, 256, [1] * 256),
    ],
)
def test_worker_share(total: int, workers: int, shares: list[int]) -> None:
    """The split is even, the remainder goes to the first workers, and no share is 0."""
    assert [worker_share(total, workers, i) for i in range(1, workers + 1)] == shares


@pytest.mark.parametrize("workers", [1, 2, 3, 7, 16, 256])
@pytest.mark.parametrize("total", [256, 1000, 1023, 1_000_000])
def test_worker_shares_add_up_to_the_total(total: int, workers: int) -> None:
    """When there are at least as many connections as workers, the shares sum to the total."""
    assert sum(worker_share(total, workers, i) for i in range(1, workers + 1)) == total


def test_token_bucket_rate_zero_is_unlimited() -> None:
    """Rate 0 always gives a token and never asks to wait."""
    bucket = TokenBucket(0)
    bucket.start(100.0)
    assert all(bucket.take(100.0) for _ in range(10_000))
    assert bucket.wait_time() == 0.0


def test_token_bucket_bursts_one_second_then_refills_at_rate() -> None:
    """A bucket of rate r gives r tokens at once, then one every 1/r seconds."""
    bucket = TokenBucket(5)
    bucket.start(100.0)
    assert [bucket.take(100.0) for _ in range(6)] == [True] * 5 + [False]
    assert bucket.wait_time() == pytest.approx(0.2)
    assert not bucket.take(100.1)
    assert bucket.take(100.2)
    assert not bucket.take(100.2)


def test_token_bucket_never_stores_more_than_a_second() -> None:
    """After a long quiet spell the burst is still capped at one second's worth."""
    bucket = TokenBucket(3)
    bucket.start(0.0)
    assert sum(bucket.take(1000.0) for _ in range(10)) == 3


def test_token_bucket_below_one_per_second_still_allows_one() -> None:
    """A fractional rate holds at least one token, so the first connection is never refused."""
    bucket = TokenBucket(0.5)
    bucket.start(0.0)
    assert bucket.take(0.0)
    assert not bucket.take(1.0)
    assert bucket.wait_time() == pytest.approx(1.0)
    assert bucket.take(2.0)


def test_wait_policy_pauses_at_the_limit_instead_of_refusing() -> None:
    """Under overload wait, should_pause turns true at the worker's share."""
    adm = Admission(config(max_connections=2, overload="wait"), 1)
    adm.start()
    assert adm.admit("10.0.0.1") is None
    assert not adm.should_pause()
    assert adm.admit("10.0.0.2") is None
    assert adm.should_pause()
    adm.closed("10.0.0.1")
    assert not adm.should_pause()
    assert (adm.active, adm.served) == (1, 1)


def test_refuse_policy_counts_refusals_by_reason_and_summarises_once() -> None:
    """Under overload refuse, refused clients are counted by reason and summarised once,
    after which the counts start again."""
    adm = Admission(config(max_connections=2, overload="refuse", max_connections_per_ip=1), 1)
    adm.start()
    assert not adm.should_pause()
    assert adm.summary_due(0.0) is None
    assert adm.admit("10.0.0.1") is None
    assert adm.admit("10.0.0.1") == REFUSED_PER_IP
    assert adm.admit("10.0.0.2") is None
    for _ in range(5):
        assert adm.admit("10.0.0.3") == REFUSED_LIMIT
    assert not adm.should_pause()  # refuse never pauses: the backlog is not used as a queue
    start = adm._last_summary
    assert adm.summary_due(start) == pytest.approx(SUMMARY_INTERVAL)
    assert adm.summary_due(start + SUMMARY_INTERVAL) == pytest.approx(0.0)
    summary = adm.take_summary()
    assert summary == {REFUSED_PER_IP: 1, REFUSED_LIMIT: 5}
    assert adm.summary_due(start + SUMMARY_INTERVAL) is None
    assert adm.take_summary() == {}


def test_refuse_policy_refuses_past_the_connection_rate() -> None:
    """With connection_rate 2 under refuse, the third connection in the same instant is
    refused for the rate."""
    adm = Admission(config(connection_rate=2, overload="refuse"), 1)
    adm.start()
    results = [adm.admit(f"10.0.0.{i}") for i in range(3)]
    assert results == [None, None, REFUSED_RATE]


def test_rate_wait_peeks_without_taking_a_token() -> None:
    """Under wait, rate_wait says 0 while a token is there and does not spend it."""
    adm = Admission(config(connection_rate=1, overload="wait"), 1)
    adm.start()
    assert adm.rate_wait() == 0.0
    assert adm.rate_wait() == 0.0
    assert adm.admit("10.0.0.1") is None
    assert 0.9 < adm.rate_wait() <= 1.0


def test_per_ip_counts_are_forgotten_when_a_client_has_nothing_open() -> None:
    """by_ip holds only addresses with open connections, so it cannot grow without bound."""
    adm = Admission(config(max_connections_per_ip=2), 1)
    adm.start()
    for _ in range(2):
        assert adm.admit("10.0.0.1") is None
    assert adm.admit("10.0.0.1") == REFUSED_PER_IP
    adm.closed("10.0.0.1")
    assert adm.admit("10.0.0.1") is None
    adm.closed("10.0.0.1")
    adm.closed("10.0.0.1")
    assert "10.0.0.1" not in adm.by_ip


def test_limit_is_the_workers_share() -> None:
    """Each worker's Admission takes its own share of max_connections."""
    cfg = config(max_connections=5, workers=2)
    assert [Admission(cfg, i).limit for i in (1, 2)] == [3, 2]


def shared_table(slots: int = 4, buckets: int = 64) -> SharedIpCounts:
    table = SharedIpCounts(slots, buckets)
    table.open()
    return table


def in_child(work: Callable[[], bool]) -> tuple[int, int, int]:
    """Fork a process that runs ``work``, says so on a pipe, waits to be told to go on, and
    exits 0 if ``work`` returned true; returns (pid, its done pipe, our go pipe)."""
    done_r, done_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(done_r)
            os.close(go_w)
            ok = work()
            os.write(done_w, b"1")
            os.read(go_r, 1)  # the test has looked at the table (or died: EOF)
            code = 0 if ok else 1
        finally:
            os._exit(code)
    os.close(done_w)
    os.close(go_r)
    return pid, done_r, go_w


def wait_done(done_r: int) -> None:
    readable, _, _ = select.select([done_r], [], [], 10.0)
    assert readable, "the child did not finish its part in time"
    assert os.read(done_r, 1) == b"1"


def exit_code(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_shared_counts_span_forked_workers() -> None:
    """Two forked workers counting into the shared table see each other's connections:
    with max_connections_per_ip 5, the second gets 2 once the first holds 3; a freed slot
    takes its counts with it."""
    table = shared_table()
    cfg = config(workers=2, max_connections_per_ip=5)
    ip = "10.0.0.1"
    slot_a, slot_b, probe = table.allocate(), table.allocate(), table.allocate()
    assert (slot_a, slot_b, probe) == (0, 1, 2)
    bucket = table.bucket(ip)

    def worker(slot: int, tries: int, expect: list[str | None]) -> Callable[[], bool]:
        def work() -> bool:
            adm = Admission(cfg, slot + 1, table, slot)
            adm.start()
            return [adm.admit(ip) for _ in range(tries)] == expect

        return work

    pids: list[int] = []
    fds: list[int] = []
    try:
        pid_a, done_a, go_a = in_child(worker(slot_a, 3, [None] * 3))
        pids.append(pid_a)
        fds += [done_a, go_a]
        wait_done(done_a)
        pid_b, done_b, go_b = in_child(worker(slot_b, 4, [None, None] + [REFUSED_PER_IP] * 2))
        pids.append(pid_b)
        fds += [done_b, go_b]
        wait_done(done_b)
        assert table.others(probe, bucket) == 5
        for go in (go_a, go_b):
            os.write(go, b"g")
        codes = []
        for pid in (pid_a, pid_b):
            codes.append(exit_code(pid))
            pids.remove(pid)  # reaped: its pid may be reused, never signal it again
        assert codes == [0, 0]
        # Both exited with their connections counted: the supervisor's release zeroes them.
        table.release(slot_a)
        assert table.others(probe, bucket) == 2
        table.release(slot_b)
        assert table.others(probe, bucket) == 0
    finally:
        for fd in fds:
            os.close(fd)
        # A failed test must not leave its children behind (or unreaped).
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        table.close()


def test_closed_connections_leave_the_shared_table() -> None:
    """admit adds to the worker's own slot and closed takes it away again."""
    table = shared_table()
    cfg = config(workers=2, max_connections_per_ip=2)
    one = Admission(cfg, 1, table, table.allocate())
    two = Admission(cfg, 2, table, table.allocate())
    assert one.admit("10.0.0.1") is None
    assert two.admit("10.0.0.1") is None
    assert one.admit("10.0.0.1") == REFUSED_PER_IP
    assert two.admit("10.0.0.2") is None  # another address has its own count
    two.closed("10.0.0.1")
    assert one.admit("10.0.0.1") is None
    assert (one.open_from("10.0.0.1"), two.open_from("10.0.0.1")) == (2, 2)
    table.close()


def test_slots_run_out_and_come_back() -> None:
    """allocate gives the lowest free slot, None when all are taken; release frees one and
    zeroes it."""
    table = shared_table(slots=2)
    assert [table.allocate(), table.allocate(), table.allocate()] == [0, 1, None]
    table.add(0, 7, 3)
    table.release(0)
    assert table.allocate() == 0
    assert table.others(1, 7) == 0
    table.close()


def test_a_worker_without_a_slot_counts_alone() -> None:
    """Without a slot (none was free) the limit is counted in this worker only."""
    table = shared_table(slots=1)
    cfg = config(workers=2, max_connections_per_ip=1)
    one = Admission(cfg, 1, table, table.allocate())
    two = Admission(cfg, 2, table, table.allocate())
    assert one.admit("10.0.0.1") is None
    assert two.admit("10.0.0.1") is None
    assert two.admit("10.0.0.1") == REFUSED_PER_IP
    table.close()
