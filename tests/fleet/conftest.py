"""Fixtures for the fleet tests: echod hosts as network namespaces behind a real HAProxy,
watched by a real Prometheus.

They need root (ip netns), HAProxy and Prometheus (.ci/run installs them): a machine without
them fails these tests with the reason, it never skips them. Whatever happens, teardown kills
every process it started and removes every namespace, and the test fails if any is left.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fleet.netns import Network, pids_in
from tests.fleet.services import program
from tests.support import pid_gone

HOSTS = 3
#: How long a process killed with its group may take to finish exiting (a worker with many
#: threads, on a busy machine) before the namespaces' check calls it a stray.
EXIT_WAIT = 5.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.timeout(180))


@pytest.fixture
def network() -> Iterator[Network]:
    """Namespaces for HOSTS hosts, the balancer and the clients; removed at the end, with
    whatever runs in them, and checked gone."""
    if os.geteuid() != 0:
        pytest.fail("the fleet tests need root for ip netns (CI runs as root)")
    for name in ("haproxy", "prometheus", "ip"):
        program(name)
    net = Network(HOSTS)
    try:
        yield net.create()
    finally:
        # What still runs inside once the test's own processes were killed (the `started`
        # fixture ends first) escaped them: destroy() kills it, and the test fails.
        stray = still_inside(net.created, EXIT_WAIT)
        net.destroy()
        assert not net.leftovers(), f"namespaces left behind: {net.leftovers()}"
        assert not any(stray.values()), f"processes left in the namespaces: {stray}"


def still_inside(names: list[str], timeout: float) -> dict[str, list[int]]:
    """The processes in the namespaces ``names`` once those seen there have exited, or
    ``timeout`` seconds later: SIGKILL is sent to a whole group at once, but each of its
    processes leaves its namespace only when it has finished exiting."""
    seen = [pid for name in names for pid in pids_in(name)]
    poller = select.poll()
    waiting: set[int] = set()
    try:
        for pid in seen:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            waiting.add(fd)
            poller.register(fd, select.POLLIN)  # readable once the process has exited
        deadline = time.monotonic() + timeout
        pending = set(waiting)
        while pending and (left := deadline - time.monotonic()) > 0:
            for fd, _events in poller.poll(left * 1000):
                poller.unregister(fd)
                pending.discard(fd)
    finally:
        for fd in waiting:
            os.close(fd)
    return {name: pids_in(name) for name in names}


class Started:
    """Processes a test started, checked gone after their kill."""

    def __init__(self) -> None:
        self.items: list[object] = []

    def add(self, item: object) -> object:
        self.items.append(item)
        return item

    def kill(self) -> list[int]:
        pids = []
        for item in reversed(self.items):
            proc = getattr(item, "proc", None)
            if proc is not None:
                pids.append(proc.pid)
            item.kill()  # type: ignore[attr-defined]
        return [pid for pid in pids if not pid_gone(pid)]


@pytest.fixture
def started(network: Network) -> Iterator[Started]:
    """Where a test registers what it starts; everything is killed by process group before
    the namespaces go, and must be gone."""
    registry = Started()
    try:
        yield registry
    finally:
        alive = registry.kill()
        assert not alive, f"processes left behind: {alive}"
