"""Process titles, so that ``ps`` shows each process's role.

setproctitle (the ``fast`` extra, or Debian's python3-setproctitle) rewrites the whole
command line; without it only the 15-byte kernel name (``comm``) is set, which ``ps -o comm``
and ``top`` still show.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from echod.prctl import PR_SET_NAME, prctl


def _set_comm(title: str) -> None:
    prctl(PR_SET_NAME, title.encode()[:15])


@functools.cache
def _setter() -> Callable[[str], None]:
    """Looked up once: process mode sets a title per connection, and a failed import
    searches the whole module path every time."""
    try:
        import setproctitle
    except ImportError:
        return _set_comm
    return setproctitle.setproctitle


def set_title(title: str) -> None:
    """Set this process's title; never fails (a title is a courtesy, not a feature)."""
    _setter()(title)
