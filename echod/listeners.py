"""Listening sockets: bound from the configuration, or adopted from systemd (socket
activation; or the file descriptor store, which gives back after a restart the sockets an
earlier echod bound, see :mod:`echod.fdstore`).

The supervisor owns them; workers inherit them across ``fork``. A reload that keeps the
address keeps the very same sockets, so no connection waiting in the backlog is lost; a reload
that changes it binds the new sockets before the old ones are closed.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

from echod import exitcodes
from echod.config import Config
from echod.errors import OperatorError


def format_address(sockname: tuple[object, ...] | str) -> str:
    """``127.0.0.1:9999``, ``[::1]:9999``, ``udp://...`` is added by the caller."""
    if isinstance(sockname, str):
        return sockname
    host, port = str(sockname[0]), sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class Listeners:
    """The sockets one configuration listens on."""

    host: str
    port: int
    udp_enabled: bool
    tcp: list[socket.socket] = field(default_factory=list)
    udp: list[socket.socket] = field(default_factory=list)
    adopted: bool = False

    def all(self) -> list[socket.socket]:
        return [*self.tcp, *self.udp]

    def addresses(self) -> list[str]:
        """Every bound address, for the start and ready events."""
        names = [format_address(s.getsockname()) for s in self.tcp]
        names += ["udp://" + format_address(s.getsockname()) for s in self.udp]
        return names

    def bound_port(self) -> int:
        """The TCP port actually bound (differs from the setting when that is 0)."""
        sock = self.tcp[0] if self.tcp else self.udp[0]
        return int(sock.getsockname()[1])

    def common_port(self) -> int | None:
        """The one TCP port every listener has (None if they differ): each connection's
        local port, known without asking the kernel."""
        ports = {sock.getsockname()[1] for sock in self.tcp}
        return ports.pop() if len(ports) == 1 else None

    def set_connection_timeouts(self, receive: bytes, send: bytes) -> None:
        """Set SO_RCVTIMEO and SO_SNDTIMEO (``struct timeval``) on the TCP listeners: Linux
        copies them to every socket accepted there. The listeners are non-blocking, so
        they do not apply to accept itself."""
        for sock in self.tcp:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, receive)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, send)

    def serves(self, cfg: Config) -> bool:
        """Whether these sockets already serve what ``cfg`` asks for."""
        if self.adopted:
            return True
        return (self.host, self.port, self.udp_enabled) == (cfg.host, cfg.port, cfg.udp)

    def close(self) -> None:
        for sock in self.all():
            sock.close()


