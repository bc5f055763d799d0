"""The log target fails under a real daemon, in every mode: a full tmpfs, /dev/full, a pipe
whose reader exits. The echo goes on (every byte, every client), no process dies, nothing
leaks, the lines that go are whole, and the loss is counted (``echod status``, ``/metrics``)
and told once, on standard error, with a summary once writing works again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    DEADLINE,
    MODES,
    ROOT,
    Echod,
    echo_roundtrip,
    echod_command,
    free_port,
    http_get,
    mounted_tmpfs,
    no_leaks,
    refused,
    run_echod,
    wait_for,
    wait_workers,
    warm_up,
)

FAILING = "cannot write log lines to"
AGAIN = "are written again"


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs of this test's own (needs root: skipped without)."""
    with mounted_tmpfs(tmp_path / "logs", "1m") as mount:
        yield mount


def fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` up, to the last byte; the filler's path."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (65536, 4096, 1):  # bounded: the tmpfs is 1 MiB
            for _ in range(1 << 20):
                try:
                    os.write(fd, b"\0" * size)
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


def status_of(server: Echod) -> dict[str, Any]:
    done = run_echod("status", "--json", "--config", str(server.config_path))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def dropped_metric(port: int) -> dict[str, float]:
    status, text = http_get(port, "/metrics")
    assert status == 200
    found = {}
    for line in text.splitlines():
        if line.startswith("echod_log_lines_dropped_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            found[reason] = float(line.rsplit(" ", 1)[1])
    return found


def whole_json_lines(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes()
    assert data.endswith(b"\n") or not data
    return [json.loads(line) for line in data.splitlines() if line]


def clients_at_once(server: Echod, count: int, size: int = 5000) -> list[bytes]:
    """``count`` clients connected together, each echoing ``size`` bytes of its own."""
    results: list[bytes] = [b""] * count
    socks = [server.connect() for _ in range(count)]

    def one(i: int) -> None:
        results[i] = echo_roundtrip(socks[i], bytes([i % 251]) * size)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE)
    for sock in socks:
        sock.close()
    return results


@pytest.mark.parametrize("mode", MODES)
def test_a_full_log_disk_costs_log_lines_only(
    tmp_path: Path, small_tmpfs: Path, mode: str
) -> None:
    """With its log file on a full tmpfs, and max_connections reached meanwhile: every
    client is echoed in full, no worker or supervisor dies or leaks, the lines that were
    written are whole, the loss is counted alike in status and /metrics and told once on
    stderr; once space returns, the log resumes with a summary of what it lost."""
    metrics = free_port()
    server = Echod(
        tmp_path,
        mode=mode,
        workers=2,
        max_connections=10,
        pidfile=str(tmp_path / "echod.pid"),
        metrics=f"127.0.0.1:{metrics}",
        log={"file": str(small_tmpfs / "echod.log")},
    )
    server.log_path = small_tmpfs / "echod.log"
    try:
        server.start()
        wait_workers(server, 2)
        pids = [server.pid, *warm_up(server).values()]
        filler = fill(small_tmpfs)
        with no_leaks(server, pids):
            for _ in range(4):
                results = clients_at_once(server, 25)
                assert results == [bytes([i % 251]) * 5000 for i in range(25)]

        def hundred_dropped() -> dict[str, int] | None:
            # 100 connections' opens and closes at least; a connection process may log its
            # close (and fail to) after the open and served counts settled: the status follows.
            found: dict[str, int] = status_of(server).get("log_dropped", {})
            return found if found.get("no_space", 0) >= 100 else None

        dropped = wait_for(hundred_dropped, what="100 drops in status")
        assert set(dropped) == {"no_space"}
        wait_for(lambda: dropped_metric(metrics)["no_space"] >= dropped["no_space"])
        stderr = server.stderr_path.read_text()
        assert stderr.count(FAILING) == 1, stderr
        assert "Traceback" not in stderr

        filler.unlink()
        with server.connect() as sock:
            assert echo_roundtrip(sock, b"after") == b"after"
        summary = server.wait_event("log_lines_dropped")
        assert summary["dropped"] >= dropped["no_space"]
        assert summary["reasons"].keys() == {"no_space"}
        assert server.stderr_path.read_text().count(AGAIN) == 1
        events = whole_json_lines(server.log_path)  # every line whole
        assert not [e for e in events if e["event"] == "worker_state" and e["state"] == "failed"]
        assert server.stop() == 0
    finally:
        server.kill()


@pytest.mark.parametrize("mode", MODES)
def test_dev_full_as_the_log_file_serves_and_says_so_once(tmp_path: Path, mode: str) -> None:
    """log.file /dev/full (every write ENOSPC) from the start: echod serves, tells stderr
    once, counts every line, and stops with exit 0."""
    port = free_port()
    server = Echod(
        tmp_path,
        mode=mode,
        port=port,
        pidfile=str(tmp_path / "echod.pid"),
        log={"file": "/dev/full"},
    )
    server.port = port
    try:
        server.start(wait=False)
        wait_for(lambda: status_of_or_none(server), what="status published")
        for i in range(10):
            with server.connect() as sock:
                assert echo_roundtrip(sock, b"%d" % i * 100) == b"%d" % i * 100
        wait_for(lambda: status_of(server)["log_dropped"].get("no_space", 0) >= 20)
        assert server.stop() == 0
        stderr = server.stderr_path.read_text()
        assert stderr.count(FAILING) == 1, stderr
        assert "Traceback" not in stderr
    finally:
        server.kill()


def status_of_or_none(server: Echod) -> dict[str, Any] | None:
    if server.proc is not None and server.proc.poll() is not None:
        raise AssertionError(f"echod exited: {server.stderr_path.read_text()[-2000:]}")
    done = run_echod("status", "--json", "--config", str(server.config_path))
    if done.returncode != 0:
        return None
    found: dict[str, Any] = json.loads(done.stdout)
    return found if found.get("state") == "running" else None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stderr_too", [False, True], ids=["stdout", "stdout-and-stderr"])
def test_a_log_pipe_whose_reader_exits(tmp_path: Path, mode: str, stderr_too: bool) -> None:
    """``echod run | head -n 3`` (and ``2>&1 | head -n 3``): once the reader is gone every
    client is still echoed, ``echod status`` counts the lines lost, and SIGTERM ends it with
    exit 0 and no traceback; with stderr on another file the loss is told there once."""
    port = free_port()
    config = tmp_path / "echod.yaml"
    config.write_text(
        f"mode: {mode}\nport: {port}\npidfile: {tmp_path / 'echod.pid'}\n"
        "log: {target: stdout, format: json}\n"
    )
    err_path = tmp_path / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET")}
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            echod_command("run", "--config", str(config)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if stderr_too else err,
            cwd=ROOT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        assert all(line.endswith(b"\n") for line in lines)
        proc.stdout.close()  # head exits
        server = Echod(tmp_path)
        server.port = port
        for i in range(20):
            with server.connect() as sock:
                assert echo_roundtrip(sock, b"x%d" % i * 500) == b"x%d" % i * 500
        lost = wait_for(
            lambda: run_echod("status", "--json", "--config", str(config)).stdout,
            what="status",
        )
        wait_for(
            lambda: json.loads(run_echod("status", "--json", "--config", str(config)).stdout)
            .get("log_dropped", {})
            .get("pipe_closed", 0)
            >= 20,
            what=f"pipe_closed drops in status (was {lost})",
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE) == 0
        stderr = err_path.read_text()
        assert "Traceback" not in stderr
        if not stderr_too:
            assert stderr.count(FAILING) == 1, stderr
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.mark.parametrize(
    "closing", ['>&-', '<&- >&- 2>&-'], ids=["stdout-closed", "all-three-closed"]
)
def test_started_with_standard_descriptors_closed(tmp_path: Path, closing: str) -> None:
    """Started with standard output (or all three) closed, logging to it: echod serves, its
    lines go nowhere, nothing it opens takes those numbers (the counts of lost lines stay
    true: none), and SIGTERM ends it with exit 0."""
    port = free_port()
    config = tmp_path / "echod.yaml"
    config.write_text(
        f"port: {port}\npidfile: {tmp_path / 'echod.pid'}\nlog: {{target: stdout, format: json}}\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET")}
    proc = subprocess.Popen(
        ["sh", "-c", f'exec "$0" "$@" {closing}', *echod_command("run", "--config", str(config))],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        cwd=ROOT, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        server = Echod(tmp_path)
        server.port = port
        wait_for(lambda: not refused("127.0.0.1", port), what="echod to listen")
        for i in range(5):
            with server.connect() as sock:
                assert echo_roundtrip(sock, b"y%d" % i * 100) == b"y%d" % i * 100
        asked = wait_for(
            lambda: run_echod("status", "--json", "--config", str(config)).stdout, what="status"
        )
        status = json.loads(asked)
        assert not any(status.get("log_dropped", {}).values()), status
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
