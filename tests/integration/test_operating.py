"""Operating a running echod through its control socket, in every mode (process mode with
and without spare processes), with PROXY on and off: the live listing of the connections,
cutting one, the operator's drain, limits changed at run time; a reload's rules reaching
what is open, retire_timeout and max_connection_age; and the socket's own defences (another
user, a malformed, oversized or silent client)."""

from __future__ import annotations

import codecs
import json
import os
import pwd
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest

# Imported here, in the test's process: a process forked from it as another user could not
# read this interpreter's library (it lies under root's home on these machines).
from echod import cli, ctlcommands, exitcodes
from echod.errors import OperatorError
from echod.proxy import v1_header
from tests.support import (
    DEADLINE,
    MODES,
    Echod,
    echo_roundtrip,
    free_port,
    http_get,
    recv_exactly,
    run_echod,
    wait_for,
    wait_workers,
)

pytestmark = pytest.mark.timeout(120)

#: The modes to operate: each mode, and process mode with spare processes.
VARIANTS = [*[(mode, {}) for mode in MODES], ("process", {"spare_processes": 4})]
VARIANT_IDS = [*MODES, "process-spare"]
PROXY = {"proxy_protocol": "v1", "proxy_trusted": ["127.0.0.1"], "proxy_timeout": 5}
CLIENT = ("203.0.113.7", 41000)


@contextmanager
def daemon(tmp_path: Path, **settings: Any) -> Iterator[Echod]:
    server = Echod(tmp_path, pidfile=str(tmp_path / "echod.pid"), **settings)
    try:
        yield server.start()
    finally:
        server.kill()