def _resolve(host: str, port: int, kind: socket.SocketKind) -> list[tuple[int, tuple[object, ...]]]:
    try:
        infos = socket.getaddrinfo(host, port, type=kind, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        message = f"cannot resolve host {host!r}: {exc.strerror}"
        raise OperatorError(message, exitcodes.EX_CONFIG) from None
    seen: list[tuple[int, tuple[object, ...]]] = []
    for family, _type, _proto, _name, sockaddr in infos:
        entry = (int(family), tuple(sockaddr))
        if entry not in seen:
            seen.append(entry)
    return seen


def _bind_one(
    family: int, kind: socket.SocketKind, sockaddr: tuple[object, ...], backlog: int
) -> socket.socket:
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # "::" serves IPv4 too (dual stack); "::1" and other literals are IPv6 only anyway.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
        if kind == socket.SOCK_STREAM:
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise _bind_error(exc, kind, sockaddr) from None
    return sock


def _bind_error(
    exc: OSError, kind: socket.SocketKind, sockaddr: tuple[object, ...]
) -> OperatorError:
    proto = "tcp" if kind == socket.SOCK_STREAM else "udp"
    where = f"{proto} {format_address(sockaddr)}"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return OperatorError(
            f"cannot listen on {where}: permission denied "
            "(ports below 1024 need root or CAP_NET_BIND_SERVICE)",
            exitcodes.EX_NOPERM,
        )
    if exc.errno == errno.EADDRINUSE:
        message = f"cannot listen on {where}: address already in use"
        return OperatorError(message, exitcodes.EX_UNAVAILABLE)
    return OperatorError(f"cannot listen on {where}: {exc.strerror}", exitcodes.EX_UNAVAILABLE)


#: What identifies a listening socket: type, family, address and port.
SocketKey = tuple[int, int, str, int]


def _key(kind: int, family: int, sockaddr: tuple[object, ...]) -> SocketKey:
    return (int(kind), int(family), str(sockaddr[0]), cast(int, sockaddr[1]))


def key_of(sock: socket.socket) -> SocketKey:
    """The key of a bound socket, comparable with those :func:`wanted` gives."""
    return _key(sock.type, sock.family, tuple(sock.getsockname()))


def wanted(cfg: Config) -> set[SocketKey]:
    """The sockets ``cfg`` asks for (none of them on port 0: the kernel picks a new one)."""
    kinds = [socket.SOCK_STREAM, socket.SOCK_DGRAM] if cfg.udp else [socket.SOCK_STREAM]
    return {
        _key(kind, family, sockaddr)
        for kind in kinds
        for family, sockaddr in _resolve(cfg.host, cfg.port, kind)
        if cfg.port != 0
    }


def _bind_kind(
    host: str,
    port: int,
    kind: socket.SocketKind,
    backlog: int,
    reuse: dict[SocketKey, socket.socket] | None = None,
) -> list[socket.socket]:
    """Bind every address of ``host``; those in ``reuse`` are taken from it, not bound."""
    reuse = {} if reuse is None else reuse
    bound: list[socket.socket] = []
    try:
        for family, resolved in _resolve(host, port, kind):
            sockaddr = resolved
            if port == 0 and bound:
                # Every address of one host shares the port the kernel chose for the first.
                sockaddr = (resolved[0], bound[0].getsockname()[1], *resolved[2:])
            kept = reuse.pop(_key(kind, family, sockaddr), None)
            if kept is None:
                bound.append(_bind_one(family, kind, sockaddr, backlog))
                continue
            kept.setblocking(False)
            if kind == socket.SOCK_STREAM:
                kept.listen(backlog)
            bound.append(kept)
    except OperatorError:
        close_all(bound)
        raise
    return bound


def bind(cfg: Config, reuse: Iterable[socket.socket] = ()) -> Listeners:
    """Bind the TCP (and, if enabled, UDP) sockets ``cfg`` asks for, taking those of
    ``reuse`` that are bound to one of its addresses already (see :func:`wanted`) instead of
    binding them again. Raises OperatorError."""
    kept = {key_of(sock): sock for sock in reuse}
    listeners = Listeners(cfg.host, cfg.port, cfg.udp)
    listeners.tcp = _bind_kind(cfg.host, cfg.port, socket.SOCK_STREAM, cfg.backlog, kept)
    if cfg.udp:
        # UDP shares the TCP port, also when the kernel chose it.
        port = listeners.tcp[0].getsockname()[1] if listeners.tcp else cfg.port
        try:
            listeners.udp = _bind_kind(cfg.host, port, socket.SOCK_DGRAM, cfg.backlog, kept)
        except OperatorError:
            listeners.close()
            raise
    return listeners


def adopt(sockets: Iterable[socket.socket], cfg: Config) -> Listeners:
    """Wrap sockets passed by systemd (socket activation); they outlive every reload."""
    listeners = Listeners(cfg.host, cfg.port, cfg.udp, adopted=True)
    for sock in sockets:
        sock.setblocking(False)
        if sock.type == socket.SOCK_STREAM:
            listeners.tcp.append(sock)
        elif sock.type == socket.SOCK_DGRAM:
            listeners.udp.append(sock)
        else:
            sock.close()
    if not listeners.tcp and not listeners.udp:
        message = "systemd passed no usable socket (LISTEN_FDS)"
        raise OperatorError(message, exitcodes.EX_UNAVAILABLE)
    return listeners


def update_backlog(listeners: Listeners, backlog: int) -> None:
    """Apply a new backlog to sockets kept across a reload (``listen`` may be called again)."""
    for sock in listeners.tcp:
        sock.listen(backlog)


def close_all(socks: Iterable[socket.socket]) -> None:
    for sock in socks:
        sock.close()
