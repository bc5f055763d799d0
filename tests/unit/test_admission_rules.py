"""Admission's edges: the token bucket's exact arithmetic, the shared table's layout and
life cycle, and the decisions at each limit.

These are the checks the mutation run (``make mutation``) found missing.
"""

from __future__ import annotations

import dataclasses
import mmap
import time
import zlib
from typing import Any

import pytest

from echod.admission import (
    REFUSED_LIMIT,
    REFUSED_PER_IP,
    REFUSED_RATE,
    Admission,
    SharedIpCounts,
    TokenBucket,
    worker_share,
)
from echod.config import Config, default_config
from echod.metrics import WorkerCounters
from tests.support import in_child

pytestmark = pytest.mark.timeout(30)


def config(**changes: Any) -> Config:
    return dataclasses.replace(default_config(), **changes)


# -- the token bucket --------------------------------------------------------------------------


def test_a_slow_bucket_starts_with_exactly_one_token() -> None:
    """Below one a second the bucket starts with one token, not more."""
    bucket = TokenBucket(0.5)
    bucket.start(10.0)
    assert (bucket.tokens, bucket.stamp) == (1.0, 10.0)
    assert bucket.take(10.0)
    assert bucket.tokens == 0.0
    assert not bucket.take(10.0)


def test_a_slow_bucket_refills_to_one_token_at_most() -> None:
    """After a long pause a bucket slower than one a second holds one token again, not two."""
    bucket = TokenBucket(0.5)
    bucket.start(0.0)
    assert bucket.take(0.0)
    assert bucket.available(100.0)
    assert bucket.tokens == 1.0
    assert bucket.take(100.0)
    assert not bucket.take(100.0)


def test_refill_is_rate_times_the_time_passed() -> None:
    """Tokens come back at exactly ``rate`` a second, from the last time the bucket looked."""
    bucket = TokenBucket(4)
    bucket.start(0.0)
    for _ in range(4):
        assert bucket.take(0.0)
    assert not bucket.available(0.125)
    assert bucket.tokens == pytest.approx(0.5)
    assert bucket.stamp == 0.125
    assert bucket.available(0.25)
    assert bucket.tokens == pytest.approx(1.0)


def test_an_unlimited_bucket_keeps_its_tokens() -> None:
    """Rate 0 hands out tokens without counting them down."""
    bucket = TokenBucket(0)
    bucket.start(0.0)
    before = bucket.tokens
    assert bucket.take(0.0)
    assert bucket.tokens == before == 1.0


@pytest.mark.parametrize(
    ("rate", "tokens", "wait"),
    [(2.0, 0.5, 0.25), (2.0, 1.0, 0.0), (2.0, 1.5, 0.0), (0.0, 0.0, 0.0), (4.0, 0.0, 0.25)],
)
def test_wait_time(rate: float, tokens: float, wait: float) -> None:
    """The wait is the time the missing part of one token takes; none with a token or rate 0."""
    bucket = TokenBucket(rate, tokens=tokens)
    assert bucket.wait_time() == pytest.approx(wait)


# -- the shared table ----------------------------------------------------------------------------


def test_the_table_is_one_word_then_a_row_per_slot() -> None:
    """The mapping holds the high-water word and slots x buckets counters of 4 bytes, shared,
    as unsigned integers."""
    table = SharedIpCounts(3, 5)
    table.open()
    try:
        assert table._map is not None and table._view is not None
        assert len(table._map) == 4 * (1 + 3 * 5)
        assert (table._view.format, table._view.itemsize, len(table._view)) == ("I", 4, 16)
        table.add(0, 0, 2**32 - 1)  # the largest count fits: counters are unsigned
        assert table._view[1] == 2**32 - 1
    finally:
        table.close()


def test_the_table_is_shared_with_forked_children() -> None:
    """The mapping is MAP_SHARED: a count a child writes is seen by the parent."""
    table = SharedIpCounts(2, 4)
    table.open()
    try:
        slot = table.allocate()
        assert slot == 0
        in_child(lambda: table.add(0, 3, 9))
        assert table.others(1, 3) == 9
    finally:
        table.close()


