"""The pure rules behind resource faults: the held connection's backoff, the descriptor
limit's hysteresis, which start errors are shortages, the folding of limit lines, and the
OOM score offsets."""

from __future__ import annotations

import errno
import itertools

import pytest

from echod import prctl
from echod.accepting import (
    FD_HYSTERESIS_MAX,
    START_RETRY,
    START_RETRY_MAX,
    StartFailed,
    fd_resume_level,
    start_failure,
    start_retry_delay,
)
from echod.admission import LimitLog
from echod.events import LIMIT_REACHED as REACHED
from echod.events import LIMIT_RELEASED as RELEASED

pytestmark = pytest.mark.timeout(30)


# -- the held connection's backoff --------------------------------------------------------------


def test_retry_delay_doubles_from_the_first_and_stops_at_the_cap() -> None:
    """After n failed starts the next comes START_RETRY * 2**(n-1) later, never later than
    START_RETRY_MAX."""
    delays = [start_retry_delay(n) for n in range(1, 10)]
    assert delays[0] == START_RETRY
    assert delays[1] == 2 * START_RETRY
    assert all(b == min(START_RETRY_MAX, 2 * a) for a, b in itertools.pairwise(delays))
    assert delays[-1] == START_RETRY_MAX


def test_retry_delay_is_bounded_for_absurd_counts() -> None:
    """A count of 0 reads as 1, and a huge count neither overflows nor passes the cap."""
    assert start_retry_delay(0) == START_RETRY
    assert start_retry_delay(10**9) == START_RETRY_MAX


# -- the descriptor limit's hysteresis ----------------------------------------------------------


def test_fd_resume_waits_for_an_eighth_fewer_within_bounds() -> None:
    """Accepting resumes once an eighth of the open connections (1 to FD_HYSTERESIS_MAX)
    have closed."""
    assert fd_resume_level(52) == 52 - 6
    assert fd_resume_level(1000) == 1000 - FD_HYSTERESIS_MAX
    assert fd_resume_level(5) == 4
    assert fd_resume_level(0) == 0


# -- which start errors are shortages ------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "text"),
    [
        (OSError(errno.EAGAIN, "Resource temporarily unavailable"), "task limit reached"),
        (OSError(errno.ENOMEM, "Cannot allocate memory"), "out of memory"),
        (OSError(errno.EMFILE, "Too many open files"), "out of file descriptors"),
        (MemoryError(), "out of memory"),
        (RuntimeError("can't start new thread"), "task limit reached or out of memory"),
    ],
)
def test_shortages_become_start_failures_that_say_what(exc: BaseException, text: str) -> None:
    """A failed start for want of tasks, memory or descriptors is a StartFailed naming what
    could not be started and what ran short."""
    failure = start_failure("a process", exc)
    assert isinstance(failure, StartFailed)
    assert str(failure) == f"cannot start a process: {text}"


@pytest.mark.parametrize(
    "exc",
    [OSError(errno.EBADF, "Bad file descriptor"), RuntimeError("other"), ValueError("x")],
)
def test_other_errors_are_not_shortages(exc: BaseException) -> None:
    """Anything else is not held for later: start_failure() says None."""
    assert start_failure("a thread", exc) is None


# -- folding the limit lines ---------------------------------------------------------------------


def test_first_episode_is_logged_at_once_both_ways() -> None:
    """A first reached and a first released are written when they happen, each counting one
    episode."""
    log = LimitLog()
    assert log.reached("file_descriptors", 10.0, open=5) == {
        "limit": "file_descriptors",
        "open": 5,
        "episodes": 1,
    }
    assert log.released("file_descriptors", 10.001, open=4)["episodes"] == 1
    assert log.due(10.002) is None


def test_flapping_within_a_second_is_folded_into_the_next_line() -> None:
    """Forty episodes within a second give one reached and one released line; the next
    reached line, written a second after the first, counts the folded ones too."""
    log = LimitLog()
    limit = "file_descriptors"
    lines = [log.reached(limit, 0.0, open=5), log.released(limit, 0.001, open=4)]
    for i in range(40):
        now = 0.002 + i * 0.01
        lines += [log.reached(limit, now, open=5), log.released(limit, now + 0.005, open=4)]
    written = [line for line in lines if line is not None]
    assert len(written) == 2
    assert log.due(0.5) is None  # released, as the last line said: nothing pending
    line = log.reached(limit, 2.0, open=5)
    assert line is not None and line["episodes"] == 41


def test_a_folded_change_is_written_once_its_second_has_passed() -> None:
    """When the state differs from the last line, a line saying the state as it is now is
    due a second after the last line of its kind, with the fields of its latest change."""
    log = LimitLog()
    limit = "max_connections"
    log.reached(limit, 0.0, open=2)
    log.released(limit, 0.3, open=1)
    assert log.reached(limit, 0.4, open=2) is None
    assert log.due(0.4) == pytest.approx(0.6)
    assert log.take_due(0.9) == []
    assert log.take_due(1.0) == [(REACHED, {"limit": limit, "open": 2, "episodes": 1})]
    assert log.due(1.0) is None


def test_lines_alternate_and_each_kind_keeps_its_own_second() -> None:
    """Reached and released alternate per limit; a release is limited by the last release,
    not by the last reached line."""
    log = LimitLog()
    limit = "resources"
    assert log.reached(limit, 0.0) is not None
    assert log.reached(limit, 5.0) is None  # still reached: nothing new to say
    assert log.released(limit, 5.1) is not None
    assert log.reached(limit, 5.2) is not None  # the last reached line was 5 s ago
    assert log.released(limit, 5.3) is None  # the last release was 0.2 s ago
    assert log.take_due(6.1) == [(RELEASED, {"limit": limit, "episodes": 1})]


def test_limits_are_folded_apart() -> None:
    """Each limit has its own lines and seconds."""
    log = LimitLog()
    assert log.reached("max_connections", 0.0) is not None
    assert log.reached("file_descriptors", 0.1) is not None


def test_forget_drops_what_was_due() -> None:
    """Once accepting has ended for good, no folded change is written any more."""
    log = LimitLog()
    log.reached("max_connections", 0.0)
    log.released("max_connections", 0.1)
    log.reached("max_connections", 0.2)
    log.forget()
    assert log.due(5.0) is None
    assert log.take_due(5.0) == []


# -- the OOM score offsets -----------------------------------------------------------------------


def test_oom_offsets_order_connection_worker_supervisor() -> None:
    """Over any supervisor score a connection process scores above its worker, which scores
    above the supervisor, until the kernel's cap of 1000."""
    assert 0 < prctl.OOM_WORKER < prctl.OOM_CONNECTION
    for base in (-1000, -300, 0, 300):
        worker = prctl.oom_score_over(base, prctl.OOM_WORKER)
        connection = prctl.oom_score_over(base, prctl.OOM_CONNECTION)
        assert worker is not None and connection is not None
        assert base < worker < connection <= prctl.OOM_SCORE_MAX
    assert prctl.oom_score_over(900, prctl.OOM_CONNECTION) == prctl.OOM_SCORE_MAX
    assert prctl.oom_score_over(None, prctl.OOM_WORKER) is None
