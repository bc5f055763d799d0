"""prctl(2), the few options echod uses, through libc (the standard library has no wrapper)."""

from __future__ import annotations

import ctypes
import functools

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36


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
