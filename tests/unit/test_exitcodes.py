"""The exit-code table: one declaration per code, used by the code, true of a real echod."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from echod import exitcodes
from echod.exitcodes import COMMANDS, EXIT_CODES
from tests.support import SCRUBBED_ENV, run_echod

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
def test_each_code_and_name_is_declared_once_in_order() -> None:
    """Codes and names are unique, in numeric order, each used by at least one command."""
    codes = [entry.code for entry in EXIT_CODES]
    names = [entry.name for entry in EXIT_CODES]
    assert codes == sorted(set(codes))
    assert len(set(names)) == len(names)
    for entry in EXIT_CODES:
        assert 0 <= entry.code <= 255
        assert entry.commands and set(entry.commands) <= set(COMMANDS)
        assert entry.meaning and not entry.meaning.endswith(".")


def test_each_entry_is_a_constant_of_the_module() -> None:
    """exitcodes.NAME is the entry's code for every entry, and there are no other constants."""
    for entry in EXIT_CODES:
        assert getattr(exitcodes, entry.name) == entry.code
    constants = {name for name in vars(exitcodes) if re.fullmatch(r"[A-Z][A-Z_]+", name)}
    constants -= {"COMMANDS", "CONTROL_COMMANDS", "EXIT_CODES"}
    assert constants == {entry.name for entry in EXIT_CODES}


def test_commands_are_the_cli_sub_commands() -> None:
    """The table's command names are exactly the sub-commands the parser knows."""
    from echod import cli

    assert set(cli.COMMANDS) == set(COMMANDS)


def _exit_names_used(path: Path) -> set[str]:
    """The names of echod.exitcodes a module uses, as ``exitcodes.X`` or imported."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    used = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "exitcodes"
        ):
            used.add(node.attr)
        if isinstance(node, ast.ImportFrom) and node.module == "echod.exitcodes":
            used.update(alias.name for alias in node.names)
    return used


def test_the_code_uses_only_declared_codes() -> None:
    """Every exit code named anywhere in the package is in the table."""
    declared = {entry.name for entry in EXIT_CODES}
    declared |= {"COMMANDS", "CONTROL_COMMANDS", "EXIT_CODES", "ExitCode"}
    for path in (ROOT / "echod").rglob("*.py"):
        assert _exit_names_used(path) <= declared, path


def test_no_bare_exit_numbers_in_the_cli() -> None:
    """cli.py returns no literal exit code other than through the table."""
    text = (ROOT / "echod" / "cli.py").read_text(encoding="utf-8")
    assert not re.search(r"\breturn (?!0\b)\d+\b", text)
    assert "LSB_NOT_RUNNING = " not in text


def test_numbers_in_the_man_page_prose_are_declared() -> None:
    """Every "exits N" or "exit status N" in echod(8)'s prose is a declared code."""
    page = (ROOT / "packaging" / "man" / "echod.8").read_text(encoding="utf-8")
    mentioned = {int(n) for n in re.findall(r"(?i)\bexits?(?: status)? (\d+)", page)}
    assert mentioned, "the man page's prose mentions no exit status"
    assert mentioned <= {entry.code for entry in EXIT_CODES}


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A configuration whose pidfile no daemon holds."""
    path = tmp_path / "echod.yaml"
    path.write_text(f"port: 0\npidfile: {tmp_path / 'echod.pid'}\n", encoding="utf-8")
    return path


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No configuration or systemd variables from the environment the tests run in."""
    for name in ("ECHOD_CONFIG", "ECHOD_PIDFILE", *SCRUBBED_ENV):
        monkeypatch.delenv(name, raising=False)


#: The arguments a sub-command needs besides options.
NEEDS = {"cut": ["1-1"], "set": ["max_connections", "5"]}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_usage_error_exits_ex_usage(
    command: str, clean_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown option exits EX_USAGE for every sub-command, as the table says."""
    from echod import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main([command, *NEEDS.get(command, []), "--no-such-option"])
    assert exit_.value.code == exitcodes.EX_USAGE
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err
    assert _commands_cell("EX_USAGE") == " every command "


@pytest.mark.parametrize("command", COMMANDS)
def test_a_bad_configuration_exits_ex_config(
    tmp_path: Path, command: str, clean_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """A configuration with an out-of-range port exits EX_CONFIG for every sub-command."""
    from echod import cli

    bad = tmp_path / "bad.yaml"
    bad.write_text("port: 70000\n", encoding="utf-8")
    assert cli.main([command, *NEEDS.get(command, []), "--config", str(bad)]) == exitcodes.EX_CONFIG
    assert "port: 70000 is out of range" in capsys.readouterr().err
    assert _commands_cell("EX_CONFIG") == " every command "


@pytest.mark.parametrize(
    ("command", "name"),
    [("status", "NOT_RUNNING"), ("reload", "LSB_NOT_RUNNING"), ("stop", "OK")],
)
def test_commands_without_a_daemon(config: Path, command: str, name: str) -> None:
    """With no daemon running, status, reload and stop exit with the codes declared."""
    result = run_echod(command, "--config", str(config))
    entry = next(e for e in EXIT_CODES if e.name == name)
    assert result.returncode == entry.code, result.stderr
    assert command in entry.commands


def _commands_cell(name: str) -> str:
    from echod import docgen

    row = next(r for r in docgen.render_exit_table().splitlines() if f"| `{name}` |" in r)
    return row.rsplit("|", 2)[1]
