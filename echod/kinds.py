"""What a setting may hold: the ``Setting`` row, and the check and the rule of each kind.

A ``Setting`` names one setting and declares its kind (``int``, ``host``, ``networks`` ...),
default, bounds and one-line doc; ``Setting.convert`` checks a value YAML gave against the
kind, strictly (``true`` is not 1), and ``Setting.rule`` says in words what the kind accepts.
A new kind of value is a new ``Kind``, its check below, and a branch in ``rule`` and
``convert``. The table of the settings themselves is ``echod.settings``.
"""

from __future__ import annotations

import difflib
import grp
import ipaddress
import math
import os
import re
from dataclasses import dataclass
from datetime import date
from typing import Any, Literal, TypeVar

Kind = Literal["int", "number", "bool", "choice", "host", "path", "networks", "endpoint", "group"]
_N = TypeVar("_N", int, float)


class InvalidValueError(ValueError):
    """A value broke its setting's rule; the loader adds where it was written."""

    def __init__(self, problem: str, hint: str = "") -> None:
        super().__init__(problem)
        self.problem = problem
        self.hint = hint


@dataclass(frozen=True)
class Setting:
    """One row of the table: a setting's name, kind, default, rule and one-line doc.

    ``name`` is dotted for settings inside a section (``log.level``). ``minimum`` and
    ``maximum`` bound ``int`` and ``number`` kinds (``above`` makes the minimum exclusive);
    ``also_zero`` admits 0 besides the range; ``nullable`` admits ``null``.
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
            return "one of " + ", ".join(self.choices)
        if self.kind == "host":
            return "an IP address or a host name"
        if self.kind == "networks":
            return "a list of IP addresses and CIDR blocks (IPv4 or IPv6)"
        if self.kind == "endpoint":
            return 'an address and port as "host:port" ("[::1]:port" for IPv6)'
        if self.kind == "group":
            return "a group of this machine, by name or number"
        return "an absolute path"

    @property
    def expects(self) -> str:
        """The type expected, with its article, as in "is a string, not an integer"."""
        return {
            "int": "an integer",
            "number": "a number",
            "bool": "a boolean",
            "networks": "a list",
            "group": "a group name or number",
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
        if self.kind == "networks":
            return _check_networks(value)
        if self.kind == "group":
            return _check_group(value, self._mismatch)
        if not isinstance(value, str):
            raise self._mismatch(value)
        if self.kind == "choice":
            return self._choice(value)
        if self.kind == "host":
            return _check_host(value)
        if self.kind == "endpoint":
            return _check_endpoint(value)
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
_GROUP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?")


def _check_group(value: object, mismatch: Any) -> str:
    """A group of this machine, by name or number (given as a YAML integer or string);
    kept as given."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise mismatch(value)
    text = str(value)
    try:
        if text.isdigit():
            grp.getgrgid(int(text))
        elif _GROUP_NAME.fullmatch(text):
            grp.getgrnam(text)
        else:
            raise InvalidValueError("is not a group name or number")
    except (KeyError, OverflowError):
        raise InvalidValueError("is not a group on this machine") from None
    return text


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
