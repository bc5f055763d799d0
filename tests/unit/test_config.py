"""The settings table, YAML loading, validation and the error messages of echod.config."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

from echod import config, configparse
from echod.config import (
    DEFAULT_PATH,
    MODES,
    SETTINGS,
    Config,
    ConfigError,
    LogConfig,
    default_config,
    dump_config,
    load_config,
    parse_config,
    resolve_config_path,
    split_endpoint,
)
from echod.kinds import Keepalive

LOADERS = [yaml.SafeLoader] + ([yaml.CSafeLoader] if hasattr(yaml, "CSafeLoader") else [])


@pytest.fixture(params=LOADERS, ids=lambda loader: loader.__name__)
def loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> type:
    """Run a test under libyaml's loader and under the pure-Python one."""
    monkeypatch.setattr(configparse, "_LOADER", request.param)
    return request.param  # type: ignore[no-any-return]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "echod.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def error_for(tmp_path: Path, text: str) -> tuple[str, ConfigError]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return path, caught.value


class Bad(NamedTuple):
    """A bad file, where its error is, and what the message must say."""

    text: str
    line: int
    column: int
    key: str | None
    shown: str | None  # the bad value as the message shows it
    words: list[str]


BAD_SETTINGS = [
    Bad("prot: 1\n", 1, 1, "prot", None, ["unknown setting 'prot'", "did you mean 'port'?"]),
    Bad('port: "abc"\n', 1, 7, "port", "'abc'", ["is a string, not an integer", "0 to 65535"]),
    Bad('port: "9999"\n', 1, 7, "port", "'9999'", ["is a string, not an integer"]),
    Bad("port: true\n", 1, 7, "port", "true", ["is a boolean, not an integer", "0 to 65535"]),
    Bad("port: 70000\n", 1, 7, "port", "70000", ["out of range", "an integer from 0 to 65535"]),
    Bad("backlog: -1\n", 1, 10, "backlog", "-1", ["out of range", "an integer from 1 to 65535"]),
    Bad("mode: fork\n", 1, 7, "mode", "'fork'", ["one of thread, process, async"]),
    Bad("mode: treads\n", 1, 7, "mode", "'treads'", ["did you mean 'thread'?"]),
    Bad("workers: 2.0\n", 1, 10, "workers", "2.0", ["a decimal number, not an integer"]),
    Bad("idle_timeout: true\n", 1, 15, "idle_timeout", "true", ["a boolean, not a number"]),
    Bad("idle_timeout: .inf\n", 1, 15, "idle_timeout", ".inf", ["not a finite number"]),
    Bad("idle_timeout: " + "9" * 400 + "\n", 1, 15, "idle_timeout", None, ["out of range"]),
    Bad("idle_timeout: -1\n", 1, 15, "idle_timeout", "-1", ["out of range", "a number >= 0"]),
    Bad("udp: 1\n", 1, 6, "udp", "1", ["an integer, not a boolean", "true or false"]),
    Bad("udp: 'yes'\n", 1, 6, "udp", "'yes'", ["a string, not a boolean"]),
    Bad("port:\n", 1, 6, "port", "null", ["is not allowed", "0 to 65535"]),
    Bad("port: [1, 2]\n", 1, 7, "port", None, ["a list was found where an integer belongs"]),
    Bad("host: exa mple\n", 1, 7, "host", "'exa mple'", ["an IP address or a host name"]),
    Bad("host: 999.1.1.1\n", 1, 7, "host", "'999.1.1.1'", ["an IP address or a host name"]),
    Bad('host: "[::1]"\n', 1, 7, "host", "'[::1]'", ["without brackets"]),
    Bad("pidfile: run/echod.pid\n", 1, 10, "pidfile", "'run/echod.pid'", ["an absolute path"]),
    Bad("pidfile: ''\n", 1, 10, "pidfile", "''", ["is empty", "an absolute path, or null"]),
    Bad("thread_stack_size: 4096\n", 1, 20, "thread_stack_size", "4096", ["0, or an integer"]),
    Bad("crash_window: 0\n", 1, 15, "crash_window", "0", ["out of range", "a number > 0"]),
    Bad("worker_timeout: 0\n", 1, 17, "worker_timeout", "0", ["out of range", "a number > 0"]),
    Bad("log:\n  levle: debug\n", 2, 3, "log.levle", None, ["did you mean 'log.level'?"]),
    Bad("log:\n  level: loud\n", 2, 10, "log.level", "'loud'", ["one of debug, info"]),
    Bad("log:\n  target: file\n", 2, 11, "log.target", "'file'", ["needs log.file"]),
    Bad("log: [json]\n", 1, 6, "log", None, ["a list was found where a mapping belongs"]),
    Bad("log: json\n", 1, 6, "log", "'json'", ["where a mapping belongs", "format, target"]),
    Bad("level: debug\n", 1, 1, "level", None, ["did you mean 'log.level'?"]),
    Bad(
        "port: 1\nhost: ::1\nport: 2\n", 3, 1, "port", None, ["duplicate setting 'port'", "line 1"]
    ),
    Bad("log:\n  level: info\n  level: debug\n", 3, 3, "log.level", None, ["duplicate"]),
    Bad("workers: 4\nmax_connections: 2\n", 2, 18, "max_connections", "2", ["less than workers"]),
    Bad("workers: 2000\n", 1, 10, "workers", "2000", ["an integer from 1 to 256"]),
    Bad("port: !!int x\n", 1, 7, "port", None, ["cannot read the value"]),
    Bad("port: !custom 1\n", 1, 7, "port", None, ["cannot read the value", "!custom"]),
    Bad("<<: {port: 1}\n", 1, 1, None, None, ["merge keys"]),
]


