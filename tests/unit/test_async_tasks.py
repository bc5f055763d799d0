"""The async worker's loop starts a connection's Task eagerly (Python 3.12 and later)."""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import Any

import pytest

from echod.eventsource import new_event_loop
from echod.workers.async_ import eager_tasks

EAGER = sys.version_info >= (3, 12)


@pytest.fixture(params=["uvloop", "asyncio"])
def loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    if request.param == "asyncio":
        monkeypatch.setenv("ECHOD_NO_UVLOOP", "1")
    made, name, _version = new_event_loop()
    if name != request.param:
        made.close()
        pytest.skip(f"{request.param} is not installed")
    yield made
    made.close()


class Recorder(asyncio.Protocol):
    def __init__(self, seen: list[str]) -> None:
        self.seen = seen

    def connection_made(self, transport: Any) -> None:
        self.seen.append("connection_made")

    def data_received(self, data: bytes) -> None:
        self.seen.append(f"data {data.decode()}")
        stop_when_done(self.seen)


def stop_when_done(seen: list[str]) -> None:
    if "done" in seen and "data early" in seen:
        asyncio.get_running_loop().stop()


def test_a_connection_task_makes_its_transport_at_once_and_keeps_its_order(loop: Any) -> None:
    """Started from a reader's callback, as the acceptor starts it: with eager tasks (3.12+)
    the transport exists when create_task returns, and on every Python connection_made runs
    from the loop afterwards, before any read, and the done callback after it."""
    assert eager_tasks(loop) is EAGER
    seen: list[str] = []
    ours, theirs = socket.socketpair()
    theirs.sendall(b"early")  # queued before the transport exists

    def start() -> None:
        task = loop.create_task(loop.connect_accepted_socket(made, ours))
        task.add_done_callback(lambda _t: (seen.append("done"), stop_when_done(seen)))
        seen.append("started")

    def made() -> Recorder:
        seen.append("protocol")
        return Recorder(seen)

    try:
        loop.call_soon(start)
        loop.run_forever()
    finally:
        theirs.close()
    first = ["protocol", "started"] if EAGER else ["started", "protocol"]
    assert seen[:2] == first
    assert seen[2:] in (
        ["connection_made", "done", "data early"],
        ["connection_made", "data early", "done"],
    )


@pytest.mark.skipif(EAGER, reason="Python 3.12 and later have eager tasks")
def test_before_3_12_the_loop_keeps_its_own_task_factory(loop: Any) -> None:
    """On Python 3.11 nothing changes: no task factory is set."""
    assert eager_tasks(loop) is False
    assert loop.get_task_factory() is None


@pytest.mark.skipif(not EAGER, reason="eager tasks need Python 3.12")
def test_the_eager_factory_takes_the_eager_start_uvloop_passes(loop: Any) -> None:
    """uvloop 0.22 and later, on Python 3.13, call the task factory with eager_start=None,
    which asyncio's own eager factory refuses; ours takes it, and the Task still starts at
    once."""
    eager_tasks(loop)
    factory = loop.get_task_factory()
    steps: list[str] = []

    async def step() -> None:
        steps.append("ran")

    async def main() -> None:
        task = factory(loop, step(), context=None, eager_start=None)
        assert steps == ["ran"] and task.done()

    loop.run_until_complete(main())