def test_close_lets_go_of_the_mapping_and_may_be_repeated() -> None:
    """close releases the view and the mapping; a second close does nothing."""
    table = SharedIpCounts(2, 4)
    table.open()
    mapping = table._map
    assert isinstance(mapping, mmap.mmap)
    table.close()
    assert (table._map, table._view) == (None, None)
    assert mapping.closed
    table.close()
    assert (table._map, table._view) == (None, None)


def test_a_new_table_has_no_mapping() -> None:
    """Construction maps nothing: open does, in the supervisor, before it forks."""
    table = SharedIpCounts()
    assert (table._map, table._view, table.slots, table.buckets) == (None, None, 256, 4096)
    with pytest.raises(AssertionError):
        table.allocate()
    with pytest.raises(AssertionError):
        table.release(0)


def test_the_high_water_mark_follows_the_slots_in_use() -> None:
    """Word 0 is one past the highest slot in use: it rises on allocate, falls on release."""
    table = SharedIpCounts(4, 8)
    table.open()
    try:
        assert table._view is not None
        view = table._view
        assert view[0] == 0
        assert [table.allocate() for _ in range(3)] == [0, 1, 2]
        assert view[0] == 3
        table.release(0)
        assert view[0] == 3
        table.release(2)
        assert view[0] == 2
        table.release(1)
        assert view[0] == 0
        assert table.allocate() == 0
        assert view[0] == 1
    finally:
        table.close()


def test_the_high_water_mark_ignores_the_counts() -> None:
    """The mark counts slots, whatever the first counters hold: a busy first bucket does not
    raise it."""
    table = SharedIpCounts(4, 8)
    table.open()
    try:
        assert table._view is not None
        assert table.allocate() == 0
        table.add(0, 0, 5)
        assert table.allocate() == 1
        assert table._view[0] == 2
    finally:
        table.close()


def test_release_zeroes_its_row_only() -> None:
    """Releasing a slot zeroes each of its buckets and leaves the neighbouring rows alone."""
    table = SharedIpCounts(3, 4)
    table.open()
    try:
        for slot in (table.allocate(), table.allocate(), table.allocate()):
            assert slot is not None
            for bucket in range(4):
                table.add(slot, bucket, 10 * (slot + 1) + bucket)
        table.release(1)
        assert table._view is not None
        assert list(table._view) == [3, 10, 11, 12, 13, 0, 0, 0, 0, 30, 31, 32, 33]
        assert [table.others(1, b) for b in range(4)] == [40, 42, 44, 46]
    finally:
        table.close()


def test_others_sums_the_column_but_the_own_slot() -> None:
    """others adds one bucket over every slot in use except the caller's."""
    table = SharedIpCounts(3, 4)
    table.open()
    try:
        for _ in range(3):
            table.allocate()
        table.add(0, 2, 1)
        table.add(1, 2, 2)
        table.add(2, 2, 4)
        table.add(1, 3, 100)
        assert [table.others(s, 2) for s in range(3)] == [6, 5, 3]
        assert table.others(0, 3) == 100
    finally:
        table.close()


def test_bucket_is_the_crc32_of_the_address() -> None:
    """Every process puts an address in the same bucket: crc32 of its text, modulo buckets."""
    table = SharedIpCounts(2, 64)
    for ip in ("10.0.0.1", "::1", "192.0.2.77"):
        assert table.bucket(ip) == zlib.crc32(ip.encode()) % 64
    assert {table.bucket(f"10.0.0.{i}") for i in range(200)} <= set(range(64))


# -- Admission ---------------------------------------------------------------------------------


def test_admission_reads_its_part_of_the_config() -> None:
    """The limit is the worker's share; per_ip, refuse and the rate come from the config; no
    connection is open yet."""
    adm = Admission(
        config(
            max_connections=10,
            workers=3,
            max_connections_per_ip=2,
            overload="refuse",
            connection_rate=5,
        ),
        3,
    )
    assert (adm.limit, adm.per_ip, adm.refuse, adm.bucket.rate) == (3, 2, True, 5)
    assert (adm.active, adm.served, adm.slot, adm.shared) == (0, 0, -1, None)
    assert not adm.by_ip and not adm.refused