@pytest.mark.parametrize("bad", BAD_SETTINGS, ids=lambda bad: bad.text.replace("\n", "|"))
def test_bad_setting_message_names_everything(tmp_path: Path, loader: type, bad: Bad) -> None:
    """A bad setting's one-line message names the file, line, column, key, value and rule."""
    path, error = error_for(tmp_path, bad.text)
    message = str(error)
    assert message.startswith(f"{path}:{bad.line}:{bad.column}: "), message
    assert "\n" not in message
    assert (error.path, error.line, error.column, error.key) == (
        path,
        bad.line,
        bad.column,
        bad.key,
    )
    if bad.key is not None:
        assert bad.key in message
    if bad.shown is not None:
        assert f"{bad.key}: {bad.shown} " in message
    for word in bad.words:
        assert word in message, message


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ("port: [1, 2\n", None, None),
        ("port: 'abc\n", 2, 1),
        ("\tport: 1\n", 1, 1),
        ("port: 1\n---\nport: 2\n", 2, 1),
        ("port: 1\n  host: x\n", 2, 7),
        ("port: *nowhere\n", 1, 7),
        ('host: "a\x00b"\n', 1, 9),
    ],
)
def test_yaml_syntax_error_has_location(
    tmp_path: Path, loader: type, text: str, line: int | None, column: int | None
) -> None:
    """A YAML syntax error is reported as one line with the file, line and column."""
    path, error = error_for(tmp_path, text)
    message = str(error)
    assert "\n" not in message
    assert error.line is not None
    assert error.column is not None
    assert message.startswith(f"{path}:{error.line}:{error.column}: syntax error: "), message
    # libyaml and the pure-Python parser place an unclosed list on different lines.
    if line is not None:
        assert (error.line, error.column) == (line, column)
    assert not error.has_value


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n", "null\n", "~\n"])
def test_empty_file_means_defaults(tmp_path: Path, loader: type, text: str) -> None:
    """A file that sets nothing (empty, comments, a null document) is valid: all defaults."""
    assert load_config(write(tmp_path, text)) == default_config()


@pytest.mark.parametrize(("text", "what"), [("- port: 1\n", "a list"), ("port 9999\n", "a value")])
def test_top_level_must_be_a_mapping(tmp_path: Path, loader: type, text: str, what: str) -> None:
    """A list or a bare scalar where the mapping of settings belongs is an error at 1:1."""
    path, error = error_for(tmp_path, text)
    assert str(error) == (f"{path}:1:1: the file holds {what} where a mapping of settings belongs")


def test_mangled_files_raise_only_config_error(loader: type) -> None:
    """Randomly mangled copies of a full file give a one-line ConfigError or load, never crash."""
    base = dump_config(default_config())
    pieces = [*":-[]{}'\"!&*|>#%,?\t\n 09.e~", "\x00", "é", "true", "null", "!!int", "9" * 400]
    rng = random.Random(862)
    for _ in range(300):
        text = list(base)
        for _ in range(rng.randint(1, 4)):
            text.insert(rng.randrange(len(text)), rng.choice(pieces))
        try:
            parse_config("".join(text))
        except ConfigError as error:
            assert "\n" not in str(error)


