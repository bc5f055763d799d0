"""The ``echod`` command in this process: parsing, exit codes, and what it prints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from echod import __version__, cli, status
from echod.config import default_config, dump_config, parse_config
from echod.pidfile import Pidfile


@pytest.fixture(autouse=True)
def no_config_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ECHOD_CONFIG", raising=False)


def write_config(path: Path, **settings: Any) -> Path:
    path.write_text(yaml.safe_dump(settings))
    return path


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "echod.yaml", pidfile=str(tmp_path / "run" / "echod.pid"))


@pytest.fixture
def held_pidfile(tmp_path: Path) -> Iterator[Pidfile]:
    """The pidfile locked by this process, as if it were the running daemon."""
    pidfile = Pidfile(str(tmp_path / "run" / "echod.pid"))
    pidfile.acquire()
    yield pidfile
    pidfile.release()


def published(pidfile: Pidfile, **fields: Any) -> status.Status:
    """Publish a status beside ``pidfile`` as the daemon would; return it."""
    values: dict[str, Any] = {
        "pid": os.getpid(),
        "version": __version__,
        "state": "running",
        "started": time.time(),
        "mode": "thread",
        "addresses": ["127.0.0.1:9999"],
        "config_file": None,
        "open": 0,
        "served": 0,
        "reloads": 0,
        "generation": 1,
        **fields,
    }
    published = status.Status(**values)
    assert status.write(status.path_for(pidfile.path), published)
    return published


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_every_command_parses() -> None:
    """Each sub-command is known, and --config is accepted before or after it."""
    parser = cli.build_parser()
    for command in ("run", "start", "stop", "status", "reload", "upgrade", "check-config"):
        assert parser.parse_args([command]).command == command
    assert parser.parse_args(["-c", "a.yaml", "status"]).config == "a.yaml"
    assert parser.parse_args(["status", "--config", "b.yaml"]).config == "b.yaml"
    assert parser.parse_args(["stop", "--timeout", "2.5"]).timeout == 2.5
    assert parser.parse_args(["stop"]).timeout is None
    assert parser.parse_args(["reload"]).timeout == parser.parse_args(["upgrade"]).timeout == 30
    assert parser.parse_args(["reload", "--timeout", "5"]).timeout == 5
    assert parser.parse_args(["status", "--json"]).json is True


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a sub-command echod exits 64 (EX_USAGE) with its usage line."""
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 64
    assert "usage: echod" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the package version."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"echod {__version__}\n"


