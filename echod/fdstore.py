"""Listening sockets kept in systemd's file descriptor store, so that a restart refuses no
client.

Under a unit with a store (``FileDescriptorStoreMax=``, announced in ``$FDSTORE``) every
listening socket echod binds is also handed to systemd (``FDSTORE=1``, named
``echod-listener-INODE``). When the service stops to be started again (``systemctl
restart``, ``Restart=``), systemd keeps them open: clients that connect meanwhile wait in the
kernel's queue instead of being refused, and the next echod gets the sockets back in
``$LISTEN_FDS``, adopts those its configuration still asks for and accepts what waited. The
others it closes and takes out of the store. After a plain stop systemd closes them all.

Sockets of socket activation (``echod.socket``) belong to their socket unit: never stored.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from echod import systemd
from echod.listeners import Listeners

#: What the names of echod's stored sockets begin with (``$LISTEN_FDNAMES`` tells them apart
#: from a socket unit's).
PREFIX = "echod-listener-"
#: How long a start waits for systemd to close the stored sockets it no longer wants.
BARRIER_TIMEOUT = 5.0


def name_of(sock: socket.socket) -> str:
    """The store's name for ``sock``: unique, and the same across an upgrade in place."""
    return PREFIX + str(os.fstat(sock.fileno()).st_ino)


def is_stored(name: str) -> bool:
    """Whether a ``$LISTEN_FDNAMES`` entry is a socket echod put in the store."""
    return name.startswith(PREFIX)


def keep(
    notifier: systemd.Notifier | None,
    listeners: Listeners,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Put every socket of ``listeners`` in the store (those there already stay as they
    are); False when there is no store or it is too small to hold them all."""
    if notifier is None or listeners.adopted:
        return False
    socks = listeners.all()
    if systemd.fd_store_max(environ) < len(socks):
        return False
    for sock in socks:
        notifier.store_fds(name_of(sock), [sock.fileno()])
    return True


def release(
    notifier: systemd.Notifier | None,
    listeners: Listeners,
    environ: Mapping[str, str] | None = None,
    *,
    keep: Listeners | None = None,
) -> None:
    """Close ``listeners`` for good (a reload moved away from them), all but the sockets
    ``keep`` (the listeners now in use) still serves: the store's copies too, or the kernel
    would go on queueing clients that nobody accepts."""
    going = listeners.without(keep)
    if notifier is not None and not listeners.adopted and systemd.fd_store_max(environ):
        for sock in going:
            notifier.remove_fds(name_of(sock))
    for sock in going:
        sock.close()


def forget(
    notifier: systemd.Notifier | None, stored: list[tuple[str, socket.socket]]
) -> None:
    """Close sockets systemd gave back that the configuration no longer asks for, and
    take them out of the store; return once systemd has closed its copies, so that an
    address they held may be bound again."""
    for name, sock in stored:
        sock.close()
        if notifier is not None:
            notifier.remove_fds(name)
    if stored and notifier is not None:
        notifier.barrier(BARRIER_TIMEOUT)
