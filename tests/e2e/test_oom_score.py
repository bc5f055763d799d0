"""The OOM killer's order under the shipped unit and a real systemd: the supervisor at the
unit's OOMScoreAdjust, each worker (and the connection source it forks connections from) 300
above it, each connection process 600 above it, raised by echod itself as the unprivileged
dynamic user.

systemd lowers the supervisor's score only where it may (CAP_SYS_RESOURCE); in a container
without it (systemd-nspawn's default) it leaves it at 0 and says so at debug. The offsets hold
either way.
"""

from __future__ import annotations

from tests.e2e import container as ct
from tests.e2e.test_systemd import BASE_CONFIG, echod, prop, start, write_config

__all__ = ["echod"]  # the fixture, from the systemd tests

CAP_SYS_RESOURCE = 24

# Run inside: connect, get an echo, and print the OOM scores of the connection's process and
# of the connection source it was forked from (the worker's child, echod.forkserver) while the
# connection is open: "<role> <score>" lines.
CLIENT = r"""
import os, socket, sys
worker = sys.argv[1]
sock = socket.create_connection(("127.0.0.1", 9999), timeout=30)
sock.sendall(b"x")
assert sock.recv(1) == b"x"
def parent(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1].split()[1]
    except OSError:
        return None
def children(of):
    return [pid for pid in os.listdir("/proc") if pid.isdigit() and parent(pid) == of]
def adj(pid):
    with open(f"/proc/{pid}/oom_score_adj") as f:
        return f.read().strip()
for child in children(worker):
    below = children(child)
    if below:
        print("source", adj(child))
        for pid in below:
            print("connection", adj(pid))
    else:
        print("connection", adj(child))
"""


def score(container: ct.Container, pid: str) -> int:
    return int(container.path(f"/proc/{pid}/oom_score_adj").read_text())


def may_lower_scores(container: ct.Container) -> bool:
    """Whether systemd in the container holds CAP_SYS_RESOURCE (lowering a score needs it)."""
    status = container.path("/proc/1/status").read_text()
    bounding = next(line for line in status.splitlines() if line.startswith("CapBnd:"))
    return bool(int(bounding.split()[1], 16) >> CAP_SYS_RESOURCE & 1)


def test_each_level_scores_above_the_one_that_supervises_it(echod: ct.Container) -> None:
    """Process mode under echod.service: worker = its connection source = supervisor + 300,
    connection process = supervisor + 600, and the supervisor at the unit's -300 where
    systemd may lower it."""
    write_config(echod, {**BASE_CONFIG, "mode": "process"})
    start(echod)
    supervisor = prop(echod, "MainPID")
    (worker,) = echod.run("pgrep", "-P", supervisor).stdout.split()
    lines = echod.run("python3", "-c", CLIENT, worker).stdout.splitlines()
    scores = [(role, int(value)) for role, value in (line.split() for line in lines)]
    base = score(echod, supervisor)
    ct.log(f"OOMScoreAdjust={prop(echod, 'OOMScoreAdjust')}: supervisor {base}")
    assert int(prop(echod, "OOMScoreAdjust")) == -300
    assert base == (-300 if may_lower_scores(echod) else 0)
    assert score(echod, worker) == base + 300
    assert scores == [("source", base + 300), ("connection", base + 600)]
