"""The exact rules and messages of echod.config, one branch at a time.

Each test pins a value (a message, a bound, a formatted scalar), so that a changed comparison,
number or string in the module makes it fail: these are the tests the mutation run
(``make mutation``) found missing.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from echod import config, configdump, configfile, configparse, kinds, settings
from echod.config import (
    SETTINGS,
    ConfigError,
    InvalidValueError,
    Setting,
    default_config,
    dump_config,
    iter_yaml_lines,
    load_config,
    parse_config,
    resolve_config_path,
    show_value,
    split_endpoint,
    yaml_scalar,
)
from tests.support import ROOT

LOADERS = [yaml.SafeLoader] + ([yaml.CSafeLoader] if hasattr(yaml, "CSafeLoader") else [])
BY_NAME = {s.name: s for s in SETTINGS}


@pytest.fixture(params=LOADERS, ids=lambda loader: loader.__name__)
def loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> type:
    """Run a test under libyaml's loader and under the pure-Python one."""
    monkeypatch.setattr(configparse, "_LOADER", request.param)
    return request.param  # type: ignore[no-any-return]


def problem(setting: str, value: object) -> tuple[str, str]:
    """The (problem, hint) that ``setting`` gives for ``value``."""
    with pytest.raises(InvalidValueError) as caught:
        BY_NAME[setting].convert(value)
    return caught.value.problem, caught.value.hint


def error(text: str, path: str = "f.yaml") -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, path)
    return caught.value


# -- Setting: names, rules, conversion -------------------------------------------------------


def test_key_and_section_split_the_dotted_name() -> None:
    """A dotted name splits into its section and key; a top-level one has no section."""
    level, port = BY_NAME["log.level"], BY_NAME["port"]
    assert (level.section, level.key) == ("log", "level")
    assert (port.section, port.key) == ("", "port")


@pytest.mark.parametrize(
    ("name", "rule", "expects"),
    [
        ("port", "an integer from 0 to 65535", "an integer"),
        ("thread_stack_size", "0, or an integer from 32768 to 67108864", "an integer"),
        ("idle_timeout", "a number >= 0", "a number"),
        ("worker_timeout", "a number > 0", "a number"),
        ("udp", "true or false", "a boolean"),
        ("mode", "one of thread, process, async", "a string"),
        ("host", "an IP address or a host name", "a string"),
        ("allow", "a list of IP addresses and CIDR blocks (IPv4 or IPv6)", "a list"),
        (
            "metrics",
            'an address and port as "host:port" ("[::1]:port" for IPv6), or null',
            "a string",
        ),
        ("pidfile", "an absolute path, or null", "a string"),
        ("log.file", "an absolute path, or null", "a string"),
    ],
)
def test_rule_and_expected_type_in_words(name: str, rule: str, expects: str) -> None:
    """Each kind of setting states its rule and its expected type exactly."""
    assert (BY_NAME[name].rule, BY_NAME[name].expects) == (rule, expects)


def test_a_bound_with_a_fraction_is_written_as_is() -> None:
    """A fractional bound is shown with its fraction, a whole one without ".0", none as "?"."""
    assert Setting("x", "number", 1.0, "X.", minimum=0.5).rule == "a number >= 0.5"
    assert Setting("x", "number", 1.0, "X.", minimum=2.0).rule == "a number >= 2"
    assert Setting("x", "int", 1, "X.").rule == "an integer from ? to ?"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("port", None, ("is not allowed", "")),
        ("port", True, ("is a boolean, not an integer", "")),
        ("port", 1.5, ("is a decimal number, not an integer", "")),
        ("port", "80", ("is a string, not an integer", "")),
        ("port", -1, ("is out of range", "")),
        ("port", 65536, ("is out of range", "")),
        ("idle_timeout", False, ("is a boolean, not a number", "")),
        ("idle_timeout", "1", ("is a string, not a number", "")),
        ("idle_timeout", 10**400, ("is out of range", "")),
        ("idle_timeout", float("inf"), ("is not a finite number", "")),
        ("idle_timeout", float("nan"), ("is not a finite number", "")),
        ("idle_timeout", -0.5, ("is out of range", "")),
        ("worker_timeout", 0, ("is out of range", "")),
        ("worker_timeout", 0.0, ("is out of range", "")),
        ("thread_stack_size", 32767, ("is out of range", "")),
        ("thread_stack_size", 64 * 1024 * 1024 + 1, ("is out of range", "")),
        ("udp", 1, ("is an integer, not a boolean", "")),
        ("udp", "true", ("is a string, not a boolean", "")),
        ("mode", 1, ("is an integer, not a string", "")),
        ("mode", "treads", ("is not a valid choice", "did you mean 'thread'?")),
        ("mode", "zzz", ("is not a valid choice", "")),
        ("log.connections", "closed", ("is not a valid choice", "did you mean 'close'?")),
        ("log.connections", 1, ("is an integer, not a string", "")),
        ("pidfile", "", ("is empty", "")),
        ("pidfile", "/run/a\0b", ("contains a NUL character", "")),
        ("pidfile", "run/echod.pid", ("is not an absolute path", "")),
        ("allow", "10.0.0.1", ("is a string, not a list", "")),
        ("allow", ["10.0.0.1", 7], ("item 2 7 is an integer, not a string", "")),
        ("allow", ["x"], ("item 1 'x' is not an IP address or CIDR block", "")),
        ("metrics", "localhost", ("has no port", 'write it as "host:port"')),
        ("metrics", ":9107", ("has no port", 'write it as "host:port"')),
        ("metrics", "a:", ("has a port that is not an integer from 0 to 65535", "")),
        ("metrics", "a:x1", ("has a port that is not an integer from 0 to 65535", "")),
        ("metrics", "a:65536", ("has a port that is not an integer from 0 to 65535", "")),
        ("metrics", "[x]:1", ("has an invalid IPv6 address in brackets", "")),
        ("metrics", "::1:80", ("is ambiguous", 'write an IPv6 address as "[addr]:port"')),
        ("metrics", "[::1:80", ("is ambiguous", 'write an IPv6 address as "[addr]:port"')),
        ("metrics", "a_b:80", ("is not a valid IP address or host name", "")),
        ("host", "[::1]", ("is not a valid address", "write an IPv6 address without brackets")),
        ("host", "", ("is not a valid IP address or host name", "")),
        ("host", "[::1", ("is not a valid IP address or host name", "")),
        ("host", "::1]", ("is not a valid IP address or host name", "")),
    ],
)
def test_convert_refuses_with_the_exact_problem(
    name: str, value: object, expected: tuple[str, str]
) -> None:
    """Each rule refuses a bad value with its own problem and hint, word for word."""
    assert problem(name, value) == expected


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("port", 0, 0),
        ("port", 65535, 65535),
        ("backlog", 1, 1),
        ("idle_timeout", 0, 0.0),
        ("idle_timeout", 7, 7.0),
        ("worker_timeout", 0.001, 0.001),
        ("thread_stack_size", 0, 0),
        ("thread_stack_size", 32768, 32768),
        ("thread_stack_size", 64 * 1024 * 1024, 64 * 1024 * 1024),
        ("udp", False, False),
        ("pidfile", None, None),
        ("pidfile", "/run/x.pid", "/run/x.pid"),
        ("allow", [], ()),
        ("allow", ("10.0.0.0/8", "::1"), ("10.0.0.0/8", "::1")),
        ("metrics", "[::1]:0", "[::1]:0"),
        ("metrics", "[::ffff:10.0.0.1]:80", "[::ffff:10.0.0.1]:80"),
        ("allow", ["10.0.0.1/8"], ("10.0.0.1/8",)),
        ("metrics", "127.0.0.1:65535", "127.0.0.1:65535"),
        ("metrics", "metrics.example:9107", "metrics.example:9107"),
        ("mode", "async", "async"),
        ("log.connections", "close", "close"),
        ("log.connections", True, "both"),  # the setting's boolean form, from before close
        ("log.connections", False, "off"),
    ],
)
def test_convert_accepts_the_edges(name: str, value: object, expected: object) -> None:
    """The bounds themselves, 0 where it is allowed besides the range, and null where nullable
    are accepted, and a number comes back as a float."""
    got = BY_NAME[name].convert(value)
    assert (type(got), got) == (type(expected), expected)


