"""Process titles, so that ``ps`` shows each process's role.

setproctitle (the ``fast`` extra, or Debian's python3-setproctitle) rewrites the whole
command line; without it only the 15-byte kernel name (``comm``) is set, which ``ps -o comm``
and ``top`` still show.
"""

from __future__ import annotations

from echod.prctl import PR_SET_NAME, prctl


def set_title(title: str) -> None:
    """Set this process's title; never fails (a title is a courtesy, not a feature)."""
    try:
        import setproctitle
    except ImportError:
        prctl(PR_SET_NAME, title.encode()[:15])
    else:
        setproctitle.setproctitle(title)

