"""Every echod setting, declared once, and the loading of the YAML file that sets them.

``SETTINGS`` is the single table: name, kind, default, bounds and a one-line doc per setting.
Validation, the embedded defaults, ``dump_config`` and the generated files (the shipped
``config/echod.yaml``, the README reference and echod.yaml(5), see ``echod.docgen``) all
derive from it.

Methods for the caller: ``resolve_config_path`` (where to look), ``load_config`` (read and
validate a file and its drop-ins, or take the defaults), ``read_config`` (the same, with the
files read and where each setting came from), ``dump_config`` (the effective configuration as
YAML). The main file ``/etc/echod.yaml`` is merged with the drop-ins ``/etc/echod.d/*.yaml``
(in general: the main path without ``.yaml``, plus ``.d``), setting by setting, in name order.
Every problem with the input, whether the file cannot be read, is not YAML, or holds a bad
setting, raises ``ConfigError``, whose one-line message names the file, line and column, the
setting, the bad value and the rule.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from datetime import date
from typing import Any, Final, Literal, TypeVar

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from echod import exitcodes
from echod.errors import OperatorError

MODES: tuple[str, ...] = ("thread", "process", "async")
DEFAULT_PATH = "/etc/echod.yaml"
#: The environment variable naming the configuration file when ``--config`` is not given.
ENV_VAR = "ECHOD_CONFIG"
#: The environment variable that overrides the ``pidfile`` setting (echod@.service sets it).
PIDFILE_ENV_VAR = "ECHOD_PIDFILE"
#: A configuration file is small; the cap keeps ``--config /dev/zero`` from eating memory.
MAX_FILE_SIZE = 1024 * 1024

# libyaml is faster; the pure-Python loader gives the same nodes and marks where it is missing.
_LOADER: type[yaml.SafeLoader] | type[yaml.CSafeLoader] = getattr(
    yaml, "CSafeLoader", yaml.SafeLoader
)

Kind = Literal["int", "number", "bool", "choice", "host", "path", "networks", "endpoint"]
_N = TypeVar("_N", int, float)


@dataclass(frozen=True, slots=True)
class LogConfig:
    """The ``log:`` section: how and where echod writes its structured logs."""

    format: str
    target: str
    file: str | None
    level: str
    connections: bool


@dataclass(frozen=True, slots=True)
class Config:
    """The validated configuration; built only by ``load_config`` and ``default_config``."""

    mode: str
    host: str
    port: int
    backlog: int
    workers: int
    max_connections: int
    max_connections_per_ip: int
    connection_rate: float
    overload: str
    buffer_size: int
    idle_timeout: float
    write_timeout: float
    shutdown_timeout: float
    drain_delay: float
    worker_timeout: float
    crash_limit: int
    crash_window: float
    pidfile: str | None
    udp: bool
    udp_rate: float
    thread_stack_size: int
    spare_threads: int
    spare_processes: int
    allow: tuple[str, ...]
    deny: tuple[str, ...]
    proxy_protocol: str
    proxy_trusted: tuple[str, ...]
    proxy_timeout: float
    metrics: str | None
    log: LogConfig


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
        return "an absolute path"

    @property
    def expects(self) -> str:
        """The type expected, with its article, as in "is a string, not an integer"."""
        return {
            "int": "an integer",
            "number": "a number",
            "bool": "a boolean",
            "networks": "a list",
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


def _check_network(item: object) -> str:
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
            networks.append(_check_network(item))
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


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "mode",
        "choice",
        "thread",
        "How connections are served: a thread each, a process each, or an event loop.",
        choices=MODES,
    ),
    Setting(
        "host",
        "host",
        "127.0.0.1",
        'Address to listen on; the default, loopback, exposes nothing; "::" serves IPv6 and IPv4.',
    ),
    Setting(
        "port",
        "int",
        9999,
        "TCP port to listen on; 0 takes a free port (the ready event logs the one bound).",
        minimum=0,
        maximum=65535,
    ),
    Setting(
        "backlog",
        "int",
        128,
        "Length of the kernel's queue of connections not yet accepted.",
        minimum=1,
        maximum=65535,
    ),
    Setting(
        "workers",
        "int",
        1,
        "Number of worker processes that accept and serve connections.",
        minimum=1,
        maximum=256,
    ),
    Setting(
        "max_connections",
        "int",
        1024,
        "Connections served at once, in total, split across workers; past it clients wait.",
        minimum=1,
        maximum=1_000_000,
    ),
    Setting(
        "max_connections_per_ip",
        "int",
        0,
        "Connections at once from one address in all workers (races may add workers-1); "
        "0 means no limit.",
        minimum=0,
        maximum=1_000_000,
    ),
    Setting(
        "connection_rate",
        "number",
        0.0,
        "New connections accepted per second by each worker; 0 means no limit.",
        minimum=0,
    ),
    Setting(
        "overload",
        "choice",
        "wait",
        "At max_connections: wait (leave new clients in the backlog) or refuse (close them).",
        choices=("wait", "refuse"),
    ),
    Setting(
        "buffer_size",
        "int",
        65536,
        "Most bytes read from a connection at a time.",
        minimum=1,
        maximum=16 * 1024 * 1024,
    ),
    Setting(
        "idle_timeout",
        "number",
        300.0,
        "Seconds a connection may stay silent before it is closed; 0 means never.",
        minimum=0,
    ),
    Setting(
        "write_timeout",
        "number",
        30.0,
        "Seconds a write may stay blocked on a client that does not read; 0 means never.",
        minimum=0,
    ),
    Setting(
        "shutdown_timeout",
        "number",
        10.0,
        "Seconds open connections get to finish after SIGTERM or SIGINT before they are cut.",
        minimum=0,
    ),
    Setting(
        "drain_delay",
        "number",
        0.0,
        "Seconds echod goes on accepting after SIGTERM while /healthz says 503 (draining).",
        minimum=0,
    ),
    Setting(
        "worker_timeout",
        "number",
        30.0,
        "Seconds a worker may stay unresponsive before the supervisor replaces it.",
        minimum=0,
        above=True,
    ),
    Setting(
        "crash_limit",
        "int",
        5,
        "Worker failures within crash_window that stop the daemon instead of a restart.",
        minimum=1,
        maximum=1000,
    ),
    Setting(
        "crash_window",
        "number",
        60.0,
        "Seconds over which worker failures are counted against crash_limit.",
        minimum=0,
        above=True,
    ),
    Setting(
        "pidfile",
        "path",
        "/run/echod/echod.pid",
        "File that holds the daemon's process id; null for none.",
        nullable=True,
    ),
    Setting(
        "udp",
        "bool",
        False,
        "Also serve UDP echo on the same host and port.",
    ),
    Setting(
        "udp_rate",
        "number",
        100.0,
        "UDP datagrams echoed per second to one source address; 0 means no limit.",
        minimum=0,
    ),
    Setting(
        "thread_stack_size",
        "int",
        0,
        "Stack size in bytes of the threads that serve connections; 0 is the system default.",
        minimum=32768,
        maximum=64 * 1024 * 1024,
        also_zero=True,
    ),
    Setting(
        "spare_threads",
        "int",
        0,
        "Thread mode: up to this many threads kept to serve later connections; 0: one each.",
        minimum=0,
        maximum=100_000,
    ),
    Setting(
        "spare_processes",
        "int",
        0,
        "Process mode: up to this many processes per worker kept for later connections; 0: none.",
        minimum=0,
        maximum=10_000,
    ),
    Setting(
        "allow",
        "networks",
        (),
        "Clients allowed (TCP and UDP, after PROXY); empty allows all not in deny.",
    ),
    Setting(
        "deny",
        "networks",
        (),
        "Clients refused before a byte is echoed; deny wins over allow.",
    ),
    Setting(
        "proxy_protocol",
        "choice",
        "off",
        "Read a PROXY protocol header (v1 text, v2 binary, or any) first on each connection.",
        choices=("off", "v1", "v2", "any"),
    ),
    Setting(
        "proxy_trusted",
        "networks",
        (),
        "Load balancers allowed to send a PROXY header; others are closed unechoed.",
    ),
    Setting(
        "proxy_timeout",
        "number",
        3.0,
        "Seconds a connection has to send its whole PROXY header before it is closed.",
        minimum=0,
        above=True,
    ),
    Setting(
        "metrics",
        "endpoint",
        None,
        '"host:port" where the supervisor serves /metrics and /healthz; null for none.',
        nullable=True,
    ),
    Setting(
        "log.format",
        "choice",
        "auto",
        "Log line format: json, console (readable), or auto (console on a terminal, else json).",
        choices=("auto", "json", "console"),
    ),
    Setting(
        "log.target",
        "choice",
        "auto",
        "Where logs go; auto is log.file if set, else the journal under systemd, else stdout.",
        choices=("auto", "stdout", "stderr", "file", "journal"),
    ),
    Setting(
        "log.file",
        "path",
        None,
        "Log file, written when log.target is file or auto; null for none.",
        nullable=True,
    ),
    Setting(
        "log.level",
        "choice",
        "info",
        "Lowest level of the events that are logged.",
        choices=("debug", "info", "warning", "error"),
    ),
    Setting(
        "log.connections",
        "bool",
        True,
        "Log an event when each connection opens and when it closes.",
    ),
)

#: The one-line description of each section, for the docs and error messages.
SECTIONS: Mapping[str, str] = {"log": "How and where echod writes its structured logs."}

_BY_NAME: Final[Mapping[str, Setting]] = {s.name: s for s in SETTINGS}


class _Missing:
    """Marks an error that carries no value (a syntax error, an unreadable file)."""

    def __repr__(self) -> str:
        return "<no value>"


_NO_VALUE: Final = _Missing()


class ConfigError(OperatorError):
    """A configuration that cannot be used; ``str()`` is one line fit for an operator.

    Attributes: ``path``; ``line`` and ``column`` (1-based, or None); ``key`` (dotted, or
    None); ``value`` (when ``has_value``); ``rule`` (what was expected, may be empty).
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        column: int | None = None,
        key: str | None = None,
        value: object = _NO_VALUE,
        rule: str = "",
    ) -> None:
        super().__init__(message, exitcodes.EX_CONFIG)
        self.path = path
        self.line = line
        self.column = column
        self.key = key
        self.has_value = value is not _NO_VALUE
        self.value = value if self.has_value else None
        self.rule = rule

    def __str__(self) -> str:
        parts = [self.path or "<config>"]
        if self.line is not None:
            parts.append(str(self.line))
            if self.column is not None:
                parts.append(str(self.column))
        text = ": ".join([":".join(parts), self.message])
        return " ".join(text.splitlines())