def test_missing_file(tmp_path: Path) -> None:
    """A missing file is reported with the operating system's reason."""
    path = str(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: cannot read: No such file or directory"
    assert caught.value.line is None


def test_unreadable_file(tmp_path: Path) -> None:
    """A path that cannot be read as a file (root ignores modes, so: a directory) is an error."""
    with pytest.raises(ConfigError) as caught:
        load_config(str(tmp_path))
    assert str(caught.value) == f"{tmp_path}: cannot read: a directory, not a file"


def test_not_utf8(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 are reported with their position, not a UnicodeDecodeError."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"port: 1\nhost: caf\xe9\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert str(caught.value) == f"{path}:2:10: cannot read: not UTF-8 text (byte 0xe9)"


def test_oversized_file(tmp_path: Path) -> None:
    """A file far larger than any configuration is refused without reading it all."""
    path = tmp_path / "huge.yaml"
    path.write_bytes(b"#" * (config.MAX_FILE_SIZE + 1))
    with pytest.raises(ConfigError, match="larger than"):
        load_config(str(path))


def test_error_keeps_the_bad_value(tmp_path: Path) -> None:
    """ConfigError carries the key, the value as YAML gave it, and the rule."""
    _, error = error_for(tmp_path, "port: true\n")
    assert error.has_value
    assert error.value is True
    assert error.rule == "an integer from 0 to 65535"


def test_no_path_means_defaults() -> None:
    """load_config(None) returns the embedded defaults."""
    assert load_config(None) == default_config()


def test_absent_keys_take_defaults(tmp_path: Path, loader: type) -> None:
    """Settings left out of the file keep their defaults, inside log: too."""
    cfg = load_config(write(tmp_path, "port: 7\nlog:\n  level: debug\n"))
    expected = dataclasses.replace(
        default_config(),
        port=7,
        log=dataclasses.replace(default_config().log, level="debug"),
    )
    assert cfg == expected


def test_every_setting_can_be_set(tmp_path: Path, loader: type) -> None:
    """A file that sets every setting yields exactly those values, with the right types."""
    text = """\
mode: process
host: "::"
port: 0
backlog: 64
workers: 2
max_connections: 10
max_connections_per_ip: 3
connection_rate: 2.5
overload: refuse
buffer_size: 1024
idle_timeout: 0
write_timeout: 1.5
tcp_nodelay: false
tcp_keepalive: {idle: 60, interval: 10, count: 5}
shutdown_timeout: 0
drain_delay: 2.5
worker_timeout: 5
crash_limit: 3
crash_window: 10
pidfile: null
user: nobody
group: nogroup
udp: true
udp_rate: 0
thread_stack_size: 262144
spare_threads: 4
spare_processes: 8
allow: [10.0.0.0/8, "2001:db8::/32"]
deny:
  - 10.9.9.9
proxy_protocol: any
proxy_trusted: [127.0.0.1]
proxy_timeout: 0.5
metrics: "127.0.0.1:9107"
control_socket: /run/echod/ctl.sock
control_group: 0
retire_timeout: 60
max_connection_age: 3600
log:
  format: json
  target: file
  file: /var/log/echod.log
  level: warning
  connections: false
"""
    cfg = load_config(write(tmp_path, text))
    assert cfg == Config(
        mode="process",
        host="::",
        port=0,
        listen=(),
        backlog=64,
        workers=2,
        max_connections=10,
        max_connections_per_ip=3,
        connection_rate=2.5,
        overload="refuse",
        buffer_size=1024,
        idle_timeout=0.0,
        write_timeout=1.5,
        tcp_nodelay=False,
        tcp_keepalive=Keepalive(True, 60, 10, 5),
        shutdown_timeout=0.0,
        drain_delay=2.5,
        worker_timeout=5.0,
        crash_limit=3,
        crash_window=10.0,
        pidfile=None,
        user="nobody",
        group="nogroup",
        udp=True,
        udp_rate=0.0,
        thread_stack_size=262144,
        spare_threads=4,
        spare_processes=8,
        allow=("10.0.0.0/8", "2001:db8::/32"),
        deny=("10.9.9.9",),
        proxy_protocol="any",
        proxy_trusted=("127.0.0.1",),
        proxy_timeout=0.5,
        metrics="127.0.0.1:9107",
        control_socket="/run/echod/ctl.sock",
        control_group=0,
        retire_timeout=60.0,
        max_connection_age=3600.0,
        log=LogConfig(
            format="json",
            target="file",
            file="/var/log/echod.log",
            level="warning",
            connections="off",
        ),
    )
    assert isinstance(cfg.worker_timeout, float)
    assert isinstance(cfg.port, int)


def test_empty_log_section_means_defaults(tmp_path: Path) -> None:
    """A log: section whose keys are all commented out keeps every log default."""
    cfg = load_config(write(tmp_path, "port: 1\nlog:\n  # level: debug\n"))
    assert cfg.log == default_config().log


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "::", "::1", "0.0.0.0", "fe80::1%lo", "localhost", "echo.example.org.", "a-b.c"],
)
def test_valid_hosts(tmp_path: Path, host: str) -> None:
    """IP literals of both families and well-formed host names are accepted."""
    assert load_config(write(tmp_path, f'host: "{host}"\n')).host == host


@pytest.mark.parametrize(
    "host", ["", "-a.example", "a_b.example", "1.2.3", "256.0.0.1", "x" * 64, "a..b", " a"]
)
def test_invalid_hosts(tmp_path: Path, host: str) -> None:
    """Malformed addresses and host names are refused."""
    _, error = error_for(tmp_path, f'host: "{host}"\n')
    assert error.key == "host"
    assert "an IP address or a host name" in str(error)


def test_resolve_prefers_cli_path(tmp_path: Path) -> None:
    """--config wins over $ECHOD_CONFIG and the default file."""
    default = write(tmp_path, "port: 1\n")
    environ = {"ECHOD_CONFIG": "/env.yaml"}
    assert resolve_config_path("/cli.yaml", environ, default_path=default) == "/cli.yaml"


def test_resolve_uses_environment(tmp_path: Path) -> None:
    """Without --config, $ECHOD_CONFIG names the file, even over an existing default."""
    default = write(tmp_path, "port: 1\n")
    environ = {"ECHOD_CONFIG": "/env.yaml"}
    assert resolve_config_path(None, environ, default_path=default) == "/env.yaml"


def test_resolve_ignores_empty_environment(tmp_path: Path) -> None:
    """An empty $ECHOD_CONFIG counts as unset."""
    default = write(tmp_path, "port: 1\n")
    assert resolve_config_path(None, {"ECHOD_CONFIG": ""}, default_path=default) == default


def test_resolve_falls_back_to_defaults(tmp_path: Path) -> None:
    """With no --config, no $ECHOD_CONFIG and no default file, the embedded defaults apply."""
    absent = str(tmp_path / "absent.yaml")
    assert resolve_config_path(None, {}, default_path=absent) is None


def test_default_path() -> None:
    """The default file is /etc/echod.yaml."""
    assert DEFAULT_PATH == "/etc/echod.yaml"


def test_table_matches_dataclasses() -> None:
    """SETTINGS and the Config/LogConfig fields name the same settings in the same order."""
    names = [s.name for s in SETTINGS]
    top = [f.name for f in dataclasses.fields(Config) if f.name != "log"]
    log = ["log." + f.name for f in dataclasses.fields(LogConfig)]
    assert names == top + log


def test_defaults_obey_their_own_rules() -> None:
    """Every default passes its setting's validation unchanged."""
    for setting in SETTINGS:
        assert setting.convert(setting.default) == setting.default, setting.name


def test_docs_are_single_sentences() -> None:
    """Every setting has a one-line doc ending in a full stop, short enough for a comment."""
    for setting in SETTINGS:
        assert setting.doc.endswith("."), setting.name
        assert "\n" not in setting.doc
        assert len(setting.doc) <= 96, setting.name


def test_modes() -> None:
    """The mode setting offers exactly MODES, thread first as the default."""
    mode = next(s for s in SETTINGS if s.name == "mode")
    assert mode.choices == MODES
    assert default_config().mode == "thread"


def test_default_host_is_loopback() -> None:
    """A fresh install listens on loopback only, on port 9999."""
    cfg = default_config()
    assert (cfg.host, cfg.port) == ("127.0.0.1", 9999)


def test_integer_accepted_where_number_expected(tmp_path: Path) -> None:
    """An integer is fine for a number setting and is held as a float."""
    cfg = load_config(write(tmp_path, "idle_timeout: 5\n"))
    assert cfg.idle_timeout == 5.0
    assert isinstance(cfg.idle_timeout, float)


def test_dump_round_trips_defaults() -> None:
    """dump_config of the defaults loads back to the defaults."""
    assert parse_config(dump_config(default_config())) == default_config()


def test_dump_round_trips_custom(tmp_path: Path) -> None:
    """dump_config keeps every value and type of a non-default configuration."""
    cfg = dataclasses.replace(
        default_config(),
        host="::",
        connection_rate=1e-7,
        idle_timeout=0.25,
        pidfile=None,
        udp=True,
        log=LogConfig(
            format="json",
            target="file",
            file="/var/log/echod log.txt",
            level="debug",
            connections="off",
        ),
    )
    assert parse_config(dump_config(cfg)) == cfg


def test_dump_is_plain_yaml() -> None:
    """dump_config is YAML whose data mirrors the Config, with log: nested."""
    data = yaml.safe_load(dump_config(default_config()))
    assert data["port"] == 9999
    assert data["log"]["connections"] == "both"
    assert data["pidfile"] == "/run/echod/echod.pid"


@pytest.mark.parametrize(
    "value", [None, True, False, 0, 7, 0.5, 300.0, 1e-7, 1e20, "thread", "127.0.0.1", "yes", "::"]
)
def test_yaml_scalar_round_trips(value: object) -> None:
    """Each scalar is written so that YAML reads back the same value and type."""
    loaded = yaml.safe_load(f"v: {config.yaml_scalar(value)}")["v"]
    if isinstance(value, float) and value.is_integer():
        assert loaded == value
    else:
        assert (type(loaded), loaded) == (type(value), value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("port: 70000\n", "1:7: port: 70000 is out of range (an integer from 0 to 65535)"),
        ("prot: 1\n", "1:1: unknown setting 'prot' (did you mean 'port'?)"),
        (
            "port: true\n",
            "1:7: port: true is a boolean, not an integer (an integer from 0 to 65535)",
        ),
        ("log:\n  levle: x\n", "2:3: unknown setting 'log.levle' (did you mean 'log.level'?)"),
        ("port: 1\nport: 2\n", "2:1: duplicate setting 'port' (first set at line 1, column 1)"),
    ],
)
def test_exact_messages(tmp_path: Path, text: str, message: str) -> None:
    """The most common mistakes read exactly like this, after the file name."""
    path, error = error_for(tmp_path, text)
    assert str(error) == f"{path}:{message}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("allow: [10.0.0.300]\n", "1:9: allow: '10.0.0.300' is not an IP address or CIDR block"),
        ("deny:\n  - 10.0.0.1\n  - 7\n", "3:5: deny: 7 is an integer, not a string"),
        ("allow:\n  - [1]\n", "2:5: allow: a list was found where a list item belongs"),
        ("proxy_trusted: 5\n", "1:16: proxy_trusted: 5 is an integer, not a list"),
        ("metrics: localhost\n", "1:10: metrics: 'localhost' has no port"),
        ("metrics: ::1:80\n", "1:10: metrics: '::1:80' is ambiguous"),
        ("metrics: a:99999\n", "1:10: metrics: 'a:99999' has a port that is not an integer"),
        ("metrics: '[x]:1'\n", "1:10: metrics: '[x]:1' has an invalid IPv6 address"),
        ("proxy_protocol: v2\n", "1:17: proxy_protocol: 'v2' needs proxy_trusted"),
    ],
)
def test_list_and_endpoint_errors(tmp_path: Path, text: str, message: str) -> None:
    """Address lists and host:port endpoints are checked item by item, with the item's place."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}:{message}")


def test_endpoint_split() -> None:
    """split_endpoint takes the brackets off an IPv6 host."""
    assert split_endpoint("[::1]:9107") == ("::1", 9107)
    assert split_endpoint("127.0.0.1:0") == ("127.0.0.1", 0)
