"""What a setting may hold: the ``Setting`` row, and the check and the rule of each kind.

A ``Setting`` names one setting and declares its kind (``int``, ``host``, ``networks`` ...),
default, bounds and one-line doc; ``Setting.convert`` checks a value YAML gave against the
kind, strictly (``true`` is not 1), and ``Setting.rule`` says in words what the kind accepts.
A new kind of value is a new ``Kind``, its check below, and a branch in ``rule`` and
``convert``. The table of the settings themselves is ``echod.settings``.

Two kinds hold more than a scalar, each as a frozen value of its own: ``listen`` a tuple of
:class:`ListenEntry` (an address and that listener's options), ``keepalive`` a
:class:`Keepalive`. Their mappings' keys are declared as ``Setting`` rows too
(:data:`LISTEN_FIELDS`, :data:`KEEPALIVE_FIELDS`), so that each key is checked, and its rule
told, as a setting's is.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from dataclasses import dataclass
from datetime import date
from typing import Literal, TypeVar

Kind = Literal[
    "int",
    "number",
    "bool",
    "choice",
    "host",
    "path",
    "networks",
    "endpoint",
    "address",
    "user",
    "group",
    "listen",
    "keepalive",
]
_N = TypeVar("_N", int, float)


class InvalidValueError(ValueError):
    """A value broke its setting's rule; the loader adds where it was written."""

    def __init__(self, problem: str, hint: str = "", item: int | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.hint = hint
        #: The 0-based index of the list item at fault, when the value is a list.
        self.item = item


@dataclass(frozen=True)
class Setting:
    """One row of the table: a setting's name, kind, default, rule and one-line doc.

    ``name`` is dotted for settings inside a section (``log.level``). ``minimum`` and
    ``maximum`` bound ``int`` and ``number`` kinds (``above`` makes the minimum exclusive);
    ``also_zero`` admits 0 besides the range; ``nullable`` admits ``null``. A ``choice`` with
    ``bool_aliases`` (the choices ``false`` and ``true`` stand for) also takes a boolean: the
    form the setting had before it had more than two values.
    """

    name: str
    kind: Kind
    default: object
    doc: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    above: bool = False
    also_zero: bool = False
    nullable: bool = False
    bool_aliases: tuple[str, str] | tuple[()] = ()

    @property
    def key(self) -> str:
        """The name within its section (``level`` for ``log.level``)."""
        return self.name.rpartition(".")[2]

    @property
    def section(self) -> str:
        """The dotted section the setting lives in, ``""`` at the top level."""
        return self.name.rpartition(".")[0]

    @property
    def rule(self) -> str:
        """What the setting accepts, in words: used in error messages and the docs."""
        text = self._base_rule()
        return f"{text}, or null" if self.nullable else text

    def _base_rule(self) -> str:
        if self.kind == "int":
            text = f"an integer from {_num(self.minimum)} to {_num(self.maximum)}"
            return f"0, or {text}" if self.also_zero else text
        if self.kind == "number":
            relation = ">" if self.above else ">="
            return f"a number {relation} {_num(self.minimum)}"
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            text = "one of " + ", ".join(self.choices)
            if self.bool_aliases:
                off, on = self.bool_aliases
                text += f" (true is {on}, false {off})"
            return text
        if self.kind == "host":
            return "an IP address or a host name"
        if self.kind == "networks":
            return "a list of IP addresses and CIDR blocks (IPv4 or IPv6)"
        if self.kind == "endpoint":
            return 'an address and port as "host:port" ("[::1]:port" for IPv6)'
        if self.kind == "address":
            return '"host:port" ("[::1]:port" for IPv6, "*:port" for every address)'
        if self.kind in ("user", "group"):
            return f"a {self.kind} name or number"
        if self.kind == "listen":
            return (
                'a list of "host:port" ("[::1]:port" for IPv6, "*:port" for every address),'
                " each alone or as {address, ipv6_only, backlog}"
            )
        if self.kind == "keepalive":
            return (
                "false, true (the kernel's timings), or {idle, interval, count}: seconds from"
                f" 1 to {KEEPALIVE_SECONDS_MAX}, probes from 1 to {KEEPALIVE_COUNT_MAX}"
            )
        return "an absolute path"

    @property
    def expects(self) -> str:
        """The type expected, with its article, as in "is a string, not an integer"."""
        return {
            "int": "an integer",
            "number": "a number",
            "bool": "a boolean",
            "networks": "a list",
            "listen": "a list",
            "user": "a name or a number",
            "group": "a name or a number",
            "keepalive": "a boolean or a mapping",
        }.get(self.kind, "a string")

    def convert(self, value: object) -> object:
        """Return ``value`` as the setting holds it, or raise ``InvalidValueError``.

        ``value`` is what YAML constructed: types are never coerced (``true`` is not 1 and
        ``"9999"`` is not a number); an integer is accepted where a number is expected.
        """
        if value is None:
            if self.nullable:
                return None
            raise InvalidValueError("is not allowed")
        if self.kind == "int":
            return self._check_range(self._int(value))
        if self.kind == "number":
            return self._check_range(self._number(value))
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise self._mismatch(value)
            return value
        if self.bool_aliases and isinstance(value, bool):
            return self.bool_aliases[value]
        if self.kind == "networks":
            return _check_networks(value)
        if self.kind == "listen":
            return check_listen(value)
        if self.kind == "keepalive":
            return check_keepalive(value)
        if self.kind in ("user", "group"):
            return self._account(value)
        if not isinstance(value, str):
            raise self._mismatch(value)
        if self.kind == "choice":
            return self._choice(value)
        if self.kind == "host":
            return _check_host(value)
        if self.kind == "endpoint":
            return _check_endpoint(value)
        if self.kind == "address":
            parse_listen_address(value)
            return value
        return _check_path(value)

    def _mismatch(self, value: object) -> InvalidValueError:
        return InvalidValueError(f"is {_describe(value)}, not {self.expects}")

    def _int(self, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._mismatch(value)
        return value

    def _number(self, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._mismatch(value)
        try:
            number = float(value)
        except OverflowError:  # an integer too large for a float
            raise InvalidValueError("is out of range") from None
        if not math.isfinite(number):
            raise InvalidValueError("is not a finite number")
        return number

    def _check_range(self, value: _N) -> _N:
        if self.also_zero and value == 0:
            return value
        too_low = self.minimum is not None and (
            value <= self.minimum if self.above else value < self.minimum
        )
        too_high = self.maximum is not None and value > self.maximum
        if too_low or too_high:
            raise InvalidValueError("is out of range")
        return value

    def _account(self, value: object) -> str | int:
        """A user or group: a name as the system's databases write it, or a number (an id,
        which need not have an entry)."""
        if isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < _ID_LIMIT:
                raise InvalidValueError("is out of range", f"an id from 0 to {_ID_LIMIT - 1}")
            return value
        if not isinstance(value, str):
            raise self._mismatch(value)
        if value.isdigit():
            raise InvalidValueError("is a string of digits", "write an id without quotes")
        if not _ACCOUNT_NAME.fullmatch(value):
            raise InvalidValueError(f"is not a valid {self.kind} name")
        return value

    def _choice(self, value: str) -> str:
        if value in self.choices:
            return value
        close = difflib.get_close_matches(value, self.choices, n=1)
        raise InvalidValueError(
            "is not a valid choice", f"did you mean {close[0]!r}?" if close else ""
        )


def _num(value: float | None) -> str:
    """Format a bound or a default number the way a person would write it."""
    if value is None:
        return "?"
    return str(int(value)) if float(value).is_integer() else repr(value)


_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# What useradd(8) and the name services accept, loosely: no separator of /etc/passwd or
# /etc/group (":" "," whitespace), no path separator, not starting with "-" (an option).
_ACCOUNT_NAME = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.@$-]{0,255}")
#: uid_t and gid_t are 32 bits; (uid_t) -1 means "unchanged" to the kernel.
_ID_LIMIT = 2**32 - 1


def _check_host(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        return value
    if value.startswith("[") and value.endswith("]"):
        raise InvalidValueError("is not a valid address", "write an IPv6 address without brackets")
    name = value.removesuffix(".")
    labels = name.split(".")
    # A name whose last label is all digits is a mistyped IPv4 address, not a host name.
    if (
        not name
        or len(name) > 253
        or labels[-1].isdigit()
        or not all(_LABEL.fullmatch(label) for label in labels)
    ):
        raise InvalidValueError("is not a valid IP address or host name")
    return value


def check_network(item: object) -> str:
    """One address or CIDR block of a ``networks`` list."""
    if not isinstance(item, str):
        raise InvalidValueError(f"is {_describe(item)}, not a string")
    try:
        ipaddress.ip_network(item, strict=False)
    except ValueError:
        raise InvalidValueError("is not an IP address or CIDR block") from None
    return item


def _check_networks(value: object) -> tuple[str, ...]:
    """A list of addresses and CIDR blocks, kept as written (``echod.acl`` compiles them)."""
    if not isinstance(value, list | tuple):
        raise InvalidValueError(f"is {_describe(value)}, not a list")
    networks: list[str] = []
    for index, item in enumerate(value):
        try:
            networks.append(check_network(item))
        except InvalidValueError as bad:
            raise InvalidValueError(f"item {index + 1} {show_value(item)} {bad.problem}") from None
    return tuple(networks)


def split_endpoint(value: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) as (host, port); the value must be valid already."""
    host, _, port = value.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _check_endpoint(value: str) -> str:
    host, colon, port = value.rpartition(":")
    if not colon or not host:
        raise InvalidValueError("has no port", 'write it as "host:port"')
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidValueError("has a port that is not an integer from 0 to 65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise InvalidValueError("has an invalid IPv6 address in brackets") from None
        return value
    if ":" in host:
        raise InvalidValueError("is ambiguous", 'write an IPv6 address as "[addr]:port"')
    _check_host(host)
    return value


#: A group's name as groupadd(8) takes it.
def _check_path(value: str) -> str:
    if not value:
        raise InvalidValueError("is empty")
    if "\0" in value:
        raise InvalidValueError("contains a NUL character")
    # echod may change directory to / when it detaches: a relative path would move with it.
    if not os.path.isabs(value):
        raise InvalidValueError("is not an absolute path")
    return value


def _describe(value: object) -> str:
    """Name a YAML value's type for a message: "a boolean", "a string" ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bytes):
        return "binary data"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return "a date" if isinstance(value, date) else f"a {type(value).__name__}"


def show_value(value: object) -> str:
    """Show a value in an error message much as it would be written in YAML."""
    if value is None:
        return "null"
    if isinstance(value, tuple):
        return show_value(list(value))
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
    if isinstance(value, date):
        return value.isoformat()
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- listen: several listeners, each with its own options -------------------------------------

#: The ``host`` of a ``listen`` entry that means every address: IPv4 and IPv6.
EVERY_ADDRESS = "*"


@dataclass(frozen=True, slots=True)
class ListenEntry:
    """One listener of ``listen``: ``host`` (an IP address, a host name, or ``*``: every
    IPv4 and IPv6 address), ``port`` (0: the kernel picks one), and its own options:
    ``ipv6_only`` (an IPv6 address serves IPv6 clients only; else ``[::]`` serves IPv4 too),
    ``backlog`` (None: the ``backlog`` setting)."""

    host: str
    port: int
    ipv6_only: bool = False
    backlog: int | None = None

    @property
    def address(self) -> str:
        """``host:port`` as written in the file (``[::1]:7``, ``*:7``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def plain(self) -> bool:
        """Whether it has no option of its own (written as its address alone)."""
        return not self.ipv6_only and self.backlog is None

    def same_sockets(self, other: ListenEntry) -> bool:
        """Whether ``other`` is served by the very sockets of this one (the backlog may
        change on a socket; the address and ipv6_only may not)."""
        return (self.host, self.port, self.ipv6_only) == (other.host, other.port, other.ipv6_only)

    def __str__(self) -> str:
        options = [f"ipv6_only: {'true' if self.ipv6_only else 'false'}"] if self.ipv6_only else []
        if self.backlog is not None:
            options.append(f"backlog: {self.backlog}")
        return self.address if not options else f"{self.address} ({', '.join(options)})"


#: The keys of a ``listen`` entry written as a mapping, each checked as a setting is.
LISTEN_FIELDS: tuple[Setting, ...] = (
    Setting("address", "address", None, '"host:port" to listen on.'),
    Setting("ipv6_only", "bool", False, "[::] serves IPv6 clients only (not IPv4 too)."),
    Setting(
        "backlog",
        "int",
        None,
        "This listener's backlog; null: the backlog setting.",
        minimum=1,
        maximum=65535,
        nullable=True,
    ),
)


def parse_listen_address(value: object) -> tuple[str, int]:
    """``host:port`` of a ``listen`` entry as (host, port): ``[v6]:port`` without the
    brackets, ``*:port`` for every address."""
    if not isinstance(value, str):
        raise InvalidValueError(f"is {_describe(value)}, not a string")
    host, colon, port = value.rpartition(":")
    if not colon:
        raise InvalidValueError("has no port", 'write it as "host:port"')
    if not host:
        raise InvalidValueError("has no host", 'write "*:port" to listen on every address')
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidValueError("has a port that is not an integer from 0 to 65535")
    if host == EVERY_ADDRESS:
        return host, int(port)
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise InvalidValueError("has an invalid IPv6 address in brackets") from None
        return host[1:-1], int(port)
    if ":" in host:
        raise InvalidValueError("is ambiguous", 'write an IPv6 address as "[addr]:port"')
    _check_host(host)
    return host, int(port)


def check_listen_item(value: object) -> ListenEntry:
    """One entry of ``listen``: ``"host:port"``, or a mapping of :data:`LISTEN_FIELDS`."""
    if isinstance(value, ListenEntry):
        return value
    if isinstance(value, str):
        return ListenEntry(*parse_listen_address(value))
    if not isinstance(value, dict):
        raise InvalidValueError(f"is {_describe(value)}, not a string or a mapping")
    fields = check_fields(value, LISTEN_FIELDS)
    if "address" not in fields:
        raise InvalidValueError("has no address", "write {address: 'host:port', ...}")
    host, port = parse_listen_address(fields["address"])
    ipv6_only = bool(fields.get("ipv6_only", False))
    backlog = fields.get("backlog")
    if ipv6_only and (host == EVERY_ADDRESS or _version(host) == 4):
        raise InvalidValueError(
            "has ipv6_only on an address that is not IPv6",
            'ipv6_only applies to an IPv6 address such as "[::]:port"',
        )
    return ListenEntry(host, port, ipv6_only, backlog if isinstance(backlog, int) else None)


def check_fields(value: dict[object, object], fields: tuple[Setting, ...]) -> dict[str, object]:
    """The keys of a small mapping (a ``listen`` entry, ``tcp_keepalive``), each converted
    by its row in ``fields``; an unknown key is an error, with a "did you mean"."""
    known = {f.name: f for f in fields}
    converted: dict[str, object] = {}
    for key, item in value.items():
        field = known.get(key) if isinstance(key, str) else None
        if field is None:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "the keys are " + ", ".join(known)
            raise InvalidValueError(f"has the unknown key {show_value(key)}", hint)
        try:
            converted[field.name] = field.convert(item)
        except InvalidValueError as bad:
            hint = field.rule + (f"; {bad.hint}" if bad.hint else "")
            problem = f"has {field.name} {show_value(item)}, which {bad.problem}"
            raise InvalidValueError(problem, hint) from None
    return converted


def _version(host: str) -> int | None:
    """4 or 6 for an IP address, None for a host name (or ``*``)."""
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


def _scopes(entry: ListenEntry) -> set[str] | None:
    """What ``entry`` listens on, to find overlaps: the wildcards ``v4`` and ``v6`` (every
    address of the family) or its one address; None for a host name (resolved at bind)."""
    if entry.host == EVERY_ADDRESS:
        return {"v4", "v6"}
    version = _version(entry.host)
    if version is None:
        return None
    address = ipaddress.ip_address(entry.host)
    if address.is_unspecified:
        if version == 4:
            return {"v4"}
        # "[::]" serves IPv4 too unless ipv6_only says otherwise (IPV6_V6ONLY off).
        return {"v6"} if entry.ipv6_only else {"v6", "v4"}
    return {str(address)}


def _overlap(a: set[str], b: set[str]) -> bool:
    if a & b:
        return True
    for wild, other in ((a, b), (b, a)):
        for scope in other - {"v4", "v6"}:
            if f"v{ipaddress.ip_address(scope).version}" in wild:
                return True
    return False


def check_listen(value: object) -> tuple[ListenEntry, ...]:
    """The ``listen`` list: each entry valid, and no two listening on one address and port
    (the second could not be bound)."""
    if not isinstance(value, list | tuple):
        raise InvalidValueError(f"is {_describe(value)}, not a list")
    entries: list[ListenEntry] = []
    for index, item in enumerate(value):
        try:
            entry = check_listen_item(item)
        except InvalidValueError as bad:
            raise InvalidValueError(
                f"item {index + 1} {show_value(_shown(item))} {bad.problem}", bad.hint, index
            ) from None
        clash = _clash(entry, entries)
        if clash is not None:
            raise InvalidValueError(
                f"item {index + 1} {show_value(entry.address)} {clash[0]}", clash[1], index
            )
        entries.append(entry)
    return tuple(entries)


def _shown(item: object) -> object:
    """A list item as its message shows it: a mapping by its address, when it has one."""
    if isinstance(item, dict) and isinstance(item.get("address"), str):
        return item["address"]
    return item


def _clash(entry: ListenEntry, before: list[ListenEntry]) -> tuple[str, str] | None:
    """Why ``entry`` cannot be bound beside the entries ``before`` it: (problem, hint)."""
    if entry.port == 0:
        return None  # each takes a port of its own
    mine = _scopes(entry)
    for index, other in enumerate(before):
        if other.port != entry.port:
            continue
        if other.host == entry.host:
            return f"is listed twice (item {index + 1})", "each address at most once"
        theirs = _scopes(other)
        if mine is None or theirs is None or not _overlap(mine, theirs):
            continue
        dual = next(
            (e for e in (other, entry) if _version(e.host) == 6 and "v4" in (_scopes(e) or ())),
            None,
        )
        if dual is not None:
            # ipv6_only is the way out only if the two meet on IPv4 alone.
            partner = theirs if dual is entry else mine
            if _overlap((_scopes(dual) or set()) - {"v4"}, partner):
                dual = None
        hint = (
            f"{dual.address} serves IPv4 too: set ipv6_only: true on it"
            if dual is not None
            else "a wildcard address covers every address of its family"
        )
        return f"overlaps item {index + 1} {show_value(other.address)}", hint
    return None


# -- tcp_keepalive -----------------------------------------------------------------------------

#: Linux's bounds for TCP_KEEPIDLE and TCP_KEEPINTVL (seconds), and TCP_KEEPCNT.
KEEPALIVE_SECONDS_MAX = 32767
KEEPALIVE_COUNT_MAX = 127


@dataclass(frozen=True, slots=True)
class Keepalive:
    """TCP keepalive on every connection: off, or on with ``idle`` seconds of silence before
    the first probe, ``interval`` seconds between probes and ``count`` probes unanswered
    before the connection is dropped (None: the kernel's ``net.ipv4.tcp_keepalive_*``)."""

    enabled: bool = False
    idle: int | None = None
    interval: int | None = None
    count: int | None = None

    def __str__(self) -> str:
        if not self.enabled:
            return "off"
        parts = [f"{k} {v}" for k, v in self.timings().items() if v is not None]
        return "on (" + (", ".join(parts) or "the kernel's timings") + ")"

    def timings(self) -> dict[str, int | None]:
        return {"idle": self.idle, "interval": self.interval, "count": self.count}


KEEPALIVE_FIELDS: tuple[Setting, ...] = (
    Setting(
        "idle",
        "int",
        None,
        "Seconds of silence before the first probe.",
        minimum=1,
        maximum=KEEPALIVE_SECONDS_MAX,
    ),
    Setting(
        "interval",
        "int",
        None,
        "Seconds between probes.",
        minimum=1,
        maximum=KEEPALIVE_SECONDS_MAX,
    ),
    Setting(
        "count",
        "int",
        None,
        "Probes unanswered before the connection is dropped.",
        minimum=1,
        maximum=KEEPALIVE_COUNT_MAX,
    ),
)


def check_keepalive(value: object) -> Keepalive:
    """``false``, ``true``, or a mapping of :data:`KEEPALIVE_FIELDS` (keepalive on)."""
    if isinstance(value, Keepalive):
        return value
    if isinstance(value, bool):
        return Keepalive(value)
    if not isinstance(value, dict):
        raise InvalidValueError(f"is {_describe(value)}, not a boolean or a mapping")
    fields = check_fields(value, KEEPALIVE_FIELDS)
    return Keepalive(
        True,
        **{name: v if isinstance(v, int) else None for name, v in fields.items()},
    )
