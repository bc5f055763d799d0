"""Bad and good configuration files through the real ``python -m echod`` command."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from echod.config import (
    ConfigError,
    default_config,
    dump_config,
    load_config,
    parse_config,
    read_config,
)
from tests.support import run_echod as echod

ROOT = Path(__file__).resolve().parents[2]
EX_CONFIG = 78

# case name: (file text, "line:column" the message starts with after the path)
BAD_FILES = {
    "unknown key": ("prot: 9999\n", "1:1"),
    "string port": ('port: "abc"\n', "1:7"),
    "boolean port": ("port: true\n", "1:7"),
    "port out of range": ("port: 70000\n", "1:7"),
    "negative backlog": ("backlog: -1\n", "1:10"),
    "unknown mode": ("mode: fork\n", "1:7"),
    "syntax error": ("port: 1\n  host: x\n", "2:7"),
    "list instead of mapping": ("- port: 1\n", "1:1"),
    "duplicate key": ("port: 1\nport: 2\n", "2:1"),
    "bad nested log key": ("log:\n  levle: debug\n", "2:3"),
}


def expected_message(path: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return str(caught.value)


def assert_config_error(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert "Traceback" not in result.stdout + result.stderr
    assert result.returncode == EX_CONFIG, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("echod: ")
    assert message in lines[0]


@pytest.mark.parametrize("command", ["check-config", "run"])
@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_exits_78(tmp_path: Path, command: str, case: str) -> None:
    """A bad file makes the command print one `echod:` line naming where and why, and exit 78."""
    text, location = BAD_FILES[case]
    path = tmp_path / "echod.yaml"
    path.write_text(text, encoding="utf-8")
    message = expected_message(str(path))
    assert message.startswith(f"{path}:{location}" if location else f"{path}: ")
    result = echod(command, "--config", str(path))
    assert_config_error(result, message)
    assert result.stdout == ""


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_missing_file_exits_78(tmp_path: Path, command: str) -> None:
    """A missing file named by --config is a configuration error, not a crash."""
    path = tmp_path / "absent.yaml"
    result = echod(command, "--config", str(path))
    assert_config_error(result, f"{path}: cannot read: No such file or directory")


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_unreadable_file_exits_78(tmp_path: Path, command: str) -> None:
    """A path that cannot be read as a file (a directory, since root ignores modes) exits 78."""
    result = echod(command, "--config", str(tmp_path))
    assert_config_error(result, f"{tmp_path}: cannot read: a directory, not a file")


def test_environment_names_the_file(tmp_path: Path) -> None:
    """Without --config, $ECHOD_CONFIG names the file that is checked."""
    path = tmp_path / "env.yaml"
    path.write_text("port: 70000\n", encoding="utf-8")
    result = echod("check-config", env={"ECHOD_CONFIG": str(path)})
    assert_config_error(result, f"{path}:1:7: port: 70000 is out of range")


def test_valid_file_prints_effective_config(tmp_path: Path) -> None:
    """check-config on a good file exits 0 and prints the effective configuration as YAML."""
    path = tmp_path / "echod.yaml"
    path.write_text("mode: process\nport: 0\nlog:\n  level: debug\n", encoding="utf-8")
    result = echod("check-config", "--config", str(path))
    assert "Traceback" not in result.stdout + result.stderr
    assert result.returncode == 0, result.stderr
    loaded = read_config(str(path))
    cfg = loaded.config
    assert result.stdout.endswith(dump_config(cfg, loaded.origins))
    assert f"mode: process  # from {path}:1\n" in result.stdout
    assert f"  level: debug  # from {path}:4\n" in result.stdout
    assert parse_config(result.stdout) == cfg
    assert (cfg.mode, cfg.port, cfg.log.level) == ("process", 0, "debug")


def test_shipped_file_checks_clean() -> None:
    """The shipped config/echod.yaml passes check-config and prints the defaults."""
    shipped = ROOT / "config" / "echod.yaml"
    result = echod("check-config", "--config", str(shipped))
    assert result.returncode == 0, result.stderr
    assert parse_config(result.stdout) == default_config()
    assert "# from " not in result.stdout
    assert result.stderr == (
        f"echod: configuration ok ({shipped}; it sets nothing: every setting is at its default)\n"
    )
