"""Listening sockets: bound from the configuration, or adopted from systemd (socket
activation; or the file descriptor store, which gives back after a restart the sockets an
earlier echod bound, see :mod:`echod.fdstore`).

Each entry of ``listen`` (or its short form, ``host`` and ``port``) is a :class:`Listener`:
the entry and the sockets bound for it (a host name may resolve to several addresses, ``*``
to the IPv4 and the IPv6 wildcard), TCP and, with ``udp``, UDP on the same addresses and
ports. :class:`Listeners` is all of them, for one configuration.

The supervisor owns them; workers inherit them across ``fork``. A reload keeps the very
sockets of every entry it keeps (no connection waiting in a backlog is lost), binds those it
adds before anything changes, and the sockets of the entries it removes are closed once the
workers that served them have retired.

The options every accepted connection needs (the timeouts, ``TCP_NODELAY``, TCP keepalive)
are set on the listening sockets, once: Linux copies them to each socket accepted there.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import cast

from echod import exitcodes
from echod.config import Config
from echod.errors import OperatorError
from echod.kinds import EVERY_ADDRESS, Keepalive, ListenEntry

#: Where Linux keeps its keepalive timings, which a keepalive without its own applies.
KEEPALIVE_SYSCTL = {
    "idle": "/proc/sys/net/ipv4/tcp_keepalive_time",
    "interval": "/proc/sys/net/ipv4/tcp_keepalive_intvl",
    "count": "/proc/sys/net/ipv4/tcp_keepalive_probes",
}
_KEEPALIVE_OPTIONS = {
    "idle": socket.TCP_KEEPIDLE,
    "interval": socket.TCP_KEEPINTVL,
    "count": socket.TCP_KEEPCNT,
}
_IP_FAMILIES = (socket.AF_INET, socket.AF_INET6)


def format_address(sockname: tuple[object, ...] | str | bytes) -> str:
    """``127.0.0.1:9999``, ``[::1]:9999``, ``udp://...`` is added by the caller; a Unix
    socket's path, an abstract one's name after ``@`` (as systemd writes it)."""
    if isinstance(sockname, bytes):  # an abstract name (Linux): a NUL, then the name
        return "@" + sockname[1:].decode(errors="backslashreplace")
    if isinstance(sockname, str):
        return sockname
    host, port = str(sockname[0]), sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class Listener:
    """One entry of ``listen`` and the sockets bound for it."""

    entry: ListenEntry
    tcp: list[socket.socket] = field(default_factory=list)
    udp: list[socket.socket] = field(default_factory=list)

    def all(self) -> list[socket.socket]:
        return [*self.tcp, *self.udp]


@dataclass
class Listeners:
    """The sockets one configuration listens on, entry by entry."""

    groups: list[Listener] = field(default_factory=list)
    udp_enabled: bool = False
    adopted: bool = False

    @classmethod
    def of(cls, tcp: Iterable[socket.socket] = (), udp: Iterable[socket.socket] = ()) -> Listeners:
        """Listeners made of bound sockets, each an entry of its own (as adopted ones are)."""
        listeners = cls()
        for sock in tcp:
            listeners.groups.append(Listener(entry_of(sock), tcp=[sock]))
        for sock in udp:
            listeners.groups.append(Listener(entry_of(sock), udp=[sock]))
            listeners.udp_enabled = True
        return listeners

    @property
    def tcp(self) -> list[socket.socket]:
        return [sock for group in self.groups for sock in group.tcp]

    @property
    def udp(self) -> list[socket.socket]:
        return [sock for group in self.groups for sock in group.udp]

    def all(self) -> list[socket.socket]:
        return [*self.tcp, *self.udp]

    def entries(self) -> list[ListenEntry]:
        return [group.entry for group in self.groups]

    def addresses(self) -> list[str]:
        """Every bound address, for the start and ready events."""
        names = [format_address(s.getsockname()) for s in self.tcp]
        names += ["udp://" + format_address(s.getsockname()) for s in self.udp]
        return names

    def bound_port(self) -> int | None:
        """The first port actually bound, TCP before UDP (differs from the setting when that
        is 0); None when no socket is IP (systemd may pass Unix sockets alone)."""
        for sock in [*self.tcp, *self.udp]:
            if sock.family in _IP_FAMILIES:
                return int(sock.getsockname()[1])
        return None

    def local_addresses(self) -> dict[int, tuple[str, int] | None]:
        """By the descriptor of each TCP listening socket: the local address and port of
        every connection accepted there, when the listener says it without asking the
        kernel per connection; None for a wildcard (each connection has the address its
        client reached) and for a socket that is not IP."""
        known: dict[int, tuple[str, int] | None] = {}
        for sock in self.tcp:
            known[sock.fileno()] = None
            if sock.family not in _IP_FAMILIES:
                continue
            host, port = sock.getsockname()[:2]
            if not ipaddress.ip_address(host).is_unspecified:
                known[sock.fileno()] = (str(host), int(port))
        return known

    def set_connection_timeouts(self, receive: bytes, send: bytes) -> None:
        """Set SO_RCVTIMEO and SO_SNDTIMEO (``struct timeval``) on the TCP listeners: Linux
        copies them to every socket accepted there. The listeners are non-blocking, so
        they do not apply to accept itself."""
        for sock in self.tcp:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, receive)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, send)

    def set_tcp_options(
        self, nodelay: bool, keepalive: Keepalive, kernel: Mapping[str, int] | None = None
    ) -> None:
        """Set TCP_NODELAY and TCP keepalive on the TCP listeners, for every connection
        accepted there to inherit (Linux copies both). Set whatever their values, so that
        a reload that turns one off takes effect; a keepalive timing left to the kernel is
        set to the kernel's (``kernel``, default :func:`kernel_keepalive`), so that a reload
        from a timing of the file back to the kernel's takes effect too."""
        timings: dict[str, int] = {}
        if keepalive.enabled:
            defaults = kernel_keepalive() if kernel is None else kernel
            for name, value in keepalive.timings().items():
                chosen = value if value is not None else defaults.get(name)
                if chosen is not None:
                    timings[name] = chosen
        for sock in self.tcp:
            if sock.family not in _IP_FAMILIES:
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(nodelay))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(keepalive.enabled))
            for name, value in timings.items():
                sock.setsockopt(socket.IPPROTO_TCP, _KEEPALIVE_OPTIONS[name], value)

    def serves(self, cfg: Config) -> bool:
        """Whether these sockets already serve what ``cfg`` asks for (the backlogs aside,
        which :func:`update_backlog` changes on the sockets themselves)."""
        if self.adopted:
            return True
        entries = cfg.listen_entries()
        if cfg.udp != self.udp_enabled or len(entries) != len(self.groups):
            return False
        pairs = zip(self.groups, entries, strict=True)
        return all(group.entry.same_sockets(entry) for group, entry in pairs)

    def close(self) -> None:
        for sock in self.all():
            sock.close()

    def close_except(self, kept: Iterable[socket.socket]) -> None:
        """Close the sockets that are not in ``kept`` (another configuration's)."""
        keep = {id(sock) for sock in kept}
        for sock in self.all():
            if id(sock) not in keep:
                sock.close()

    def without(self, other: Listeners | None) -> list[socket.socket]:
        """The sockets of these listeners that ``other`` does not use."""
        theirs = {id(sock) for sock in other.all()} if other is not None else set()
        return [sock for sock in self.all() if id(sock) not in theirs]