def test_admission_uses_the_table_whenever_it_has_a_slot() -> None:
    """The shared table counts whenever a slot was given, a per-address limit or not: one
    set at run time (echod set) must find the connections already open counted."""
    table = SharedIpCounts(2, 4)
    assert Admission(config(max_connections_per_ip=1), 1, table, 0).shared is table
    assert Admission(config(max_connections_per_ip=1), 1, table, None).shared is None
    assert Admission(config(max_connections_per_ip=0), 1, table, 0).shared is table
    assert Admission(config(max_connections_per_ip=1), 1, table, 1).slot == 1


def test_limits_set_at_run_time_take_effect_for_the_next_client() -> None:
    """set_limits: the worker's share of the new total, the per-address limit (and with it
    whether clients behind PROXY are checked), a new rate with a full bucket."""
    adm = Admission(config(max_connections=10, workers=2), 1)
    adm.start()
    assert (adm.limit, adm.per_ip, adm.checks_clients) == (5, 0, False)
    adm.set_limits(3, 1, 2.5)
    assert (adm.limit, adm.per_ip, adm.checks_clients) == (2, 1, True)
    assert adm.bucket.rate == 2.5 and adm.bucket.tokens == 2.5
    assert adm.admit("10.0.0.1") is None
    assert adm.admit("10.0.0.1") == REFUSED_PER_IP


def test_start_fills_the_bucket_and_starts_the_summary_clock() -> None:
    """start gives a full bucket and counts the first summary from now."""
    adm = Admission(config(connection_rate=3), 1)
    before = time.monotonic()
    adm.start()
    assert adm.bucket.tokens == 3.0
    assert before <= adm.bucket.stamp == adm._last_summary <= time.monotonic()


def test_the_limit_refuses_before_the_rate_spends_a_token() -> None:
    """A full worker refuses for max_connections and keeps its rate token for later."""
    adm = Admission(config(max_connections=1, overload="refuse", connection_rate=1), 1)
    adm.start()
    assert adm.admit("10.0.0.1") is None
    adm.bucket.tokens = 1.0
    assert adm.admit("10.0.0.2") == REFUSED_LIMIT
    assert adm.bucket.tokens == pytest.approx(1.0, abs=0.01)
    assert adm.refused == {REFUSED_LIMIT: 1}
    assert (adm.active, adm.by_ip) == (1, {"10.0.0.1": 1})


def test_the_per_ip_limit_is_exact() -> None:
    """With max_connections_per_ip 2 an address gets two connections, not one, not three."""
    adm = Admission(config(max_connections_per_ip=2), 1)
    adm.start()
    assert [adm.admit("10.0.0.1") for _ in range(3)] == [None, None, REFUSED_PER_IP]
    assert adm.open_from("10.0.0.1") == 2
    assert adm.refused == {REFUSED_PER_IP: 1}


def test_rate_wait_under_refuse_or_without_a_rate_is_zero() -> None:
    """Only the wait policy with a rate ever pauses for it."""
    refuse = Admission(config(connection_rate=1, overload="refuse"), 1)
    refuse.start()
    refuse.bucket.tokens = 0.0
    assert refuse.rate_wait() == 0.0
    unlimited = Admission(config(connection_rate=0), 1)
    unlimited.start()
    unlimited.bucket.tokens = 0.0
    assert unlimited.rate_wait() == 0.0


def test_rate_wait_is_the_time_to_the_next_token() -> None:
    """Under wait, with the bucket empty, rate_wait is about the time one token takes."""
    adm = Admission(config(connection_rate=2), 1)
    adm.start()
    assert [adm.admit("10.0.0.1") for _ in range(2)] == [None, None]
    assert 0.4 < adm.rate_wait() <= 0.5


def test_closing_the_last_connection_of_an_address_forgets_it() -> None:
    """closed counts down per address and in total, and counts the connection served."""
    table = SharedIpCounts(2, 8)
    table.open()
    try:
        slot = table.allocate()
        adm = Admission(config(max_connections_per_ip=3), 1, table, slot)
        for _ in range(2):
            assert adm.admit("10.0.0.1") is None
        bucket = table.bucket("10.0.0.1")
        assert table.others(1, bucket) == 2
        adm.closed("10.0.0.1")
        assert (adm.active, adm.served, adm.by_ip["10.0.0.1"]) == (1, 1, 1)
        assert table.others(1, bucket) == 1
        adm.closed("10.0.0.1")
        assert (adm.active, adm.served, dict(adm.by_ip)) == (0, 2, {})
        assert table.others(1, bucket) == 0
    finally:
        table.close()