def _at(path: str, node: Node) -> dict[str, Any]:
    """The location keywords of a ConfigError for something written at ``node``."""
    mark = node.start_mark
    return {"path": path, "line": mark.line + 1, "column": mark.column + 1}


def _origin(path: str, node: Node) -> Origin:
    mark = node.start_mark
    return Origin(path, mark.line + 1, mark.column + 1)


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


def _value_error(
    path: str, node: Node, setting: Setting, value: object, bad: InvalidValueError
) -> ConfigError:
    rule = setting.rule + (f"; {bad.hint}" if bad.hint else "")
    return ConfigError(
        f"{setting.name}: {show_value(value)} {bad.problem} ({rule})",
        key=setting.name,
        value=value,
        rule=setting.rule,
        **_at(path, node),
    )


def default_config() -> Config:
    """The configuration used when no file is given: every setting at its default."""
    return _build({s.name: s.default for s in SETTINGS})


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a setting's effective value was written: a file and a position in it.

    ``path`` is a file, or ``$ECHOD_PIDFILE`` for the pidfile given by the environment
    (``line`` and ``column`` are then None).
    """

    path: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        return self.path if self.line is None else f"{self.path}:{self.line}"

    def location(self) -> dict[str, Any]:
        """The location keywords of a ConfigError for a value written here."""
        return {"path": self.path, "line": self.line, "column": self.column}


@dataclass(frozen=True)
class LoadedConfig:
    """A validated configuration together with where its settings came from.

    ``path`` is the main file named (None: only the embedded defaults); ``files`` every file
    read, in the order they were merged (the main file first when it exists, then its
    drop-ins); ``empty`` those of them that set nothing; ``origins`` maps each setting a
    file (or the environment) set to where its effective value was written. A setting
    missing from ``origins`` is at its default.
    """

    config: Config
    path: str | None = None
    files: tuple[str, ...] = ()
    empty: tuple[str, ...] = ()
    origins: Mapping[str, Origin] = field(default_factory=dict)


def dropin_dir(path: str) -> str:
    """The drop-in directory of a main file: its path without ``.yaml``, plus ``.d``.

    ``/etc/echod.yaml`` has ``/etc/echod.d``; ``/etc/echod/web.yaml`` has ``/etc/echod/web.d``.
    """
    return path.removesuffix(".yaml") + ".d"


def is_dropin_name(name: str) -> bool:
    """Whether a file in a drop-in directory is read: ``*.yaml``, not hidden.

    Editor backups (``10-port.yaml~``, ``.10-port.yaml.swp``) and dpkg's leftovers
    (``.dpkg-dist``, ``.dpkg-old``, ``.dpkg-new``) do not end in ``.yaml`` and are ignored.
    """
    return name.endswith(".yaml") and not name.startswith(".") and name != ".yaml"


def dropin_files(directory: str) -> list[str]:
    """The drop-ins of ``directory`` in the order they are merged (by name); [] if it is absent."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as error:
        raise ConfigError(
            f"cannot read the drop-in directory: {error.strerror or error}", path=directory
        ) from None
    except ValueError as error:  # an embedded NUL in the path
        raise ConfigError(f"cannot read: {error}", path=directory) from None
    # Byte order, not the locale's: the same order on every machine, as systemd's drop-ins.
    return [os.path.join(directory, name) for name in sorted(names) if is_dropin_name(name)]


