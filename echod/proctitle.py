"""Process titles, so that ``ps`` shows each process's role.

setproctitle (the ``fast`` extra, or Debian's python3-setproctitle) rewrites the whole
command line; without it only the 15-byte kernel name (``comm``) is set, which ``ps -o comm``
and ``top`` still show.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_PR_SET_NAME = 15


def set_title(title: str) -> None:
    """Set this process's title; never fails (a title is a courtesy, not a feature)."""
    try:
        import setproctitle
    except ImportError:
        _set_comm(title)
    else:
        setproctitle.setproctitle(title)


def _set_comm(title: str) -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(title.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass
