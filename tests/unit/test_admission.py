"""Admission: each worker's share of max_connections, the token bucket, and refusals."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from echod.admission import (
    REFUSED_LIMIT,
    REFUSED_PER_IP,
    REFUSED_RATE,
    SUMMARY_INTERVAL,
    Admission,
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
    summary = adm.take_summary(start + SUMMARY_INTERVAL)
    assert summary == {REFUSED_PER_IP: 1, REFUSED_LIMIT: 5}
    assert adm.refused_total == 6
    assert adm.summary_due(start + SUMMARY_INTERVAL) is None
    assert adm.take_summary(start + 2 * SUMMARY_INTERVAL) == {}


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
    assert adm.rate_wait() > 0.0


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