def resolve_config_path(
    cli_path: str | None, environ: Mapping[str, str], *, default_path: str = DEFAULT_PATH
) -> str | None:
    """Which file to read: ``--config``, else ``$ECHOD_CONFIG``, else the default if it exists.

    The default counts as existing when its drop-in directory does, even if the file itself
    does not. None means no file: use the embedded defaults. A default path that exists but
    is not a readable file is returned all the same, so that the operator hears about it.
    """
    if cli_path is not None:
        return cli_path
    from_env = environ.get(ENV_VAR, "")
    if from_env:
        return from_env
    if os.path.lexists(default_path) or os.path.lexists(dropin_dir(default_path)):
        return default_path
    return None


def load_config(path: str | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate ``path`` and its drop-ins; None gives the embedded defaults.

    The same as ``read_config(path, environ).config``. Raises ``ConfigError`` for every
    problem with the files, never anything else.
    """
    return read_config(path, environ).config


def read_config(path: str | None, environ: Mapping[str, str] | None = None) -> LoadedConfig:
    """Read and validate the main file ``path`` and the drop-ins beside it.

    Each file is validated on its own (an error names the file and line of the bad value);
    then the drop-ins (``dropin_files(dropin_dir(path))``) are merged over the main file in
    name order, setting by setting, a later file winning; then the rules that span settings
    are checked on the result. A main file that does not exist is skipped when its drop-in
    directory exists (the defaults, then the drop-ins); otherwise it is an error. A file that
    sets nothing is valid. ``$ECHOD_PIDFILE`` (``PIDFILE_ENV_VAR``) in ``environ`` (default
    ``os.environ``), when not empty, overrides the ``pidfile`` setting: echod@.service sets
    it to give each instance its own. A ``path`` of None reads no file at all.
    """
    values: dict[str, object] = {s.name: s.default for s in SETTINGS}
    origins: dict[str, Origin] = {}
    files: list[str] = []
    if path is not None:
        if "\0" in path:  # os.path would take it for a missing file, open() raises ValueError
            raise ConfigError("cannot read: embedded null byte", path=path)
        directory = dropin_dir(path)
        main = [] if not os.path.lexists(path) and os.path.isdir(directory) else [path]
        files = main + dropin_files(directory)
    empty = []
    for name in files:
        found, where = _parse_file(_read_text(name), name)
        values.update(found)
        origins.update(where)
        if not found:
            empty.append(name)
    _override_pidfile(values, origins, os.environ if environ is None else environ)
    _check_together(values, origins)
    return LoadedConfig(_build(values), path, tuple(files), tuple(empty), origins)


def _override_pidfile(
    values: dict[str, object], origins: dict[str, Origin], environ: Mapping[str, str]
) -> None:
    given = environ.get(PIDFILE_ENV_VAR, "")
    if not given:
        return
    setting = _BY_NAME["pidfile"]
    origin = Origin(f"${PIDFILE_ENV_VAR}")
    try:
        values["pidfile"] = setting.convert(given)
    except InvalidValueError as bad:
        raise ConfigError(
            f"pidfile: {show_value(given)} {bad.problem} ({setting.rule})",
            key=setting.name,
            value=given,
            rule=setting.rule,
            **origin.location(),
        ) from None
    origins["pidfile"] = origin


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_FILE_SIZE + 1)
    except OSError as error:
        raise ConfigError(f"cannot read: {error.strerror or error}", path=path) from None
    except ValueError as error:  # an embedded NUL in the path
        raise ConfigError(f"cannot read: {error}", path=path) from None
    if len(data) > MAX_FILE_SIZE:
        raise ConfigError(f"cannot read: larger than {MAX_FILE_SIZE} bytes", path=path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        before = data[: error.start]
        raise ConfigError(
            f"cannot read: not UTF-8 text (byte {data[error.start]:#04x})",
            path=path,
            line=before.count(b"\n") + 1,
            column=len(before) - (before.rfind(b"\n") + 1) + 1,
        ) from None


def parse_config(text: str, path: str = "<string>") -> Config:
    """Validate YAML ``text``, read from ``path`` (used only in messages), as a whole file.

    Text that sets nothing (empty, or only comments) gives the embedded defaults.
    """
    values, where = _parse_file(text, path)
    merged = {s.name: values.get(s.name, s.default) for s in SETTINGS}
    _check_together(merged, where)
    return _build(merged)


def _parse_file(text: str, path: str) -> tuple[dict[str, object], dict[str, Origin]]:
    """The settings one file sets, converted, and where each was written."""
    root = _compose(text, path)
    values: dict[str, object] = {}
    where: dict[str, Origin] = {}
    # Nothing but comments (or an explicit null document) sets nothing: all defaults.
    if root is None or (isinstance(root, ScalarNode) and root.tag.endswith(":null")):
        return values, where
    if not isinstance(root, MappingNode):
        raise ConfigError(
            f"the file holds {_node_kind(root)} where a mapping of settings belongs",
            rule="a mapping of settings",
            **_at(path, root),
        )
    _read_section(root, "", path, values, where)
    return values, where


def _compose(text: str, path: str) -> Node | None:
    try:
        return yaml.compose(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as error:
        raise _syntax_error(error, path) from None
    except yaml.reader.ReaderError as error:
        before = text[: error.position]
        raise ConfigError(
            f"syntax error: character {error.character:#x} is not allowed in YAML",
            path=path,
            line=before.count("\n") + 1,
            column=len(before) - (before.rfind("\n") + 1) + 1,
        ) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"syntax error: {error}", path=path) from None


def _syntax_error(error: yaml.MarkedYAMLError, path: str) -> ConfigError:
    mark = error.problem_mark or error.context_mark
    message = f"syntax error: {error.problem or error.context or 'not valid YAML'}"
    if error.problem and error.context:
        context_mark = error.context_mark
        if context_mark is not None and context_mark is not mark:
            message += (
                f" ({error.context} at line {context_mark.line + 1},"
                f" column {context_mark.column + 1})"
            )
        else:
            message += f" ({error.context})"
    if mark is None:
        return ConfigError(message, path=path)
    return ConfigError(message, path=path, line=mark.line + 1, column=mark.column + 1)


def _node_kind(node: Node) -> str:
    if isinstance(node, SequenceNode):
        return "a list"
    if isinstance(node, MappingNode):
        return "a mapping"
    return "a value"


def _section_names(section: str) -> list[str]:
    """The keys allowed directly in ``section``: its settings and sub-sections, in order."""
    names: list[str] = []
    depth = section.count(".") + 1 if section else 0
    for setting in SETTINGS:
        parts = setting.name.split(".")
        in_section = ".".join(parts[:depth]) == section and len(parts) > depth
        if in_section and parts[depth] not in names:
            names.append(parts[depth])
    return names


def _read_section(
    node: MappingNode, section: str, path: str, values: dict[str, object], where: dict[str, Origin]
) -> None:
    """Check every key of one mapping and convert its values into ``values``."""
    allowed = _section_names(section)
    seen: dict[str, Node] = {}
    for key_node, value_node in node.value:
        name = _key_name(key_node, section, path)
        dotted = f"{section}.{name}" if section else name
        if name in seen:
            first = seen[name].start_mark
            raise ConfigError(
                f"duplicate setting {dotted!r} (first set at line {first.line + 1},"
                f" column {first.column + 1})",
                key=dotted,
                rule="each setting at most once",
                **_at(path, key_node),
            )
        seen[name] = key_node
        if name not in allowed:
            raise _unknown(name, section, allowed, path, key_node)
        if dotted in _BY_NAME:
            values[dotted] = _read_value(_BY_NAME[dotted], value_node, path)
            where[dotted] = _origin(path, value_node)
        else:
            _read_subsection(value_node, dotted, path, values, where)


def _read_subsection(
    node: Node, section: str, path: str, values: dict[str, object], where: dict[str, Origin]
) -> None:
    # An empty section (every key in it commented out) means all its defaults.
    if isinstance(node, ScalarNode) and node.tag.endswith(":null"):
        return
    if not isinstance(node, MappingNode):
        what = show_value(_construct(node, path, section)) if isinstance(node, ScalarNode) else ""
        found = f"{what} is a value" if what else f"{_node_kind(node)} was found"
        rule = "a mapping with the keys " + ", ".join(_section_names(section))
        raise ConfigError(
            f"{section}: {found} where a mapping belongs ({rule})",
            key=section,
            rule=rule,
            **_at(path, node),
        )
    _read_section(node, section, path, values, where)


def _key_name(node: Node, section: str, path: str) -> str:
    if not isinstance(node, ScalarNode):
        raise ConfigError(
            f"{_node_kind(node)} was found where a setting name belongs",
            key=section or None,
            rule="setting names are plain words",
            **_at(path, node),
        )
    if node.tag == "tag:yaml.org,2002:merge":
        raise ConfigError(
            "merge keys ('<<') are not supported; write each setting out",
            key=section or None,
            rule="setting names are plain words",
            **_at(path, node),
        )
    return str(node.value)


def _unknown(name: str, section: str, allowed: list[str], path: str, node: Node) -> ConfigError:
    dotted = f"{section}.{name}" if section else name
    prefix = f"{section}." if section else ""
    close = [prefix + match for match in difflib.get_close_matches(name, allowed, n=1)]
    # A setting written in the wrong section: `level: debug` at the top means `log.level`.
    close = close or [s.name for s in SETTINGS if s.key == name and s.name != dotted][:1]
    hint = f"did you mean {close[0]!r}?" if close else "see echod.yaml(5) for the settings"
    return ConfigError(
        f"unknown setting {dotted!r} ({hint})",
        key=dotted,
        rule="only the settings of echod.yaml(5)",
        **_at(path, node),
    )


def _construct(node: ScalarNode, path: str, key: str) -> object:
    try:
        return SafeConstructor().construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, TypeError, ArithmeticError) as error:
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(
            f"{key}: cannot read the value: {problem}",
            key=key,
            rule="a plain YAML value",
            **_at(path, node),
        ) from None


def _read_value(setting: Setting, node: Node, path: str) -> object:
    if setting.kind == "networks" and isinstance(node, SequenceNode):
        return _read_list(setting, node, path)
    if not isinstance(node, ScalarNode):
        kind = _node_kind(node)
        raise ConfigError(
            f"{setting.name}: {kind} was found where {setting.expects} belongs ({setting.rule})",
            key=setting.name,
            rule=setting.rule,
            **_at(path, node),
        )
    value = _construct(node, path, setting.name)
    try:
        return setting.convert(value)
    except InvalidValueError as bad:
        raise _value_error(path, node, setting, value, bad) from None


def _read_list(setting: Setting, node: SequenceNode, path: str) -> object:
    """A list of plain values; an error points at the item that is wrong."""
    items: list[object] = []
    for item in node.value:
        if not isinstance(item, ScalarNode):
            raise ConfigError(
                f"{setting.name}: {_node_kind(item)} was found where a list item belongs"
                f" ({setting.rule})",
                key=setting.name,
                rule=setting.rule,
                **_at(path, item),
            )
        value = _construct(item, path, setting.name)
        try:
            items.append(_check_network(value))
        except InvalidValueError as bad:
            raise _value_error(path, item, setting, value, bad) from None
    return setting.convert(items)


def _check_together(values: Mapping[str, object], where: Mapping[str, Origin]) -> None:
    """Rules that span settings; each is reported where the operator wrote the deciding value.

    ``values`` is the merged result of every file; ``where`` says which file set what.
    """
    if values["log.target"] == "file" and values["log.file"] is None:
        setting = _BY_NAME["log.target"]
        raise ConfigError(
            "log.target: 'file' needs log.file to name the file (set log.file to a path)",
            key=setting.name,
            value="file",
            rule="log.file set when log.target is file",
            **where["log.target"].location(),
        )
    if values["proxy_protocol"] != "off" and not values["proxy_trusted"]:
        raise ConfigError(
            f"proxy_protocol: {values['proxy_protocol']!r} needs proxy_trusted to list the"
            " load balancers allowed to send the header",
            key="proxy_protocol",
            value=values["proxy_protocol"],
            rule="proxy_trusted not empty when proxy_protocol is on",
            **where["proxy_protocol"].location(),
        )
    workers, total = values["workers"], values["max_connections"]
    assert isinstance(workers, int) and isinstance(total, int)
    if total < workers:
        # Point at max_connections when a file sets it: it is the usual culprit.
        if "max_connections" in where:
            name, shown, problem = "max_connections", total, f"is less than workers ({workers})"
        else:
            name, shown, problem = "workers", workers, f"is more than max_connections ({total})"
        raise ConfigError(
            f"{name}: {shown} {problem} (max_connections >= workers: it is split across"
            " the workers, each needs at least one)",
            key=name,
            value=shown,
            rule="max_connections >= workers",
            **where[name].location(),
        )


def _build(values: Mapping[str, Any]) -> Config:
    log = {name.removeprefix("log."): v for name, v in values.items() if name.startswith("log.")}
    top = {name: v for name, v in values.items() if "." not in name}
    return Config(**top, log=LogConfig(**log))


def config_values(cfg: Config) -> dict[str, object]:
    """Every setting's value in ``cfg``, by dotted name, in table order."""
    values: dict[str, object] = {}
    for setting in SETTINGS:
        value: object = cfg
        for part in setting.name.split("."):
            value = getattr(value, part)
        values[setting.name] = value
    return values


def yaml_scalar(value: object) -> str:
    """Write one setting's value as YAML that loads back to the same value and type."""
    if value is None:
        return "null"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(yaml_scalar(item) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        text = repr(value)
        # YAML 1.1 (PyYAML) reads 1e-07 as a string: its floats need a dot.
        mantissa, e, exponent = text.partition("e")
        if e and "." not in mantissa:
            text = f"{mantissa}.0e{exponent if exponent[0] in '+-' else '+' + exponent}"
        return text
    text = str(value)
    if re.fullmatch(r"[A-Za-z_/][A-Za-z0-9_./-]*", text) and _resolves_to_str(text):
        return text
    # A double-quoted JSON string is a valid YAML double-quoted scalar.
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _resolves_to_str(text: str) -> bool:
    """Whether a plain scalar stays a string (``yes``, ``null`` and ``on`` do not)."""
    resolve: Any = yaml.resolver.Resolver().resolve  # untyped in the stubs
    return bool(resolve(ScalarNode, text, (True, False)) == "tag:yaml.org,2002:str")


def iter_yaml_lines(
    values: Mapping[str, object],
    *,
    docs: bool,
    commented: bool = False,
    notes: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """The settings as YAML lines in table order; with ``docs``, each after its doc comment.

    ``commented`` writes every setting and section line commented out (``#port: 9999``,
    ``#  level: info`` under ``#log:``), so that the text sets nothing and removing one
    ``#`` sets that value. ``notes`` adds a trailing comment to the line of a setting.
    """
    mark = "#" if commented else ""
    notes = notes or {}
    open_sections: list[str] = []
    for setting in SETTINGS:
        parts = setting.name.split(".")
        sections = parts[:-1]
        common = 0
        while common < min(len(sections), len(open_sections)) and (
            sections[common] == open_sections[common]
        ):
            common += 1
        for depth in range(common, len(sections)):
            indent = "  " * depth
            if docs:
                yield ""
                yield f"{indent}# {SECTIONS.get('.'.join(sections[: depth + 1]), '')}".rstrip()
            yield f"{indent}{mark}{sections[depth]}:"
        open_sections = sections
        indent = "  " * len(sections)
        if docs:
            yield ""
            yield f"{indent}# {setting.doc}"
            yield f"{indent}# Allowed: {setting.rule}."
        line = f"{indent}{mark}{setting.key}: {yaml_scalar(values[setting.name])}"
        note = notes.get(setting.name)
        yield f"{line}  # {_one_line(note)}" if note else line


def _one_line(text: str) -> str:
    """A comment's text without line breaks (a file name may hold any character)."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def dump_config(cfg: Config, origins: Mapping[str, Origin] | None = None) -> str:
    """The effective configuration as YAML (what ``echod check-config`` prints).

    With ``origins``, each setting found there ends with a comment naming where it was set
    (``port: 7  # from /etc/echod.d/10-port.yaml:1``); the text still loads to ``cfg``.
    """
    notes = {name: f"from {origin}" for name, origin in (origins or {}).items()}
    return "\n".join(iter_yaml_lines(config_values(cfg), docs=False, notes=notes)) + "\n"


def _check_table() -> None:
    """The table and the dataclasses name the same settings in the same order."""
    top = [s.name for s in SETTINGS if "." not in s.name]
    log = [s.key for s in SETTINGS if s.section == "log"]
    if top != [f.name for f in fields(Config) if f.name != "log"]:
        raise AssertionError("SETTINGS and Config disagree")
    if log != [f.name for f in fields(LogConfig)]:
        raise AssertionError("SETTINGS and LogConfig disagree")


_check_table()