# -- host names ------------------------------------------------------------------------------


#: Host names of 253 and 254 characters, every label a valid 61 to 63.
NAME_253 = ".".join(["a" * 63] * 3 + ["b" * 61])
NAME_254 = ".".join(["a" * 63] * 3 + ["b" * 62])


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        (NAME_253, True),
        (NAME_253 + ".", True),
        (NAME_254, False),
        ("a" * 63 + ".example", True),
        ("a" * 64 + ".example", False),
        ("x.", True),
        (".", False),
        ("example.123", False),
        ("123.example", True),
        ("a-1", True),
        ("a-", False),
        ("::ffff:10.0.0.1", True),
    ],
)
def test_host_name_limits(host: str, ok: bool) -> None:
    """A host name is at most 253 characters (a final dot aside) in labels of at most 63,
    and its last label is not all digits."""
    assert (len(NAME_253), len(NAME_254)) == (253, 254)
    setting = BY_NAME["host"]
    if ok:
        assert setting.convert(host) == host
    else:
        assert problem("host", host) == ("is not a valid IP address or host name", "")


def test_split_endpoint_of_a_name() -> None:
    """A host name and port split at the last colon."""
    assert split_endpoint("metrics.example:9107") == ("metrics.example", 9107)


# -- messages ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (None, "null"),
        (True, "true"),
        (False, "false"),
        (("a", 1), "['a', 1]"),
        (["x"], "['x']"),
        (float("nan"), ".nan"),
        (float("inf"), ".inf"),
        (float("-inf"), "-.inf"),
        (1.5, "1.5"),
        (7, "7"),
        (datetime.date(2026, 12, 1), "2026-12-01"),
        ("x" * 58, repr("x" * 58)),
        ("x" * 59, repr("x" * 57)[:57] + "..."),
        (b"hi", "b'hi'"),
    ],
)
def test_show_value(value: object, shown: str) -> None:
    """Values are shown much as YAML writes them; a long one is cut to 60 characters."""
    assert show_value(value) == shown


def test_show_value_keeps_exactly_sixty_characters() -> None:
    """A value shown in 60 characters is kept whole; 61 are cut to 57 and an ellipsis."""
    assert show_value("y" * 58) == "'" + "y" * 58 + "'"
    assert len(show_value("y" * 58)) == 60
    assert show_value("y" * 59) == "'" + "y" * 56 + "..."


@pytest.mark.parametrize(
    ("value", "described"),
    [
        (None, "null"),
        (True, "a boolean"),
        (1, "an integer"),
        (1.5, "a decimal number"),
        ("s", "a string"),
        (b"b", "binary data"),
        ([1], "a list"),
        ({"a": 1}, "a mapping"),
        (datetime.date(2026, 1, 1), "a date"),
        (datetime.datetime(2026, 1, 1, 10, 0), "a date"),
        ({1}, "a set"),
    ],
)
def test_describe_names_each_yaml_type(value: object, described: str) -> None:
    """Each type YAML can give is named as a person would say it."""
    assert kinds._describe(value) == described


def test_config_error_str_and_attributes() -> None:
    """str() is path:line:column: message on one line; each part may be missing."""
    full = ConfigError("a\nb", path="/p", line=3, column=4, key="k", value=None, rule="r")
    assert str(full) == "/p:3:4: a b"
    assert (full.message, full.key, full.rule, full.has_value, full.value) == (
        "a\nb",
        "k",
        "r",
        True,
        None,
    )
    assert str(ConfigError("m", path="/p", line=3)) == "/p:3: m"
    assert str(ConfigError("m", line=3, column=4)) == "<config>:3:4: m"
    bare = ConfigError("m")
    assert (str(bare), bare.path, bare.line, bare.column, bare.key, bare.rule) == (
        "<config>: m",
        None,
        None,
        None,
        None,
        "",
    )
    assert (bare.has_value, bare.value) == (False, None)
    assert repr(configparse._NO_VALUE) == "<no value>"
    assert bare.exit_code == 78  # EX_CONFIG, whoever raises it


def test_an_origin_reads_as_path_and_line() -> None:
    """Where a value was set, as other messages quote it: the path, and the line if known."""
    assert str(configparse.Origin("/etc/echod.yaml", 3)) == "/etc/echod.yaml:3"
    assert str(configparse.Origin("/etc/echod.yaml")) == "/etc/echod.yaml"