def test_check_config_prints_the_effective_settings(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    """check-config prints the settings as YAML and names the file on stderr."""
    code, out, err = run(capsys, "check-config", "--config", str(config))
    assert code == 0
    assert yaml.safe_load(out)["pidfile"] == str(config.parent / "run" / "echod.pid")
    assert err == f"echod: configuration ok ({config})\n"


def test_defaults_ignore_every_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--defaults uses the embedded defaults even when $ECHOD_CONFIG names a broken file."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("port: [\n")
    monkeypatch.setenv("ECHOD_CONFIG", str(broken))
    code, out, err = run(capsys, "check-config", "--defaults")
    assert code == 0
    assert parse_config(out) == default_config()
    assert out.endswith(dump_config(default_config()))
    assert out.startswith("# No file read: every setting is at its embedded default.\n")
    assert err == "echod: configuration ok (embedded defaults)\n"
    assert run(capsys, "check-config")[0] == 78  # the environment is honoured otherwise


def test_bad_file_is_one_line_and_exit_78(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A bad setting exits 78 with one line naming file, line, setting and rule."""
    bad = write_config(tmp_path / "bad.yaml", workers=0)
    for command in ("check-config", "status", "stop", "reload", "start", "run"):
        code, out, err = run(capsys, command, "--config", str(bad))
        assert (code, out) == (78, ""), command
        assert err.startswith(f"echod: {bad}:1:") and "workers" in err, err
        assert err.count("\n") == 1


def test_commands_that_need_a_pidfile_say_so(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """With pidfile: null, status/stop/reload/start cannot find a daemon: exit 78."""
    nopid = write_config(tmp_path / "nopid.yaml", pidfile=None)
    for command in ("status", "stop", "reload", "start"):
        code, _out, err = run(capsys, command, "--config", str(nopid))
        assert code == 78, command
        assert "pidfile" in err and err.startswith("echod: "), err


def test_not_running(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    """No daemon: status exits 3, stop succeeds (LSB), reload exits 7."""
    assert run(capsys, "status", "--config", str(config)) == (3, "echod is not running\n", "")
    assert run(capsys, "stop", "--config", str(config)) == (0, "echod: not running\n", "")
    assert run(capsys, "reload", "--config", str(config)) == (7, "", "echod is not running\n")


def test_status_of_a_running_daemon(
    capsys: pytest.CaptureFixture[str], config: Path, held_pidfile: Pidfile
) -> None:
    """status reads the lock's pid and the status file beside the pidfile."""
    published(
        held_pidfile,
        started=time.time() - 3725,
        mode="process",
        workers=[
            status.WorkerStatus(1, 101, 3, "running", 3),
            status.WorkerStatus(2, 102, 3, "retiring", 1),
        ],
        addresses=["127.0.0.1:9999", "[::1]:9999"],
        open=4,
        served=17,
        reloads=2,
        config_file=str(config),
    )
    code, out, err = run(capsys, "status", "--config", str(config))
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"echod is running (pid {os.getpid()})",
        "  state:       running",
        "  uptime:      01:02:05",
        "  mode:        process (2 worker processes)",
        "  addresses:   127.0.0.1:9999, [::1]:9999",
        "  open:        4 connections",
        "  served:      17 connections",
        "  reloads:     2",
        f"  config file: {config}",
        f"  version:     {__version__}",
        "  workers:",
        "    worker 1 pid 101 generation 3: running, 3 open",
        "    worker 2 pid 102 generation 3: retiring, 1 open",
    ]


def test_status_json_is_the_published_status(
    capsys: pytest.CaptureFixture[str], config: Path, held_pidfile: Pidfile
) -> None:
    """status --json prints the published fields, running: true and the lock's pid; with no
    daemon it prints running: false and exits 3."""
    sent = published(held_pidfile, workers=[status.WorkerStatus(1, 101, 1, "running", 0)])
    code, out, err = run(capsys, "status", "--json", "--config", str(config))
    assert (code, err) == (0, "")
    assert json.loads(out) == {"running": True, **sent.to_dict(), "pid": os.getpid()}
    held_pidfile.release()
    code, out, _ = run(capsys, "status", "--json", "--config", str(config))
    assert (code, json.loads(out)) == (3, {"running": False})


def test_status_before_the_first_publication(
    capsys: pytest.CaptureFixture[str], config: Path, held_pidfile: Pidfile
) -> None:
    """A locked pidfile without a status file yet is still a running daemon."""
    code, out, _ = run(capsys, "status", "--config", str(config))
    assert code == 0
    assert out == f"echod is running (pid {os.getpid()})\n  (no status published yet)\n"


def test_reload_checks_the_file_the_daemon_reads(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    config: Path,
    held_pidfile: Pidfile,
) -> None:
    """reload validates the daemon's own file first: broken, it exits 78 with the reason
    and the note that the old configuration still serves, and sends no SIGHUP."""
    daemons_file = tmp_path / "daemon.yaml"
    daemons_file.write_text(config.read_text() + "mode: sideways\n")
    published(held_pidfile, config_file=str(daemons_file))
    hups: list[int] = []
    previous = signal.signal(signal.SIGHUP, lambda signum, frame: hups.append(signum))
    try:
        code, out, err = run(capsys, "reload", "--config", str(config))
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert (code, out) == (78, "")
    assert err.startswith(f"echod: {daemons_file}:2:") and "mode" in err
    assert err.endswith(" (not reloaded; still serving the previous configuration)\n")
    assert hups == []


def test_format_duration() -> None:
    """Uptime is hh:mm:ss, with days in front once there are some."""
    assert cli.format_duration(0) == "00:00:00"
    assert cli.format_duration(59.9) == "00:00:59"
    assert cli.format_duration(3661) == "01:01:01"
    assert cli.format_duration(2 * 86400 + 5) == "2d 00:00:05"


def test_wait_gone() -> None:
    """wait_gone is True once a process has exited (reaped or not), False on timeout."""
    with subprocess.Popen(["sleep", "30"]) as sleeper:
        try:
            assert cli.wait_gone(sleeper.pid, 0.05) is False
            sleeper.terminate()
            assert cli.wait_gone(sleeper.pid, 10) is True  # a zombie has exited
        finally:
            sleeper.kill()
    assert cli.wait_gone(sleeper.pid, 0) is True  # reaped: no such process
