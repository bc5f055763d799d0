"""Bash completion: a real bash, the script argcomplete generates, and a real echod answering."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.timeout(120)

REGISTER = shutil.which("register-python-argcomplete", path=os.path.dirname(sys.executable))
REGISTER = REGISTER or shutil.which("register-python-argcomplete")
needs_argcomplete = pytest.mark.skipif(
    REGISTER is None, reason="argcomplete is not installed (make venv installs it)"
)

#: Completes the line in $1 as bash would at its end: the words, the cursor, then the
#: function `complete -p echod` names, called as bash calls it (command, word, previous).
DRIVER = r"""
source "$COMPLETION"
function=$(complete -p echod | sed -n 's/.* -F \([^ ]*\) .*/\1/p')
[[ -n $function ]] || { echo "no completion function registered for echod" >&2; exit 1; }
COMP_LINE=$1
COMP_POINT=${#COMP_LINE}
read -ra COMP_WORDS <<<"$COMP_LINE"
[[ $COMP_LINE == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
COMP_TYPE=9
COMPREPLY=()
"$function" echod "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD - 1]}" 2>/dev/null
printf '%s\n' "${COMPREPLY[@]}"
"""


@pytest.fixture
def completion(tmp_path: Path) -> dict[str, str]:
    """The completion script generated as `make completion` and the .deb do, and an `echod`
    on PATH that is this interpreter's echod; returns the environment for bash."""
    assert REGISTER is not None
    script = tmp_path / "echod.bash"
    with open(script, "wb") as out:
        subprocess.run([REGISTER, "echod"], stdout=out, check=True, timeout=60)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    echod = bin_dir / "echod"
    echod.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m echod "$@"\n', encoding="utf-8")
    echod.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("_ARC", "COMP_", "ECHOD_"))}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(ROOT),
        COMPLETION=str(script),
    )
    return env


def complete(env: dict[str, str], line: str) -> list[str]:
    """What bash offers for ``line``, with the cursor at its end."""
    result = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", DRIVER, "driver", line],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [word.strip() for word in result.stdout.splitlines() if word.strip()]


@needs_argcomplete
def test_sub_commands(completion: dict[str, str]) -> None:
    """`echod st` completes to the three sub-commands that start with st."""
    assert sorted(complete(completion, "echod st")) == ["start", "status", "stop"]


@needs_argcomplete
def test_every_sub_command_after_the_name(completion: dict[str, str]) -> None:
    """`echod ` offers every sub-command of the parser."""
    from echod.exitcodes import COMMANDS

    assert set(COMMANDS) <= set(complete(completion, "echod "))


@needs_argcomplete
def test_options(completion: dict[str, str]) -> None:
    """`echod --con` completes to --config, and a sub-command's own options are offered."""
    assert complete(completion, "echod --con") == ["--config"]
    assert "--timeout" in complete(completion, "echod stop --")
    assert "--timeout" not in complete(completion, "echod status --")


@needs_argcomplete
def test_config_paths(completion: dict[str, str], tmp_path: Path) -> None:
    """`--config` completes file and directory names under the path typed so far."""
    configs = tmp_path / "configs"
    configs.mkdir()
    for name in ("x1.yaml", "x2.yml", "other.yaml"):
        (configs / name).write_text("port: 0\n", encoding="utf-8")
    (configs / "xdir").mkdir()
    offered = complete(completion, f"echod run --config {configs}/x")
    assert sorted(offered) == [f"{configs}/x1.yaml", f"{configs}/x2.yml", f"{configs}/xdir/"]
    assert complete(completion, f"echod -c {configs}/ot") == [f"{configs}/other.yaml"]


@needs_argcomplete
def test_without_argcomplete_a_completion_request_runs_nothing(
    completion: dict[str, str], tmp_path: Path
) -> None:
    """If argcomplete cannot be imported, echod answers a completion request with nothing:
    it neither serves nor prints usage, and exits at once with EX_UNAVAILABLE."""
    from echod import exitcodes

    broken = tmp_path / "broken"
    (broken / "argcomplete").mkdir(parents=True)
    (broken / "argcomplete" / "__init__.py").write_text("raise ImportError('not here')\n")
    env = {**completion, "PYTHONPATH": f"{broken}{os.pathsep}{ROOT}"}
    env.update(_ARGCOMPLETE="1", COMP_LINE="echod run", COMP_POINT="9")
    result = subprocess.run(
        [sys.executable, "-m", "echod", "run", "--defaults"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (exitcodes.EX_UNAVAILABLE, "", "")
    assert complete(env, "echod st") == []


def test_argcomplete_is_not_imported_to_run_a_command() -> None:
    """Outside a completion request, echod does not import argcomplete (start-up time)."""
    code = (
        "import sys\n"
        "from echod import cli\n"
        "try:\n"
        "    cli.main(['--version'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('argcomplete' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "_ARGCOMPLETE"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
        check=True,
    )
    assert result.stdout.splitlines()[-1] == "False"