@pytest.mark.parametrize(
    ("text", "message", "key", "rule"),
    [
        (
            "mode: treads\n",
            "1:7: mode: 'treads' is not a valid choice"
            " (one of thread, process, async; did you mean 'thread'?)",
            "mode",
            "one of thread, process, async",
        ),
        (
            "port: {a: 1}\n",
            "1:7: port: a mapping was found where an integer belongs (an integer from 0 to 65535)",
            "port",
            "an integer from 0 to 65535",
        ),
        (
            "log: 5\n",
            "1:6: log: 5 is a value where a mapping belongs"
            " (a mapping with the keys format, target, file, level, connections)",
            "log",
            "a mapping with the keys format, target, file, level, connections",
        ),
        (
            "log: [json]\n",
            "1:6: log: a list was found where a mapping belongs"
            " (a mapping with the keys format, target, file, level, connections)",
            "log",
            "a mapping with the keys format, target, file, level, connections",
        ),
        (
            "? [a]\n: 1\n",
            "1:3: a list was found where a setting name belongs",
            None,
            "setting names are plain words",
        ),
        (
            "log:\n  ? {a: 1}\n  : 1\n",
            "2:5: a mapping was found where a setting name belongs",
            "log",
            "setting names are plain words",
        ),
        (
            "<<: {port: 1}\n",
            "1:1: merge keys ('<<') are not supported; write each setting out",
            None,
            "setting names are plain words",
        ),
        (
            "log:\n  <<: {level: info}\n",
            "2:3: merge keys ('<<') are not supported; write each setting out",
            "log",
            "setting names are plain words",
        ),
        (
            "zzzzzz: 1\n",
            "1:1: unknown setting 'zzzzzz' (see echod.yaml(5) for the settings)",
            "zzzzzz",
            "only the settings of echod.yaml(5)",
        ),
        (
            "1: 1\n",
            "1:1: unknown setting '1' (see echod.yaml(5) for the settings)",
            "1",
            "only the settings of echod.yaml(5)",
        ),
        (
            "log:\n  host: x\n",
            "2:3: unknown setting 'log.host' (did you mean 'host'?)",
            "log.host",
            "only the settings of echod.yaml(5)",
        ),
        (
            "port: 1\nport: 2\n",
            "2:1: duplicate setting 'port' (first set at line 1, column 1)",
            "port",
            "each setting at most once",
        ),
        (
            "log:\n  level: info\n  level: info\n",
            "3:3: duplicate setting 'log.level' (first set at line 2, column 3)",
            "log.level",
            "each setting at most once",
        ),
        (
            "port: !!int x\n",
            "1:7: port: cannot read the value: invalid literal for int() with base 10: 'x'",
            "port",
            "a plain YAML value",
        ),
        (
            "log: !!int x\n",
            "1:6: log: cannot read the value: invalid literal for int() with base 10: 'x'",
            "log",
            "a plain YAML value",
        ),
        (
            "allow:\n  - [1]\n",
            "2:5: allow: a list was found where a list item belongs"
            " (a list of IP addresses and CIDR blocks (IPv4 or IPv6))",
            "allow",
            "a list of IP addresses and CIDR blocks (IPv4 or IPv6)",
        ),
        (
            "allow: [10.0.0.1, x]\n",
            "1:19: allow: 'x' is not an IP address or CIDR block"
            " (a list of IP addresses and CIDR blocks (IPv4 or IPv6))",
            "allow",
            "a list of IP addresses and CIDR blocks (IPv4 or IPv6)",
        ),
        (
            "- 1\n",
            "1:1: the file holds a list where a mapping of settings belongs",
            None,
            "a mapping of settings",
        ),
        (
            "port: !custom 1\n",
            "1:7: port: cannot read the value: could not determine a constructor for the tag"
            " '!custom'",
            "port",
            "a plain YAML value",
        ),
        (
            "allow:\n  - !!int x\n",
            "2:5: allow: cannot read the value: invalid literal for int() with base 10: 'x'",
            "allow",
            "a plain YAML value",
        ),
        (
            "{a: 1}: 2\n",
            "1:1: a mapping was found where a setting name belongs",
            None,
            "setting names are plain words",
        ),
    ],
)
def test_structural_errors_word_for_word(
    loader: type, text: str, message: str, key: str | None, rule: str
) -> None:
    """Errors in the file's shape read exactly so, with the key and the rule they name."""
    found = error(text)
    assert (str(found), found.key, found.rule, found.path) == (
        f"f.yaml:{message}",
        key,
        rule,
        "f.yaml",
    )


def test_text_without_a_path_is_named_string() -> None:
    """Text parsed without a path is called <string> in its messages."""
    with pytest.raises(ConfigError) as caught:
        parse_config("port: x\n")
    assert str(caught.value).startswith("<string>:1:7: port: 'x' is a string")
    assert caught.value.path == "<string>"


def test_empty_and_null_texts_set_nothing() -> None:
    """An empty file and an explicit null document both mean every default."""
    assert parse_config("") == default_config()
    assert parse_config("null\n") == default_config()
    assert parse_config("# only a comment\n") == default_config()


@pytest.mark.parametrize(
    ("text", "message", "value", "rule", "key"),
    [
        (
            "log:\n  target: file\n",
            "2:11: log.target: 'file' needs log.file to name the file (set log.file to a path)",
            "file",
            "log.file set when log.target is file",
            "log.target",
        ),
        (
            "proxy_protocol: v1\n",
            "1:17: proxy_protocol: 'v1' needs proxy_trusted to list the load balancers allowed"
            " to send the header",
            "v1",
            "proxy_trusted not empty when proxy_protocol is on",
            "proxy_protocol",
        ),
        (
            "workers: 4\nmax_connections: 3\n",
            "2:18: max_connections: 3 is less than workers (4) (max_connections >= workers:"
            " it is split across the workers, each needs at least one)",
            3,
            "max_connections >= workers",
            "max_connections",
        ),
    ],
)
def test_rules_across_settings_word_for_word(
    text: str, message: str, value: object, rule: str, key: str
) -> None:
    """A rule that spans settings names the deciding value, where it was written, and why."""
    found = error(text)
    assert (str(found), found.value, found.rule, found.has_value, found.key) == (
        f"f.yaml:{message}",
        value,
        rule,
        True,
        key,
    )


@pytest.mark.parametrize(
    ("text", "name", "value"),
    [
        ("workers: 4\nmax_connections: 4\n", "max_connections", 4),
        ("log:\n  target: file\n  file: /var/log/e.log\n", "log.file", "/var/log/e.log"),
        ("proxy_protocol: v2\nproxy_trusted: [127.0.0.1]\n", "proxy_trusted", ("127.0.0.1",)),
        ("log:\n  target: stdout\n", "log.target", "stdout"),
    ],
)
def test_rules_across_settings_accept_the_edge(text: str, name: str, value: object) -> None:
    """As many connections as workers, a log file named, a trusted balancer: all accepted."""
    assert config.config_values(parse_config(text))[name] == value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "port: [1, 2\n",
            {
                "SafeLoader": "2:1: syntax error: expected ',' or ']', but got '<stream end>'"
                " (while parsing a flow sequence at line 1, column 7)",
                "CSafeLoader": "2:1: syntax error: did not find expected ',' or ']'"
                " (while parsing a flow sequence at line 1, column 7)",
            },
        ),
        (
            "\tport: 1\n",
            {
                "SafeLoader": "1:1: syntax error: found character '\\t' that cannot start any"
                " token (while scanning for the next token)",
                "CSafeLoader": "1:1: syntax error: found character that cannot start any token"
                " (while scanning for the next token at line 1, column 1)",
            },
        ),
        (
            "port: *nowhere\n",
            {
                "SafeLoader": "1:7: syntax error: found undefined alias 'nowhere'",
                "CSafeLoader": "1:7: syntax error: found undefined alias",
            },
        ),
        (
            'host: "a\x00b"\n',
            {
                "SafeLoader": "1:9: syntax error: character 0x0 is not allowed in YAML",
                "CSafeLoader": "1:9: syntax error: character 0x0 is not allowed in YAML",
            },
        ),
    ],
)
def test_syntax_errors_word_for_word(loader: type, text: str, expected: dict[str, str]) -> None:
    """A YAML syntax error says what the parser found and the context it was in, and where."""
    found = error(text)
    assert str(found) == f"f.yaml:{expected[loader.__name__]}"
    assert (found.key, found.rule, found.has_value) == (None, "", False)


def test_a_bad_character_on_a_later_line_is_placed(loader: type) -> None:
    """A character YAML does not allow is reported at its own line and column."""
    found = error('port: 1\nbacklog: 2\nhost: "ab\x07"\n')
    assert str(found) == "f.yaml:3:10: syntax error: character 0x7 is not allowed in YAML"


class _FailingLoader(yaml.SafeLoader):
    """A loader that fails without a mark, as a YAMLError that is neither kind the parser
    raises would."""

    def get_single_node(self) -> None:
        raise yaml.YAMLError("the loader gave up")


def test_any_other_yaml_error_is_a_syntax_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """An error from the loader without a position is still one line naming the file."""
    monkeypatch.setattr(configparse, "_LOADER", _FailingLoader)
    found = error("port: 1\n")
    assert (str(found), found.line) == ("f.yaml: syntax error: the loader gave up", None)


def test_syntax_error_without_a_problem_keeps_the_context() -> None:
    """A parser error that has only a context reports the context, at its mark."""
    mark = yaml.Mark("f", 0, 4, 2, None, None)
    bare = yaml.MarkedYAMLError(context="while parsing", context_mark=mark)
    assert str(configparse._syntax_error(bare, "f.yaml")) == (
        "f.yaml:5:3: syntax error: while parsing"
    )
    none = yaml.MarkedYAMLError()
    assert str(configparse._syntax_error(none, "f.yaml")) == "f.yaml: syntax error: not valid YAML"
    same = yaml.MarkedYAMLError("while x", mark, "found y", mark)
    assert str(configparse._syntax_error(same, "f.yaml")) == (
        "f.yaml:5:3: syntax error: found y (while x)"
    )


# -- reading files ----------------------------------------------------------------------------


def test_a_path_with_a_nul_cannot_be_read() -> None:
    """A path with an embedded NUL is a ConfigError, not a ValueError."""
    with pytest.raises(ConfigError) as caught:
        load_config("/etc/echod\0.yaml")
    assert str(caught.value) == "/etc/echod\0.yaml: cannot read: embedded null byte"


def test_a_file_of_exactly_the_limit_is_read(tmp_path: Path) -> None:
    """A file of exactly MAX_FILE_SIZE bytes is read; one byte more is refused, saying so."""
    path = tmp_path / "big.yaml"
    path.write_bytes(b"port: 7\n" + b"#" * (config.MAX_FILE_SIZE - 9) + b"\n")
    assert os.path.getsize(path) == config.MAX_FILE_SIZE
    assert load_config(str(path)).port == 7
    path.write_bytes(b"port: 7\n" + b"#" * (config.MAX_FILE_SIZE - 8) + b"\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert str(caught.value) == f"{path}: cannot read: larger than 1048576 bytes"


@pytest.mark.parametrize(
    ("path", "what"),
    [("/dev/zero", "a character device"), ("/dev/null", "a character device")],
)
def test_a_device_is_no_configuration_file(path: str, what: str) -> None:
    """A device (endless, or empty) is refused as not a file, before anything is read."""
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: cannot read: {what}, not a file"


def test_a_fifo_is_refused_at_once_without_a_writer(tmp_path: Path) -> None:
    """A FIFO at the path is refused at once: opening it does not wait for a writer."""
    fifo = tmp_path / "echod.yaml"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        load_config(str(fifo))
    assert time.monotonic() - started < 1.0
    assert str(caught.value) == f"{fifo}: cannot read: a FIFO, not a file"


def test_a_fifo_among_the_dropins_is_refused(tmp_path: Path) -> None:
    """A FIFO named like a drop-in is refused the same way, naming the drop-in."""
    (tmp_path / "echod.yaml").write_text("port: 7\n")
    (tmp_path / "echod.d").mkdir()
    os.mkfifo(tmp_path / "echod.d" / "10-fifo.yaml")
    with pytest.raises(ConfigError) as caught:
        load_config(str(tmp_path / "echod.yaml"))
    assert str(caught.value) == f"{tmp_path}/echod.d/10-fifo.yaml: cannot read: a FIFO, not a file"


def test_a_unix_socket_is_refused(tmp_path: Path) -> None:
    """A Unix socket at the path (open() says ENXIO) is named as a socket."""
    path = tmp_path / "echod.yaml"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        with pytest.raises(ConfigError) as caught:
            load_config(str(path))
    assert str(caught.value) == f"{path}: cannot read: a socket, not a file"


def test_bad_utf8_on_a_later_line(tmp_path: Path) -> None:
    """A bad byte is placed at its own line, and at its column within that line."""
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"port: 1\nbacklog: 2\nhost: caf\xe9\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert str(caught.value) == f"{path}:3:10: cannot read: not UTF-8 text (byte 0xe9)"


def test_a_byte_order_mark_is_skipped(tmp_path: Path) -> None:
    """A UTF-8 file that starts with a byte order mark loads as if it had none."""
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbfport: 7\n")
    assert load_config(str(path)).port == 7


def test_bad_utf8_on_the_first_line(tmp_path: Path) -> None:
    """A bad byte on the first line is placed at line 1 and its column."""
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"\xff")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert (caught.value.line, caught.value.column) == (1, 1)
    assert str(caught.value) == f"{path}:1:1: cannot read: not UTF-8 text (byte 0xff)"


def test_a_dangling_default_link_is_still_returned(tmp_path: Path) -> None:
    """A default path that is a broken symbolic link is returned, so that the operator is told."""
    link = tmp_path / "echod.yaml"
    link.symlink_to(tmp_path / "absent")
    assert resolve_config_path(None, {}, default_path=str(link)) == str(link)


# -- writing YAML ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "null"),
        (True, "true"),
        (False, "false"),
        (0, "0"),
        (-3, "-3"),
        (2.0, "2"),
        (-2.0, "-2"),
        (0.25, "0.25"),
        (1e14, "100000000000000"),
        (1e15, "1000000000000000.0"),
        (-1e15, "-1000000000000000.0"),
        (1e16, "1.0e+16"),
        (1e20, "1.0e+20"),
        (1e-07, "1.0e-07"),
        (1.5e-07, "1.5e-07"),
        (1.5e300, "1.5e+300"),
        ((), "[]"),
        (("10.0.0.0/8", "::1"), '["10.0.0.0/8", "::1"]'),
        ([1, None], "[1, null]"),
        ("thread", "thread"),
        ("/run/echod/echod.pid", "/run/echod/echod.pid"),
        ("_a.b-c", "_a.b-c"),
        ("Ab_C", "Ab_C"),
        ("127.0.0.1", '"127.0.0.1"'),
        ("yes", '"yes"'),
        ("null", '"null"'),
        ("a b", '"a b"'),
        ('a"b\\c', '"a\\"b\\\\c"'),
        ("", '""'),
    ],
)
def test_yaml_scalar_exact(value: object, text: str) -> None:
    """Each value is written in the plainest YAML that reads back as the same value and type."""
    assert yaml_scalar(value) == text
    loaded = yaml.safe_load(f"v: {text}")["v"]
    expected = list(value) if isinstance(value, tuple) else value
    assert loaded == expected


def test_resolves_to_str() -> None:
    """Plain words stay strings; YAML's booleans and null do not."""
    assert [configdump._resolves_to_str(t) for t in ("thread", "on", "null", "No", "x1")] == [
        True,
        False,
        False,
        False,
        True,
    ]


def test_dump_of_the_defaults_line_by_line() -> None:
    """dump_config writes one line per setting, in table order, the log settings indented
    under one log: line."""
    lines = dump_config(default_config()).splitlines()
    top = [s for s in SETTINGS if not s.section]
    assert lines[: len(top)] == [f"{s.key}: {yaml_scalar(s.default)}" for s in top]
    assert lines[:3] == ["mode: thread", 'host: "127.0.0.1"', "port: 9999"]
    assert lines[len(top) :] == [
        "log:",
        "  format: auto",
        "  target: auto",
        "  file: null",
        "  level: info",
        "  connections: both",
    ]


def test_documented_lines_put_the_doc_and_rule_before_each_setting() -> None:
    """With docs, each setting follows a blank line, its doc and its rule; a section its doc."""
    values = config.config_values(default_config())
    lines = list(iter_yaml_lines(values, docs=True))
    assert lines[:4] == [
        "",
        "# How connections are served: a thread each, a process each, or an event loop.",
        "# Allowed: one of thread, process, async.",
        "mode: thread",
    ]
    start = lines.index("log:")
    assert lines[start - 2 : start + 5] == [
        "",
        "# How and where echod writes its structured logs.",
        "log:",
        "",
        "  # Log line format: json, console (readable), or auto (console on a terminal, else"
        " json).",
        "  # Allowed: one of auto, json, console.",
        "  format: auto",
    ]


def test_yaml_lines_open_nested_sections_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings two sections deep open each section once, indented by depth, and a section
    that ends is not reopened for the settings after it."""
    table = (
        Setting("a.b.c", "int", 1, "C."),
        Setting("a.b.d", "int", 2, "D."),
        Setting("a.e", "int", 3, "E."),
        Setting("f", "int", 4, "F."),
    )
    monkeypatch.setattr(configdump, "SETTINGS", table)
    monkeypatch.setattr(configdump, "SECTIONS", {"a": "Section A.", "a.b": "Section B."})
    values = {"a.b.c": 1, "a.b.d": 2, "a.e": 3, "f": 4}
    assert list(iter_yaml_lines(values, docs=False)) == [
        "a:",
        "  b:",
        "    c: 1",
        "    d: 2",
        "  e: 3",
        "f: 4",
    ]
    documented = list(iter_yaml_lines(values, docs=True))
    assert documented[:4] == ["", "# Section A.", "a:", ""]
    assert documented[4:7] == ["  # Section B.", "  b:", ""]
    monkeypatch.setattr(configdump, "SECTIONS", {"a": "Section A."})
    undocumented = list(iter_yaml_lines(values, docs=True))
    assert undocumented[3:6] == ["", "  #", "  b:"]


def test_yaml_lines_reopen_only_what_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A setting in a sibling sub-section opens that sub-section under the same parent."""
    table = (Setting("a.x.y", "int", 1, "Y."), Setting("a.b.c", "int", 2, "C."))
    monkeypatch.setattr(configdump, "SETTINGS", table)
    values = {"a.x.y": 1, "a.b.c": 2}
    assert list(iter_yaml_lines(values, docs=False)) == [
        "a:",
        "  x:",
        "    y: 1",
        "  b:",
        "    c: 2",
    ]


def test_section_names_at_every_depth(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each section allows its own settings and sub-sections, whatever lies deeper elsewhere."""
    table = (
        Setting("a.b.c", "int", 1, "C."),
        Setting("a.b.d", "int", 2, "D."),
        Setting("a.e", "int", 3, "E."),
        Setting("g.h.i", "int", 4, "I."),
        Setting("f", "int", 5, "F."),
    )
    monkeypatch.setattr(configparse, "SETTINGS", table)
    assert configparse._section_names("") == ["a", "g", "f"]
    assert configparse._section_names("a") == ["b", "e"]
    assert configparse._section_names("a.b") == ["c", "d"]
    assert configparse._section_names("g") == ["h"]


def test_section_names() -> None:
    """The keys allowed at the top are the top-level settings then log; in log, its keys."""
    top = configparse._section_names("")
    assert top[-1] == "log"
    assert top[:-1] == [s.name for s in SETTINGS if not s.section]
    assert configparse._section_names("log") == ["format", "target", "file", "level", "connections"]


# -- the table check ---------------------------------------------------------------------------


def test_table_check_notices_a_setting_out_of_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """A table whose top-level settings differ from Config's fields fails the import check."""
    table = list(SETTINGS)
    table[0], table[1] = table[1], table[0]
    monkeypatch.setattr(settings, "SETTINGS", tuple(table))
    with pytest.raises(AssertionError) as caught:
        settings._check_table()
    assert str(caught.value) == "SETTINGS and Config disagree"


def test_table_check_notices_a_missing_log_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """A table whose log settings differ from LogConfig's fields fails the import check."""
    monkeypatch.setattr(settings, "SETTINGS", SETTINGS[:-1])
    with pytest.raises(AssertionError) as caught:
        settings._check_table()
    assert str(caught.value) == "SETTINGS and LogConfig disagree"


def test_table_check_passes_the_real_table() -> None:
    """The shipped table passes its own check."""
    assert settings._check_table() is None


def test_config_values_follow_the_table() -> None:
    """config_values gives every setting by dotted name, in table order, with its value."""
    cfg = dataclasses.replace(default_config(), port=7)
    values = config.config_values(cfg)
    assert list(values) == [s.name for s in SETTINGS]
    assert (values["port"], values["log.level"]) == (7, "info")


LISTEN_RULE = (
    'a list of "host:port" ("[::1]:port" for IPv6, "*:port" for every address), each alone or'
    " as {address, ipv6_only, backlog}"
)
KEEPALIVE_RULE = (
    "false, true (the kernel's timings), or {idle, interval, count}: seconds from 1 to 32767,"
    " probes from 1 to 127"
)
NO_VALUE = object()


@pytest.mark.parametrize(
    ("text", "message", "named"),
    [
        (
            "tcp_keepalive:\n  idle: [1]\n",
            "2:9: tcp_keepalive: a list was found where a plain value belongs",
            ("tcp_keepalive", NO_VALUE, KEEPALIVE_RULE),
        ),
        (
            "tcp_keepalive:\n  [idle]: 1\n",
            "2:3: tcp_keepalive: a list was found where a plain value belongs",
            ("tcp_keepalive", NO_VALUE, KEEPALIVE_RULE),
        ),
        (
            "tcp_keepalive:\n  idle: 30\n  idle: 40\n",
            "3:3: tcp_keepalive: 'idle' is given twice",
            ("tcp_keepalive", NO_VALUE, "each key at most once"),
        ),
        (
            "tcp_keepalive:\n  idel: 30\n",
            "2:3: tcp_keepalive has the unknown key 'idel' (did you mean 'idle'?)",
            ("tcp_keepalive", 30, "did you mean 'idle'?"),
        ),
        (
            "tcp_keepalive:\n  idle: x\n",
            "2:9: tcp_keepalive has idle 'x', which is a string, not an integer (an integer"
            " from 1 to 32767)",
            ("tcp_keepalive", "x", "an integer from 1 to 32767"),
        ),
        (
            "listen:\n  - '127.0.0.1:7'\n  - {address: '127.0.0.1:8', backlog: x}\n",
            "3:39: listen: item 2 has backlog 'x', which is a string, not an integer (an"
            " integer from 1 to 65535, or null)",
            ("listen", "x", "an integer from 1 to 65535, or null"),
        ),
        (
            "listen:\n  - '127.0.0.1:7'\n  - {address: '127.0.0.1:8', backlog: [1]}\n",
            "3:39: listen: item 2: a list was found where a plain value belongs",
            ("listen", NO_VALUE, LISTEN_RULE),
        ),
        (
            "listen:\n  - '127.0.0.1:7'\n  - [a]\n",
            f"3:5: listen: a list was found where a list item belongs ({LISTEN_RULE})",
            ("listen", NO_VALUE, LISTEN_RULE),
        ),
        (
            "listen:\n  - '127.0.0.1:7'\n  - 'nonsense'\n",
            "3:5: listen: item 2 'nonsense' has no port (write it as \"host:port\")",
            ("listen", "nonsense", LISTEN_RULE),
        ),
        (
            "listen:\n  - '127.0.0.1:7'\n  - '127.0.0.1:7'\n",
            "3:5: listen: item 2 '127.0.0.1:7' is listed twice (item 1) (each address at most"
            " once)",
            ("listen", "127.0.0.1:7", LISTEN_RULE),
        ),
        (
            "listen: ['127.0.0.1:7']\nport: 9\n",
            "1:9: listen: cannot be used with port (set at f.yaml:2): listen replaces host and"
            " port; write that address as an entry of listen instead",
            ("listen", NO_VALUE, "listen, or host and port, not both"),
        ),
        (
            "listen:\n  - !!int x\n",
            "2:5: listen: cannot read the value: invalid literal for int() with base 10: 'x'",
            ("listen", NO_VALUE, "a plain YAML value"),
        ),
        (
            "tcp_keepalive:\n  idle: !!int x\n",
            "2:9: tcp_keepalive: cannot read the value: invalid literal for int() with base 10:"
            " 'x'",
            ("tcp_keepalive", NO_VALUE, "a plain YAML value"),
        ),
        (
            "tcp_keepalive:\n  !!int x: 1\n",
            "2:3: tcp_keepalive: cannot read the value: invalid literal for int() with base 10:"
            " 'x'",
            ("tcp_keepalive", NO_VALUE, "a plain YAML value"),
        ),
        (
            "group: nogroup\n",
            "1:8: group: needs user (it is the group of the user the workers run as)",
            ("group", "nogroup", "group only with user"),
        ),
        (
            "user: no-such-user-here\n",
            "1:7: user: no user named 'no-such-user-here' on this system",
            ("user", "no-such-user-here", "an account of this system"),
        ),
        (
            "user: nobody\ngroup: no-such-group-here\n",
            "2:8: group: no group named 'no-such-group-here' on this system",
            ("group", "no-such-group-here", "an account of this system"),
        ),
        (
            "control_group: no-such-group-here\n",
            "1:16: control_group: no group named 'no-such-group-here' on this system",
            ("control_group", "no-such-group-here", "an account of this system"),
        ),
    ],
)
def test_listeners_keepalive_and_accounts_word_for_word(
    loader: type, text: str, message: str, named: tuple[str, object, str]
) -> None:
    """The errors of the structured settings and the accounts: where (the item, the key or
    the value at fault), the setting, the bad value when there is one, and the rule."""
    key, value, rule = named
    found = error(text)
    assert (str(found), found.key, found.rule) == (f"f.yaml:{message}", key, rule)
    if value is NO_VALUE:
        assert not found.has_value
    else:
        assert (found.has_value, found.value) == (True, value)


def test_a_listen_item_of_every_form_is_read() -> None:
    """Strings and mappings mix; a mapping's keys are the entry's options."""
    cfg = parse_config(
        "listen:\n  - '127.0.0.1:7'\n  - {address: '[::1]:8', ipv6_only: true, backlog: 16}\n"
    )
    assert [(e.host, e.port, e.ipv6_only, e.backlog) for e in cfg.listen] == [
        ("127.0.0.1", 7, False, None),
        ("::1", 8, True, 16),
    ]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("tcp_keepalive: true\n", "tcp_keepalive: true"),
        ("tcp_keepalive: {idle: 30}\n", "tcp_keepalive: {idle: 30}"),
        ("tcp_keepalive: {idle: 30, count: 4}\n", "tcp_keepalive: {idle: 30, count: 4}"),
    ],
)
def test_the_keepalive_is_dumped_as_written(text: str, line: str) -> None:
    """The kernel's timings dump as ``true``; timings of the file's as a flow mapping of
    those given."""
    assert line in dump_config(parse_config(text)).splitlines()


def test_a_note_keeps_printable_text_and_escapes_the_rest() -> None:
    """A comment stays on one line: line breaks are escaped, while printable text (accents,
    backslashes) is left as it is."""
    assert configdump._one_line("caf\u00e9 a\\b") == "caf\u00e9 a\\b"
    assert configdump._one_line("a\nb") == "a\\nb"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("user", -1, ("is out of range", "an id from 0 to 4294967294")),
        ("user", 4294967295, ("is out of range", "an id from 0 to 4294967294")),
        ("user", True, ("is a boolean, not a name or a number", "")),
        ("user", "123", ("is a string of digits", "write an id without quotes")),
        ("user", "bad name!", ("is not a valid user name", "")),
        ("group", "bad name!", ("is not a valid group name", "")),
        ("listen", ["nonsense"], ("item 1 'nonsense' has no port", 'write it as "host:port"')),
        ("listen", [5], ("item 1 5 is an integer, not a string or a mapping", "")),
        (
            "listen",
            ["h:70000"],
            ("item 1 'h:70000' has a port that is not an integer from 0 to 65535", ""),
        ),
        ("listen", ["[zz]:7"], ("item 1 '[zz]:7' has an invalid IPv6 address in brackets", "")),
        (
            "listen",
            ["::1]:7"],
            ("item 1 '::1]:7' is ambiguous", 'write an IPv6 address as "[addr]:port"'),
        ),
        (
            "listen",
            [{"backlog": 5}],
            ("item 1 {'backlog': 5} has no address", "write {address: 'host:port', ...}"),
        ),
        (
            "listen",
            [{"address": "nonsense"}],
            (
                "item 1 'nonsense' has address 'nonsense', which has no port",
                '"host:port" ("[::1]:port" for IPv6, "*:port" for every address); write it as'
                ' "host:port"',
            ),
        ),
        (
            "listen",
            [{"address": "127.0.0.1:7", "ipv6_only": True}],
            (
                "item 1 '127.0.0.1:7' has ipv6_only on an address that is not IPv6",
                'ipv6_only applies to an IPv6 address such as "[::]:port"',
            ),
        ),
        (
            "listen",
            [{"address": "*:7", "ipv6_only": True}],
            (
                "item 1 '*:7' has ipv6_only on an address that is not IPv6",
                'ipv6_only applies to an IPv6 address such as "[::]:port"',
            ),
        ),
        (
            "listen",
            [{"address": "127.0.0.1:7", "zzz": 1}],
            (
                "item 1 '127.0.0.1:7' has the unknown key 'zzz'",
                "the keys are address, ipv6_only, backlog",
            ),
        ),
        (
            "listen",
            ["127.0.0.1:7", "127.0.0.2:7", "127.0.0.2:7"],
            ("item 3 '127.0.0.2:7' is listed twice (item 2)", "each address at most once"),
        ),
        (
            "listen",
            ["*:7", {"address": "[::]:7", "ipv6_only": True}],
            (
                "item 2 '[::]:7' overlaps item 1 '*:7'",
                "a wildcard address covers every address of its family",
            ),
        ),
        (
            "listen",
            ["127.0.0.1:7", "*:7"],
            (
                "item 2 '*:7' overlaps item 1 '127.0.0.1:7'",
                "a wildcard address covers every address of its family",
            ),
        ),
        (
            "listen",
            ["[::]:7", "127.0.0.1:7"],
            (
                "item 2 '127.0.0.1:7' overlaps item 1 '[::]:7'",
                "[::]:7 serves IPv4 too: set ipv6_only: true on it",
            ),
        ),
        # ipv6_only would not help here: the two meet on IPv6.
        (
            "listen",
            ["[::]:7", "[::1]:7"],
            (
                "item 2 '[::1]:7' overlaps item 1 '[::]:7'",
                "a wildcard address covers every address of its family",
            ),
        ),
        (
            "tcp_keepalive",
            {"idle": 30, "zz": 1},
            ("has the unknown key 'zz'", "the keys are idle, interval, count"),
        ),
        ("tcp_keepalive", 5, ("is an integer, not a boolean or a mapping", "")),
    ],
)
def test_accounts_listeners_and_keepalive_refused_with_the_exact_words(
    name: str, value: object, expected: tuple[str, str]
) -> None:
    """Each refusal of the structured settings and the accounts: its problem and hint."""
    assert problem(name, value) == expected


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("user", 4294967294),
        ("listen", ["h:65535"]),
        ("listen", ["localhost:7", "*:7"]),  # a host name is resolved at bind: no overlap
        ("listen", ["127.0.0.1:0", "127.0.0.1:0"]),  # each takes a port of its own
        ("listen", [{"address": "[::1]:7", "ipv6_only": True}]),
    ],
)
def test_accounts_and_listeners_accept_the_edges(name: str, value: object) -> None:
    """The largest id, the largest port, a host name beside a wildcard, two port-0 entries."""
    BY_NAME[name].convert(value)


def test_listeners_and_keepalive_read_back_in_words() -> None:
    """What check-config and the start event show of them."""
    assert str(kinds.ListenEntry("127.0.0.1", 7)) == "127.0.0.1:7"
    assert str(kinds.ListenEntry("::", 7, True, 16)) == "[::]:7 (ipv6_only: true, backlog: 16)"
    assert str(kinds.ListenEntry("::", 7, False, 16)) == "[::]:7 (backlog: 16)"
    assert str(kinds.Keepalive()) == "off"
    assert str(kinds.Keepalive(True)) == "on (the kernel's timings)"
    assert str(kinds.Keepalive(True, 30, None, 4)) == "on (idle 30, count 4)"
    assert BY_NAME["listen"].rule.startswith(
        'a list of "host:port" ("[::1]:port" for IPv6, "*:port" for every address)'
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            [{"address": 5}],
            (
                "item 1 {'address': 5} has address 5, which is an integer, not a string",
                '"host:port" ("[::1]:port" for IPv6, "*:port" for every address)',
            ),
        ),
        # The second entry is the dual-stack one: ipv6_only on it parts them.
        (
            ["127.0.0.1:7", "[::]:7"],
            (
                "item 2 '[::]:7' overlaps item 1 '127.0.0.1:7'",
                "[::]:7 serves IPv4 too: set ipv6_only: true on it",
            ),
        ),
        (
            ["[::1]:7", "[::]:7"],
            (
                "item 2 '[::]:7' overlaps item 1 '[::1]:7'",
                "a wildcard address covers every address of its family",
            ),
        ),
    ],
)
def test_listen_entries_refused_in_either_order(value: object, expected: tuple[str, str]) -> None:
    """A mapping's address that is not a string; an overlap whichever entry comes second."""
    assert problem("listen", value) == expected


def test_the_drop_ins_of_a_path_with_a_nul_cannot_be_read() -> None:
    """A NUL in the directory's name is refused in words, naming it (Python's own words,
    which differ between versions)."""
    with pytest.raises(ConfigError) as caught:
        config.dropin_files("a\0b")
    assert caught.value.path == "a\0b"
    assert str(caught.value).startswith("a\0b: cannot read: ")
    assert "embedded null" in str(caught.value)


def test_the_pidfile_from_the_environment_is_checked_and_named() -> None:
    """$ECHOD_PIDFILE (the instance's) overrides the file's and is refused as a setting is,
    named as where it came from; load_config reads the environment it is given."""
    environ = {"ECHOD_PIDFILE": "/run/echod/one.pid"}
    assert config.load_config(None, environ).pidfile == "/run/echod/one.pid"
    with pytest.raises(ConfigError) as caught:
        config.load_config(None, {"ECHOD_PIDFILE": "relative.pid"})
    found = caught.value
    assert str(found) == (
        "$ECHOD_PIDFILE: pidfile: 'relative.pid' is not an absolute path (an absolute path, or"
        " null)"
    )
    assert (found.key, found.has_value, found.value, found.rule) == (
        "pidfile",
        True,
        "relative.pid",
        "an absolute path, or null",
    )


def test_a_file_whose_read_fails_is_refused_in_words() -> None:
    """A regular file that cannot be read (/proc/self/mem at offset 0: EIO) is refused with
    the system's words, naming it."""
    with pytest.raises(ConfigError) as caught:
        config.load_config("/proc/self/mem")
    assert (str(caught.value), caught.value.path) == (
        "/proc/self/mem: cannot read: Input/output error",
        "/proc/self/mem",
    )


def test_a_kind_of_file_outside_the_table_is_still_named() -> None:
    """What is neither regular nor one of the named kinds is "not a regular file"."""
    assert configfile._not_regular(stat.S_IFLNK) == "not a regular file"
    assert configfile._not_regular(stat.S_IFREG) is None


def test_a_terminal_as_the_file_is_refused_without_becoming_ours() -> None:
    """A terminal at the path is refused as a character device, and opening it does not make
    it the controlling terminal of a session leader that has none (a daemon under systemd)."""
    master, slave = os.openpty()
    name = os.ttyname(slave)
    os.close(slave)
    code = (
        "import os, sys\n"
        "os.setsid()\n"
        "from echod import configfile\n"
        "try:\n"
        "    configfile.read_config(sys.argv[1])\n"
        "except configfile.ConfigError as error:\n"
        "    print(error)\n"
        "with open('/proc/self/stat') as stat:\n"
        "    print(stat.read().rsplit(')', 1)[1].split()[4])\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, name],
            capture_output=True,
            text=True,
            timeout=20,
            cwd=ROOT,
            check=False,
        )
    finally:
        os.close(master)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{name}: cannot read: a character device, not a file", "0"]


def test_a_huge_file_is_refused_after_reading_only_the_limit(tmp_path: Path) -> None:
    """A sparse file of 4 GiB is refused as too large under a 1 GiB address-space limit:
    only the limit and one byte are ever read."""
    huge = tmp_path / "huge.yaml"
    with huge.open("wb") as f:
        f.truncate(4 << 30)
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "from echod import configfile\n"
        "try:\n"
        "    configfile.read_config(sys.argv[1])\n"
        "except configfile.ConfigError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(huge)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == f"{huge}: cannot read: larger than {configfile.MAX_FILE_SIZE} bytes\n"