def ctl(server: Echod, *args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    """``echod ARGS`` against ``server``'s configuration (as ``user``, if given: the
    command's own function, in a process forked from this one that takes that user's ids)."""
    argv = [*args, "--config", str(server.config_path)]
    if user is None:
        return run_echod(*argv)
    # Parsed, the file read and every module loaded here: the forked process only talks
    # to the socket (this interpreter's library is not readable to other users here).
    parsed = cli.build_parser().parse_args(argv)
    cfg = cli.load(parsed)[0]
    if hasattr(ctlcommands, f"cmd_{parsed.command}"):
        command = partial(getattr(ctlcommands, f"cmd_{parsed.command}"), cfg)
    else:  # a command that signals the daemon (stop, reload): it reads the file itself
        command = getattr(cli, f"cmd_{parsed.command}")
    for codec in ("ascii", "utf-8-sig"):  # (what the commands read with, loaded here too)
        codecs.lookup(codec)
    entry = pwd.getpwnam(user)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            # The descriptors, not the test runner's capture: this process ends with _exit.
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            os.setgroups([])
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            try:
                code = command(parsed)
            except OperatorError as exc:  # as cli.main reports it
                print(f"echod: {exc}", file=sys.stderr)
                code = exc.exit_code
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(out_w)
    os.close(err_w)
    with open(out_r, "rb") as out, open(err_r, "rb") as err:
        stdout, stderr = out.read().decode(), err.read().decode()
    _, status = os.waitpid(pid, 0)
    return subprocess.CompletedProcess(argv, os.waitstatus_to_exitcode(status), stdout, stderr)


def listing(server: Echod) -> list[dict[str, Any]]:
    done = ctl(server, "connections", "--json")
    assert done.returncode == 0, done
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return rows


def held(server: Echod, count: int, proxied: bool = False) -> list[socket.socket]:
    """``count`` connections held open, each having echoed once (behind PROXY, each from a
    client of its own)."""
    socks = []
    for i in range(count):
        sock = server.connect()
        data = b"hi %d" % i
        if proxied:
            client = (CLIENT[0], CLIENT[1] + i)
            sock.sendall(v1_header(client, ("127.0.0.1", server.port)))
        sock.sendall(data)
        assert recv_exactly(sock, len(data)) == data
        socks.append(sock)
    return socks


def ended(sock: socket.socket) -> bool:
    sock.settimeout(DEADLINE)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize(("mode", "extra"), VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("proxied", [False, True], ids=["direct", "proxy"])
def test_the_listing_is_the_open_events_and_a_cut_ends_one(
    tmp_path: Path, mode: str, extra: dict[str, Any], proxied: bool
) -> None:
    """`echod connections` lists every open connection with what its conn_open event says
    (the real client and the balancer, the local port, the serving pid, process and thread
    names, the worker) plus its age and the kernel's counts; `echod cut` ends one (reason
    cut, counted), the others echo on; an id not open is an error naming it (exit 65)."""
    metrics = free_port()
    settings = {**extra, **(PROXY if proxied else {})}
    with daemon(tmp_path, mode=mode, workers=2, metrics=f"127.0.0.1:{metrics}",
                **settings) as server:  # fmt: skip
        wait_workers(server, 2)
        socks = held(server, 4, proxied)
        opens = {e["conn_id"]: e for e in server.wait_event("conn_open", count=4) and
                 server.events("conn_open")}  # fmt: skip
        rows = {row["conn_id"]: row for row in listing(server)}
        assert rows.keys() == opens.keys()
        workers = {e["worker_pid"]: e["worker"] for e in server.events("worker_state")}
        for conn_id, row in rows.items():
            event = opens[conn_id]
            assert row["client"] == f"{event['peer']}:{event['peer_port']}"
            if proxied:
                assert row["balancer"] == f"127.0.0.1:{event['proxy_peer_port']}"
            else:
                assert row["balancer"] is None
            assert row["local"] == f"127.0.0.1:{event['local_port']}"
            assert (row["pid"], row["process"]) == (event["pid"], event["process"])
            assert row["thread"] == event["thread_name"]
            assert row["native_thread_id"] == event["native_thread_id"]
            serving_worker = event["ppid"] if mode == "process" else event["pid"]
            assert (row["worker_pid"], row["worker"]) == (serving_worker, workers[serving_worker])
            assert row["generation"] == 1
            assert row["age"] >= 0 and row["idle"] is not None
            assert row["bytes_out"] >= len(b"hi 0")
        victim_id = sorted(rows)[0]
        victim = next(s for s in socks if f"{s.getsockname()[1]}" in
                      json.dumps(opens[victim_id]))  # fmt: skip
        done = ctl(server, "cut", victim_id)
        assert done.returncode == 0, done
        assert done.stdout == f"echod: cut {victim_id}\n"
        assert ended(victim)
        close = server.wait_event("conn_close", lambda e: e["conn_id"] == victim_id)
        assert close["reason"] == "cut"
        for sock in socks:
            if sock is not victim:
                assert echo_roundtrip_open(sock, b"still") == b"still"
        wait_for(lambda: 'echod_connections_closed_total{reason="cut"} 1.0'
                 in http_get(metrics, "/metrics")[1], what="the cut counted")  # fmt: skip
        again = ctl(server, "cut", victim_id, "99-1")
        assert again.returncode == exitcodes.EX_DATAERR, again
        assert again.stderr == f"echod: no open connection {victim_id}, 99-1\n"
        assert victim_id not in {row["conn_id"] for row in listing(server)}
        for sock in socks:
            sock.close()


def echo_roundtrip_open(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    return recv_exactly(sock, len(data))


@pytest.mark.parametrize("mode", ["thread", "async"])
def test_a_listing_larger_than_the_control_queue_comes_whole(tmp_path: Path, mode: str) -> None:
    """1,500 connections list as about 600 KB of JSON: more packets than the worker's
    control queue holds at once. The worker waits for room instead of dropping parts (it
    did, in async mode, whose socket does not block: 1,325 rows of 10,001)."""
    count = 1500
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < count + 200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard}: {count} connections need more")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, count + 200), hard))
    try:
        with daemon(tmp_path, mode=mode, max_connections=count + 10, backlog=2048,
                    log={"connections": "off"}) as server:  # fmt: skip
            wait_workers(server, 1)
            socks = held(server, count)
            try:
                rows = listing(server)
                assert len(rows) == count
                assert len({row["conn_id"] for row in rows}) == count
            finally:
                for sock in socks:
                    sock.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("mode", MODES)
def test_drain_and_resume_flip_the_health_check_while_serving(tmp_path: Path, mode: str) -> None:
    """`echod drain`: /healthz answers 503 and the agent check drain while a held client
    echoes on and new clients are served; `echod status` says so; `echod resume` turns it
    back; a stop after a drain does not wait drain_delay again."""
    metrics = free_port()
    with daemon(tmp_path, mode=mode, metrics=f"127.0.0.1:{metrics}", drain_delay=30) as server:
        (sock,) = held(server, 1)
        assert http_get(metrics, "/healthz")[0] == 200
        done = ctl(server, "drain")
        assert (done.returncode, done.stdout) == (
            0, "echod: draining: health checks answer 503\n"
        )  # fmt: skip
        assert http_get(metrics, "/healthz")[0] == 503
        assert agent(metrics) == b"drain\n"
        assert echo_roundtrip_open(sock, b"during") == b"during"
        with server.connect() as fresh:
            assert echo_roundtrip(fresh, b"new client") == b"new client"
        status = ctl(server, "status")
        assert "drain:       on" in status.stdout
        assert ctl(server, "drain").stdout == (
            "echod: draining (already): health checks answer 503\n"
        )
        assert ctl(server, "resume").returncode == 0
        assert http_get(metrics, "/healthz")[0] == 200
        assert agent(metrics) == b"up ready\n"
        assert ctl(server, "drain").returncode == 0
        sock.close()
        started = time.monotonic()
        assert server.stop() == 0
        assert time.monotonic() - started < 15  # not the 30 s drain_delay
        assert not server.events("draining")


def agent(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"agent\n")
        return sock.recv(100)


@pytest.mark.parametrize("mode", MODES)
def test_set_changes_what_the_next_client_meets_and_a_reload_reverts(
    tmp_path: Path, mode: str
) -> None:
    """`echod set max_connections_per_ip 1`: a second connection from one address is
    refused at once (in every worker); `echod status` shows the value beside the file's;
    a reload returns to the file's and says so; a value its rule refuses is exit 64."""
    with daemon(tmp_path, mode=mode, workers=2, overload="refuse") as server:
        wait_workers(server, 2)
        done = ctl(server, "set", "max_connections_per_ip", "1")
        assert done.returncode == 0, done
        assert done.stdout == (
            "echod: max_connections_per_ip is 1 until the next reload (the file says 0)\n"
        )
        assert "set:         max_connections_per_ip 1 (the file: 0)" in ctl(server, "status").stdout
        first = held(server, 1)
        second = server.connect(source="127.0.0.1")
        second.sendall(b"x")
        assert ended(second)
        first[0].close()
        bad = ctl(server, "set", "max_connections_per_ip", "-1")
        assert bad.returncode == exitcodes.EX_USAGE
        server.signal(1)  # SIGHUP
        cleared = server.wait_event("limits_cleared")
        assert cleared["cleared"] == {"max_connections_per_ip": 1}
        wait_for(lambda: "set:" not in ctl(server, "status").stdout, what="status without")
        wait_for(lambda: server.events("worker_state") and
                 len([e for e in server.events("worker_state")
                      if e["state"] == "running" and e["generation"] == 2]) == 2,
                 what="the new generation")  # fmt: skip
        socks = [server.connect() for _ in range(3)]
        for sock in socks:
            assert echo_roundtrip_open(sock, b"ok") == b"ok"
            sock.close()


def test_a_tiny_connection_rate_set_at_run_time_is_still_a_limit(tmp_path: Path) -> None:
    """`echod set connection_rate 0.0001` (one connection in under three hours): the
    workers are told a rate, not none (the rate travels in thousandths, and this one is
    below half of one): of 5 clients at once, at most 2 are served, the rest refused."""
    with daemon(tmp_path, overload="refuse") as server:
        done = ctl(server, "set", "connection_rate", "0.0001")
        assert done.returncode == 0, done
        socks = [server.connect() for _ in range(5)]
        refused = server.wait_event("refused")
        assert refused["connection_rate"] >= 3, refused
        assert len(server.events("conn_open")) <= 2
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("proxied", [False, True], ids=["direct", "proxy"])
def test_a_reload_that_denies_a_client_cuts_its_open_connection(
    tmp_path: Path, mode: str, proxied: bool
) -> None:
    """A reload whose deny list names an open connection's client cuts it (reason
    access_list); behind PROXY the real client is what is judged; others echo on."""
    denied = CLIENT[0] if proxied else "127.0.0.9"
    settings = PROXY if proxied else {}
    with daemon(tmp_path, mode=mode, **settings) as server:
        if proxied:
            victim, other = held(server, 2, proxied=True)
            # The second held connection is another client: allow it back.
            server.write_config(deny=[f"{CLIENT[0]}/32"], allow=[])
            victim_of = CLIENT[0]
        else:
            victim = server.connect(source=denied)
            other = server.connect(source="127.0.0.2")
            for sock in (victim, other):
                assert echo_roundtrip_open(sock, b"x") == b"x"
            server.write_config(deny=[denied])
            victim_of = denied
        server.signal(1)  # SIGHUP
        close = server.wait_event("conn_close", lambda e: e["reason"] == "access_list")
        assert close["peer"] == victim_of
        assert ended(victim)
        if not proxied:
            assert echo_roundtrip_open(other, b"on") == b"on"
        other.close()


@pytest.mark.parametrize("mode", MODES)
def test_retire_timeout_ends_what_a_talking_client_would_keep(tmp_path: Path, mode: str) -> None:
    """After a reload, a client that keeps talking keeps its old worker no longer than
    retire_timeout: then it is cut (reason retired) and the old worker exits."""
    with daemon(tmp_path, mode=mode, retire_timeout=1.5, idle_timeout=0) as server:
        (sock,) = held(server, 1)
        old = server.wait_event("conn_open")["pid" if mode != "process" else "ppid"]
        server.write_config(retire_timeout=1.5, idle_timeout=0, buffer_size=4096)
        server.signal(1)
        server.wait_event("worker_state", lambda e: e["state"] == "retiring")
        retired_at = time.monotonic()
        alive = True
        for i in range(200):  # talks every 50 ms; bounded
            try:
                echo_roundtrip_open(sock, b"%d" % i)
            except (ConnectionError, OSError):
                alive = False
                break
            if server.events("conn_close"):
                break
            time.sleep(0.05)  # the client's own pace, not a synchronisation
        close = server.wait_event("conn_close")
        assert close["reason"] == "retired"
        assert 1.0 < time.monotonic() - retired_at < 10
        assert not alive or ended(sock)
        server.wait_event(
            "worker_state", lambda e: e["worker_pid"] == old and e["state"] == "exited"
        )


@pytest.mark.parametrize("mode", MODES)
def test_max_connection_age_ends_a_connection_after_its_echo(tmp_path: Path, mode: str) -> None:
    """A connection older than max_connection_age ends (reason max_age), everything it sent
    echoed first, no later than the age."""
    with daemon(tmp_path, mode=mode, max_connection_age=1.0, idle_timeout=0) as server:
        sock = server.connect()
        started = time.monotonic()
        sock.sendall(b"a" * 1000)
        got = recv_exactly(sock, 1000)
        assert got == b"a" * 1000
        assert ended(sock)
        lived = time.monotonic() - started
        close = server.wait_event("conn_close")
        assert close["reason"] == "max_age"
        assert close["bytes_in"] == close["bytes_out"] == 1000
        # Ended at its age (spread over the last tenth), not by anything later: the upper
        # bound leaves a loaded machine time to wake up and close.
        assert 0.85 <= close["duration"] < 3, close
        assert lived < 3


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may enter (tmp_path's parents are root's alone): the daemon's
    files there are guarded by their own modes only."""
    path = Path(tempfile.mkdtemp(prefix="echod-ctl-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_the_control_socket_refuses_another_user(open_dir: Path) -> None:
    """Run as nobody, the commands cannot use the socket (mode 0600): exit 77, saying so."""
    with daemon(open_dir) as server:
        server.config_path.chmod(0o644)
        path = open_dir / "echod.sock"
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        done = ctl(server, "connections", user="nobody")
        assert done.returncode == exitcodes.EX_NOPERM, done
        assert done.stderr == f"echod: not allowed to use {path}\n"


def test_stop_and_reload_by_another_user_are_refused_plainly(open_dir: Path) -> None:
    """Run as nobody, `echod stop` and `echod reload` may not signal a daemon of root's:
    exit 77, saying so (no traceback); the daemon serves on."""
    with daemon(open_dir) as server:
        server.config_path.chmod(0o644)
        for command in ("stop", "reload"):
            done = ctl(server, command, user="nobody")
            assert done.returncode == exitcodes.EX_NOPERM, done
            assert done.stderr == (
                f"echod: not permitted to signal pid {server.pid}: it runs as another user; "
                "run this as root or as that user\n"
            )
        with server.connect() as sock:
            assert echo_roundtrip(sock, b"still here") == b"still here"


def test_a_control_group_lets_its_members_in(open_dir: Path) -> None:
    """With control_group, the socket is 0660 and of that group; a process of another user
    in that group passes the credentials check too, and is logged as itself."""
    group = pwd.getpwnam("nobody").pw_gid
    with daemon(open_dir, control_group=group) as server:
        server.config_path.chmod(0o644)
        path = open_dir / "echod.sock"
        assert oct(path.stat().st_mode & 0o777) == "0o660"
        assert path.stat().st_gid == group
        done = ctl(server, "connections", user="nobody")
        assert done.returncode == 0, done
        command = server.wait_event("control_command", lambda e: e["peer_uid"] != 0)
        assert command["peer_uid"] == pwd.getpwnam("nobody").pw_uid


def raw(path: Path, data: bytes, wait: float = 10.0) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(wait)
        sock.connect(str(path))
        if data:
            sock.sendall(data)
        chunks = []
        for _ in range(100):
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def test_malformed_oversized_and_silent_clients(tmp_path: Path) -> None:
    """A request that is not one is answered with the reason (exit 64 for the command); an
    oversized one likewise; a client that sends nothing is closed at its deadline; each is
    logged with the peer; the daemon serves on."""
    with daemon(tmp_path) as server:
        path = tmp_path / "echod.sock"
        reply = json.loads(raw(path, b"frobnicate\n"))
        assert reply == {
            "ok": False,
            "error": "no command 'frobnicate' (one of connections, cut, drain, resume, set)",
            "exit_code": 64,
        }
        reply = json.loads(raw(path, b"cut ../../etc\n"))
        assert "not a connection id" in reply["error"]
        reply = json.loads(raw(path, b"x" * 10000))
        assert reply["error"] == "a request is at most 4096 bytes"
        started = time.monotonic()
        assert raw(path, b"", wait=15) == b""  # closed without an answer
        assert 4 <= time.monotonic() - started < 12
        logged = server.events("control_command")
        assert len([e for e in logged if e.get("error")]) == 3
        assert all(e["peer_pid"] > 0 and e["peer_uid"] == 0 for e in logged)
        with server.connect() as sock:
            assert echo_roundtrip(sock, b"fine") == b"fine"
