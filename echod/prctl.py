"""The kernel's per-process settings echod makes: a few prctl(2) options, through libc (the
standard library has no wrapper), and the OOM killer's score (/proc/self/oom_score_adj)."""

from __future__ import annotations

import ctypes
import functools
import os

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36

# How much more the OOM killer should want a process than the supervisor, so that it takes
# what is cheapest to lose first: a connection process (one client), then a worker (its
# clients; the supervisor starts another), the supervisor last (every client, and the
# service). Relative to the supervisor's, so that the order holds whatever the unit sets for
# it (OOMScoreAdjust=). Each step of 300 weighs as 30% of the memory the kernel chooses
# within (the cgroup's limit, else RAM): more than the resident sizes of these forked copies
# of one interpreter differ by. Raising the score needs no privilege; lowering it does.
OOM_WORKER = 300
OOM_CONNECTION = 600
OOM_SCORE_MAX = 1000
_OOM_SCORE_ADJ = "/proc/self/oom_score_adj"


@functools.cache
def _libc() -> ctypes.CDLL | None:
    # Loaded once, in the supervisor; forked workers and connection processes inherit it.
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def prctl(option: int, arg: int | bytes) -> bool:
    """Call prctl(option, arg); False where it is unavailable or fails (never raises)."""
    libc = _libc()
    if libc is None:
        return False
    value = ctypes.c_char_p(arg) if isinstance(arg, bytes) else ctypes.c_ulong(arg)
    try:
        return int(libc.prctl(option, value, 0, 0, 0)) == 0
    except AttributeError:
        return False


def oom_score_adj() -> int | None:
    """This process's OOM score adjustment (-1000..1000); None where it cannot be read."""
    try:
        with open(_OOM_SCORE_ADJ, "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def set_oom_score_adj(value: int) -> bool:
    """Set this process's OOM score adjustment, capped at the kernel's 1000; False where it
    cannot be written (a read-only /proc, a lower value without the privilege). Never raises:
    the score is a preference, not something to fail over."""
    try:
        fd = os.open(_OOM_SCORE_ADJ, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.write(fd, b"%d" % min(value, OOM_SCORE_MAX))
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def oom_score_over(base: int | None, offset: int) -> int | None:
    """The score ``offset`` above ``base`` (capped), or None when ``base`` is unknown."""
    return None if base is None else min(base + offset, OOM_SCORE_MAX)