def kernel_keepalive() -> dict[str, int]:
    """The kernel's keepalive timings (``net.ipv4.tcp_keepalive_*``), those it can read."""
    found: dict[str, int] = {}
    for name, path in KEEPALIVE_SYSCTL.items():
        try:
            with open(path, encoding="ascii") as f:
                found[name] = int(f.read())
        except (OSError, ValueError):
            continue
    return found


def entry_of(sock: socket.socket) -> ListenEntry:
    """The entry a bound socket serves, read back from it (an adopted socket)."""
    if sock.family not in _IP_FAMILIES:
        return ListenEntry(str(sock.getsockname()), 0)
    host, port = sock.getsockname()[:2]
    return ListenEntry(str(host), int(port), _v6only(sock))


def _v6only(sock: socket.socket) -> bool:
    if sock.family != socket.AF_INET6:
        return False
    return bool(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))


#: An address to bind: family, socket address, and IPV6_V6ONLY.
_Address = tuple[int, tuple[object, ...], bool]


def _resolve(entry: ListenEntry, port: int, kind: socket.SocketKind) -> list[_Address]:
    """The addresses of ``entry`` (on ``port``): ``*`` is the IPv4 wildcard and the IPv6
    one, the latter IPv6 only so that both may be bound."""
    if entry.host == EVERY_ADDRESS:
        wildcards: list[_Address] = [(socket.AF_INET, ("0.0.0.0", port), False)]
        if socket.has_ipv6:
            wildcards.append((socket.AF_INET6, ("::", port, 0, 0), True))
        return wildcards
    try:
        infos = socket.getaddrinfo(entry.host, port, type=kind, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        message = f"cannot resolve host {entry.host!r}: {exc.strerror}"
        raise OperatorError(message, exitcodes.EX_CONFIG) from None
    seen: list[_Address] = []
    for family, _type, _proto, _name, sockaddr in infos:
        address = (int(family), tuple(sockaddr), entry.ipv6_only and family == socket.AF_INET6)
        if address not in seen:
            seen.append(address)
    return seen


def _bind_one(
    address: _Address, kind: socket.SocketKind, backlog: int, optional: bool
) -> socket.socket | None:
    """A socket bound to ``address``; None when ``optional`` and the family is missing
    (``*`` on a host without IPv6)."""
    family, sockaddr, v6only = address
    try:
        sock = socket.socket(family, kind)
    except OSError as exc:
        if optional and exc.errno in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
            return None
        raise _bind_error(exc, kind, sockaddr) from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # Off: "[::]" serves IPv4 too (dual stack), unless the entry says ipv6_only.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        sock.bind(sockaddr)
        if kind == socket.SOCK_STREAM:
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if optional and exc.errno == errno.EADDRNOTAVAIL:
            return None  # IPv6 compiled in, but the host has no IPv6 address at all
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


#: What identifies a listening socket: type, family, address, port and IPV6_V6ONLY.
SocketKey = tuple[int, int, str, int, bool]


def _key(kind: int, address: _Address) -> SocketKey:
    family, sockaddr, v6only = address
    host = str(sockaddr[0])
    # IPV6_V6ONLY tells sockets apart on the IPv6 wildcard only: Linux sets it on a socket
    # bound to any other IPv6 address, whatever was asked.
    return (int(kind), int(family), host, cast(int, sockaddr[1]), v6only and _unspecified(host))


def _unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def key_of(sock: socket.socket) -> SocketKey:
    """The key of a bound socket, comparable with those :func:`wanted` gives."""
    return _key(sock.type, (sock.family, tuple(sock.getsockname()), _v6only(sock)))


def wanted(cfg: Config) -> set[SocketKey]:
    """The sockets ``cfg`` asks for (none on port 0: the kernel picks a new one)."""
    kinds = [socket.SOCK_STREAM, socket.SOCK_DGRAM] if cfg.udp else [socket.SOCK_STREAM]
    return {
        _key(kind, address)
        for entry in cfg.listen_entries()
        if entry.port != 0
        for kind in kinds
        for address in _resolve(entry, entry.port, kind)
    }


class _Binder:
    """Binds the sockets of entries, taking those of ``pool`` (bound already: the
    listeners in use, the store's) whose address is asked for instead of binding them."""

    def __init__(self, pool: list[socket.socket]) -> None:
        self.pool = {id(sock) for sock in pool}
        self.kept = {key_of(sock): sock for sock in pool}

    def close_fresh(self, socks: Iterable[socket.socket]) -> None:
        """Close those of ``socks`` bound here (not the pool's)."""
        close_all(s for s in socks if id(s) not in self.pool)

    def take(self, socks: Iterable[socket.socket]) -> None:
        """``socks`` are an entry's already: no other entry takes them."""
        for sock in socks:
            self.kept.pop(key_of(sock), None)

    def kind(
        self, entry: ListenEntry, port: int, kind: socket.SocketKind, backlog: int
    ) -> list[socket.socket]:
        """Every address of ``entry`` on ``port``, bound or taken (with the new backlog)."""
        bound: list[socket.socket] = []
        try:
            for family, resolved, v6only in _resolve(entry, port, kind):
                sockaddr = resolved
                if port == 0 and bound:
                    # Every address of one entry shares the port the kernel chose first.
                    sockaddr = (resolved[0], bound[0].getsockname()[1], *resolved[2:])
                address = (family, sockaddr, v6only)
                kept = self.kept.pop(_key(kind, address), None)
                if kept is None:
                    self.refuse_changed_v6only(kind, address)
                    sock = _bind_one(address, kind, backlog, entry.host == EVERY_ADDRESS)
                    if sock is not None:
                        bound.append(sock)
                    continue
                kept.setblocking(False)
                if kind == socket.SOCK_STREAM:
                    kept.listen(backlog)
                bound.append(kept)
        except OperatorError:
            self.close_fresh(bound)
            raise
        return bound

    def refuse_changed_v6only(self, kind: socket.SocketKind, address: _Address) -> None:
        """A socket on this very address that differs in IPV6_V6ONLY alone can neither be
        changed (the option is fixed at bind) nor bound beside: say so, not "in use"."""
        family, sockaddr, v6only = address
        if family == socket.AF_INET6 and _key(kind, (family, sockaddr, not v6only)) in self.kept:
            raise OperatorError(
                f"cannot change ipv6_only of {format_address(sockaddr)} while it listens"
                " (the option is fixed when the socket is bound): restart echod to change it",
                exitcodes.EX_UNAVAILABLE,
            )

    def entry(self, entry: ListenEntry, cfg: Config) -> Listener:
        backlog = cfg.backlog_of(entry)
        listener = Listener(entry, tcp=self.kind(entry, entry.port, socket.SOCK_STREAM, backlog))
        if cfg.udp:
            self.add_udp(listener, backlog)
        return listener

    def keep(self, entry: ListenEntry, same: Listener, cfg: Config) -> Listener:
        """The sockets of an entry a reload keeps (with its new backlog), and UDP bound
        beside them if the reload turns it on."""
        self.take(same.all())
        for sock in same.tcp:
            sock.listen(cfg.backlog_of(entry))
        listener = Listener(entry, tcp=list(same.tcp), udp=list(same.udp) if cfg.udp else [])
        if cfg.udp and not listener.udp:
            self.add_udp(listener, cfg.backlog_of(entry))
        return listener

    def add_udp(self, listener: Listener, backlog: int) -> None:
        # UDP shares the TCP port, also when the kernel chose it.
        port = listener.tcp[0].getsockname()[1] if listener.tcp else listener.entry.port
        try:
            listener.udp = self.kind(listener.entry, port, socket.SOCK_DGRAM, backlog)
        except OperatorError:
            self.close_fresh(listener.tcp)
            raise


def bind_tcp(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Every address of ``host`` on ``port``, listening (the metrics endpoint's sockets).
    Raises OperatorError."""
    return _Binder([]).kind(ListenEntry(host, port), port, socket.SOCK_STREAM, backlog)


def bind(
    cfg: Config, reuse: Iterable[socket.socket] = (), previous: Listeners | None = None
) -> Listeners:
    """Bind the TCP (and, if enabled, UDP) sockets of every entry ``cfg`` lists. An entry
    that ``previous`` (the listeners in use, on a reload) serves already keeps its very
    sockets; a socket of ``previous`` or of ``reuse`` (the store's, at start) bound to an
    address ``cfg`` asks for is taken instead of binding it again. Raises OperatorError,
    having closed what it bound (and nothing it was given)."""
    theirs = list(previous.groups) if previous is not None else []
    binder = _Binder([*(previous.all() if previous is not None else []), *reuse])
    listeners = Listeners(udp_enabled=cfg.udp)
    try:
        for entry in cfg.listen_entries():
            same = next((g for g in theirs if g.entry.same_sockets(entry)), None)
            if same is None:
                listener = binder.entry(entry, cfg)
            else:
                theirs.remove(same)  # (two entries on port 0 are two listeners)
                listener = binder.keep(entry, same, cfg)
            listeners.groups.append(listener)
    except OperatorError:
        binder.close_fresh(listeners.all())
        raise
    return listeners


def adopt(sockets: Iterable[socket.socket], cfg: Config) -> Listeners:
    """Wrap sockets passed by systemd (socket activation: one per ``ListenStream=`` and
    ``ListenDatagram=``); they outlive every reload."""
    usable: list[socket.socket] = []
    for sock in sockets:
        if sock.type == socket.SOCK_STREAM and not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            # A unit with Accept=yes starts a service per connection, with that connection:
            # echod accepts its own, from a listening socket.
            message = (
                f"systemd passed a connected socket ({format_address(sock.getsockname())}), "
                "not a listening one: the socket unit has Accept=yes; echod needs Accept=no"
            )
            raise OperatorError(message, exitcodes.EX_CONFIG)
        if sock.type in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            sock.setblocking(False)
            usable.append(sock)
        else:
            sock.close()
    if not usable:
        message = "systemd passed no usable socket (LISTEN_FDS)"
        raise OperatorError(message, exitcodes.EX_UNAVAILABLE)
    listeners = Listeners.of(
        [s for s in usable if s.type == socket.SOCK_STREAM],
        [s for s in usable if s.type == socket.SOCK_DGRAM],
    )
    listeners.adopted = True
    return listeners


def update_backlog(listeners: Listeners, cfg: Config) -> None:
    """Apply ``cfg``'s backlogs to sockets kept across a reload (``listen`` may be called
    again), entry by entry; their entries take the new values."""
    if listeners.adopted:
        for sock in listeners.tcp:
            sock.listen(cfg.backlog)
        return
    # (serves() said that the entries are the same, one for one)
    for group, entry in zip(listeners.groups, cfg.listen_entries(), strict=True):
        group.entry = entry
        for sock in group.tcp:
            sock.listen(cfg.backlog_of(entry))


def close_all(socks: Iterable[socket.socket]) -> None:
    for sock in socks:
        sock.close()
