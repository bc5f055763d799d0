"""The kernel's per-process settings echod makes: a few prctl(2) options and capset(2),
through libc (the standard library has no wrapper), and the OOM killer's score
(/proc/self/oom_score_adj)."""

from __future__ import annotations

import ctypes
import functools
import os

PR_SET_PDEATHSIG = 1
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
_CAP_LAST_CAP = "/proc/sys/kernel/cap_last_cap"
#: capget(2)/capset(2)'s _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set.
_CAPABILITY_VERSION_3 = 0x20080522

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


def dumpable() -> bool | None:
    """PR_GET_DUMPABLE: whether /proc/self belongs to this process's user (None: unknown).
    The kernel clears it when a process switches from root to another user."""
    libc = _libc()
    if libc is None:
        return None
    try:
        value = int(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
    except AttributeError:
        return None
    return None if value < 0 else value == 1


def drop_bounding_set() -> None:
    """Empty the capability bounding set, as far as this process may (CAP_SETPCAP): no
    program it could execute would gain a capability back. Never raises."""
    try:
        with open(_CAP_LAST_CAP, encoding="ascii") as f:
            last = int(f.read())
    except (OSError, ValueError):
        last = 63
    for capability in range(last + 1):
        prctl(PR_CAPBSET_DROP, capability)


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


def clear_inheritable() -> bool:
    """Empty this process's inheritable capabilities (the one set that a switch of user
    leaves as it is), keeping the others; False where it cannot. Reducing a set needs no
    privilege."""
    libc = _libc()
    if libc is None:
        return False
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    try:
        if libc.capget(ctypes.byref(header), data) != 0:
            return False
        for word in data:
            word.inheritable = 0
        return int(libc.capset(ctypes.byref(header), data)) == 0
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
    the score is a preference, not something to fail over.

    A process that switched from root to another user (a connection process forked from a
    worker that dropped its privileges) is not dumpable, and its /proc/self belongs to root
    then: it is made dumpable for the write alone, which gives /proc/self back to its user,
    and not dumpable again at once (so that no other process of that user may trace it)."""
    try:
        fd = os.open(_OOM_SCORE_ADJ, os.O_WRONLY | os.O_CLOEXEC)
    except PermissionError:
        if dumpable() is not False or not prctl(PR_SET_DUMPABLE, 1):
            return False
        try:
            fd = os.open(_OOM_SCORE_ADJ, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return False
        finally:
            prctl(PR_SET_DUMPABLE, 0)
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


def raise_for_worker() -> tuple[int | None, int | None]:
    """Have the OOM killer take this (worker) process before the supervisor, and its
    connection processes before it. Returns the score it had and the one for its connection
    processes (None: unchanged, not allowed or unknown; no error: the scores are a
    preference, and a read-only /proc, a container's, is common)."""
    inherited = oom_score_adj()
    mine = oom_score_over(inherited, OOM_WORKER)
    if mine is None or not set_oom_score_adj(mine):
        return inherited, None
    return inherited, oom_score_over(inherited, OOM_CONNECTION)
