"""Drop-ins and per-instance pidfiles through real ``python -m echod`` processes.

A main file plus its drop-in directory is what ``check-config`` shows and ``run`` serves; a
drop-in added later is applied by a reload (SIGHUP) and a broken one is refused with its own
file and line; ``$ECHOD_PIDFILE`` gives a daemon its own pidfile, across reloads too.
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path

from echod.config import parse_config
from tests.support import (
    Echod,
    connect_to,
    echo_roundtrip,
    echod,
    free_port,
    recv_exactly,
    refused,
    run_echod,
    wait_for,
)

EX_CONFIG = 78


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def echo_held(sock: socket.socket, data: bytes) -> bytes:
    """One round trip on a connection that stays open (echo_roundtrip half-closes it)."""
    sock.sendall(data)
    return recv_exactly(sock, len(data))


def test_check_config_shows_files_and_origins(tmp_path: Path) -> None:
    """check-config with --config and with $ECHOD_CONFIG lists main and drop-ins, with origins."""
    main = write(tmp_path / "web.yaml", "mode: process\nport: 7000\n")
    first = write(tmp_path / "web.d/10-port.yaml", "port: 7001\n")
    second = write(tmp_path / "web.d/20-log.yaml", "log:\n  level: debug\n")
    write(tmp_path / "web.d/20-log.yaml.dpkg-old", "port: [ not read\n")
    for result in (
        run_echod("check-config", "--config", str(main)),
        run_echod("check-config", env={"ECHOD_CONFIG": str(main)}),
    ):
        assert result.returncode == 0, result.stderr
        assert result.stderr == f"echod: configuration ok ({main} and 2 drop-ins)\n"
        header = [line for line in result.stdout.splitlines() if line.startswith("#   ")]
        assert header == [f"#   {main}", f"#   {first}", f"#   {second}"]
        assert f"mode: process  # from {main}:1\n" in result.stdout
        assert f"port: 7001  # from {first}:1\n" in result.stdout
        assert f"  level: debug  # from {second}:2\n" in result.stdout
        cfg = parse_config(result.stdout)
        assert (cfg.mode, cfg.port, cfg.log.level) == ("process", 7001, "debug")


def test_bad_dropin_exits_78_naming_it(tmp_path: Path) -> None:
    """run and check-config refuse a bad drop-in with one line at the drop-in's line, exit 78."""
    main = write(tmp_path / "echod.yaml", "port: 0\n")
    bad = write(tmp_path / "echod.d/50-bad.yaml", "# tuning\nworkers: many\n")
    for command in ("check-config", "run"):
        result = run_echod(command, "--config", str(main))
        assert result.returncode == EX_CONFIG, result.stderr
        assert result.stderr.startswith(f"echod: {bad}:2:10: workers: 'many' is a string")
        assert result.stderr.count("\n") == 1
        assert "Traceback" not in result.stderr


def test_empty_file_checks_as_all_defaults(tmp_path: Path) -> None:
    """An empty main file is valid: check-config exits 0 and says every setting is default."""
    main = write(tmp_path / "echod.yaml", "")
    result = run_echod("check-config", "--config", str(main))
    assert result.returncode == 0, result.stderr
    assert "it sets nothing: every setting is at its default" in result.stderr


def test_run_serves_dropins_and_reload_applies_a_new_one(tmp_path: Path) -> None:
    """run serves the port a drop-in sets; a drop-in added later takes effect on SIGHUP."""
    first_port, second_port = free_port(), free_port()
    write(tmp_path / "echod.d/10-port.yaml", f"port: {first_port}\n")
    with echod(tmp_path) as server:
        assert server.port == first_port
        held = server.connect()
        try:
            assert echo_held(held, b"before\n") == b"before\n"
            added = write(tmp_path / "echod.d/20-port.yaml", f"port: {second_port}\n")
            server.signal(signal.SIGHUP)
            reload = server.wait_event("reload")
            assert reload["changes"]["port"] == [str(first_port), str(second_port)]
            assert set(reload["changes"]) == {"port"}
            with connect_to("127.0.0.1", second_port) as new:
                assert echo_roundtrip(new, b"new port\n") == b"new port\n"
            wait_for(lambda: refused("127.0.0.1", first_port), what="the old port to close")
            assert echo_held(held, b"after\n") == b"after\n"
            # A broken drop-in is refused at its own line; the daemon keeps serving.
            added.write_text(f"port: {second_port}\nbacklog: 0\n")
            server.signal(signal.SIGHUP)
            failed = server.wait_event("reload_failed")
            assert failed["error"].startswith(f"{added}:2:10: backlog: 0 is out of range")
            with connect_to("127.0.0.1", second_port) as again:
                assert echo_roundtrip(again, b"still\n") == b"still\n"
        finally:
            held.close()
        assert server.stop() == 0


def test_pidfile_from_the_environment_holds_across_reloads(tmp_path: Path) -> None:
    """$ECHOD_PIDFILE gives the daemon its pidfile; status finds it; a reload does not move it."""
    pidfile = tmp_path / "run-a" / "echod.pid"
    env = {"ECHOD_PIDFILE": str(pidfile)}
    server = Echod(tmp_path)
    try:
        server.start(env=env)
        assert int(pidfile.read_text()) == server.pid
        status = run_echod("status", "--config", str(server.config_path), env=env)
        assert status.returncode == 0, status.stderr
        assert f"(pid {server.pid})" in status.stdout
        write(tmp_path / "echod.d/10-idle.yaml", "idle_timeout: 5\n")
        server.signal(signal.SIGHUP)
        # The reload reads the variable again: the pidfile is not among the changes.
        assert set(server.wait_event("reload")["changes"]) == {"idle_timeout"}
        assert int(pidfile.read_text()) == server.pid
        # Without the variable the file's own setting (none) applies: no daemon to find.
        alone = run_echod("status", "--config", str(server.config_path))
        assert alone.returncode == EX_CONFIG
        assert "no pidfile is configured" in alone.stderr
        assert server.stop() == 0
        assert not pidfile.exists()
    finally:
        server.kill()