def test_summary_due_counts_from_the_last_summary() -> None:
    """A summary is due SUMMARY_INTERVAL after the last one was logged, exactly."""
    adm = Admission(config(max_connections=1, overload="refuse"), 1)
    adm.start()
    adm.summary_logged(100.0)
    assert adm.admit("10.0.0.1") is None
    assert adm.admit("10.0.0.2") == REFUSED_LIMIT
    assert adm.summary_due(100.25) == pytest.approx(0.75)
    assert adm.summary_due(101.5) == pytest.approx(-0.5)
    assert adm.take_summary() == {REFUSED_LIMIT: 1}
    assert adm._last_summary == 100.0  # taking the counts does not restart the interval
    adm.summary_logged(101.5)
    assert adm._last_summary == 101.5


def test_a_summary_logged_late_delays_the_next() -> None:
    """A summary due at 101.0 but logged only at 101.3 makes the next due at 102.3, not
    102.0: two lines as written are a full SUMMARY_INTERVAL apart."""
    adm = Admission(config(max_connections=1, overload="refuse"), 1)
    adm.start()
    adm.summary_logged(100.0)
    assert adm.admit("10.0.0.1") is None
    assert adm.admit("10.0.0.2") == REFUSED_LIMIT
    assert adm.summary_due(101.0) == pytest.approx(0.0)
    assert adm.take_summary() == {REFUSED_LIMIT: 1}
    adm.summary_logged(101.3)
    assert adm.admit("10.0.0.3") == REFUSED_LIMIT
    assert adm.summary_due(102.0) == pytest.approx(0.3)
    assert adm.summary_due(102.3) == pytest.approx(0.0)


def test_worker_share_never_gives_less_than_one() -> None:
    """More workers than connections still gives every worker one."""
    assert [worker_share(3, 5, i) for i in range(1, 6)] == [1, 1, 1, 1, 1]
    assert worker_share(7, 2, 1) == 4
    assert worker_share(7, 2, 2) == 3


def test_rate_refusal_is_counted() -> None:
    """A connection refused for the rate is counted under connection_rate and not admitted."""
    adm = Admission(config(connection_rate=1, overload="refuse"), 1)
    adm.start()
    assert adm.admit("10.0.0.1") is None
    assert adm.admit("10.0.0.1") == REFUSED_RATE
    assert (adm.active, adm.refused) == (1, {REFUSED_RATE: 1})


def test_clients_are_checked_while_a_rule_needs_it() -> None:
    """checks_clients: an access list or a per-address limit makes the real client behind a
    PROXY header worth asking about; a limit set at run time turns it on and off again."""
    assert not Admission(config(), 1).checks_clients
    assert Admission(config(max_connections_per_ip=2), 1).checks_clients
    assert Admission(config(allow=("10.0.0.0/8",)), 1).checks_clients
    adm = Admission(config(max_connections=10), 1)
    adm.set_limits(10, 1, 0)
    assert adm.checks_clients
    adm.set_limits(10, 0, 0)
    assert not adm.checks_clients


def test_refusals_after_accept_add_up_in_the_summary_and_the_metrics() -> None:
    """Each connection refused after accept (behind PROXY) counts once more, in the summary
    and in the counters the worker was given."""
    counters = WorkerCounters()
    cfg = config(proxy_protocol="v2", proxy_trusted=("127.0.0.1",))
    adm = Admission(cfg, 1, counters=counters)
    adm.start()
    for _ in range(2):
        assert adm.admit("127.0.0.1") is None
        adm.closed("127.0.0.1", refused=REFUSED_PER_IP)
    assert adm.refused == {REFUSED_PER_IP: 2}
    assert adm.counters is counters
    assert counters.snapshot()["refused:" + REFUSED_PER_IP] == 2
