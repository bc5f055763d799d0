"""Hosts as network namespaces: a balancer namespace ("lb") joined by a veth pair to each echod
host ("h1" ... "hN") and to a client namespace ("c").

Every name starts with ``echodf-<pid of the test process>-``, so that runs in parallel never
meet, and a run that crashed is recognised (its pid is gone) and cleaned by the next. The
addresses are private (10.123.0.0/16) and exist inside these namespaces only: nothing is
added to the root namespace, not even an interface.

    lb:  10.123.N.1/24 on "hN" (to host N), 10.123.200.1/24 on "c" (to the clients)
    hN:  10.123.N.2/24 on "eth0"
    c:   10.123.200.2/24 on "eth0"

The test process reaches into a namespace without a subprocess: :func:`run_in` runs a
function on a thread that first joins the namespace (setns(2) changes the calling thread
only), and a socket keeps the namespace it was created in.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import threading
from collections.abc import Callable
from typing import Any, TypeVar

PREFIX = "echodf-"
CLONE_NEWNET = 0x40000000
CLIENT_NET = 200

T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)


def ip(*args: str) -> str:
    """Run ``ip ARGS``; its output, or an AssertionError with its message."""
    result = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=20, check=False
    )
    if result.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def namespaces() -> list[str]:
    """Every network namespace name on the machine."""
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def pids_in(name: str) -> list[int]:
    """The processes that live in namespace ``name``."""
    try:
        return [int(p) for p in ip("netns", "pids", name).split()]
    except AssertionError:
        return []  # already gone


def kill_inside(name: str) -> None:
    """SIGKILL what is left in one of our namespaces: only what this harness started can be
    there, as nobody else knows the name."""
    for pid in pids_in(name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def remove(name: str) -> None:
    kill_inside(name)
    with contextlib.suppress(AssertionError):
        ip("netns", "del", name)


def clean_stale() -> list[str]:
    """Remove the namespaces of earlier runs whose test process is gone; return their names."""
    removed = []
    for name in namespaces():
        match = re.match(rf"{PREFIX}(\d+)-", name)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            remove(name)
            removed.append(name)
    return removed


def run_in(namespace: str, function: Callable[[], T], timeout: float = 30.0) -> T:
    """``function()`` run on a thread inside ``namespace``; its result, or its exception."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            enter(namespace)
            outcome["value"] = function()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"in-{namespace}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"call in {namespace} took more than {timeout} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]  # type: ignore[no-any-return]


def enter(namespace: str) -> None:
    """Move the calling thread into ``namespace`` (for good: use a thread of its own)."""
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {namespace}: {os.strerror(err)}")
    finally:
        os.close(fd)


class Network:
    """The namespaces of one run. :meth:`create` builds them; :meth:`destroy` removes them and
    whatever still runs inside, and is safe to call after a partial create."""

    def __init__(self, hosts: int) -> None:
        self.hosts = hosts
        self.prefix = f"{PREFIX}{os.getpid()}-"
        self.lb = self.prefix + "lb"
        self.client = self.prefix + "c"
        self.created: list[str] = []

    def host(self, n: int) -> str:
        """The namespace of host ``n`` (1-based)."""
        return f"{self.prefix}h{n}"

    @staticmethod
    def host_address(n: int) -> str:
        return f"10.123.{n}.2"

    @staticmethod
    def lb_address(n: int) -> str:
        """The balancer's address on host ``n``'s link: what host ``n`` sees as its peer."""
        return f"10.123.{n}.1"

    lb_front = f"10.123.{CLIENT_NET}.1"
    client_address = f"10.123.{CLIENT_NET}.2"

    def create(self) -> Network:
        clean_stale()
        for name in [self.lb, self.client, *(self.host(n) for n in range(1, self.hosts + 1))]:
            ip("netns", "add", name)
            self.created.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        for n in range(1, self.hosts + 1):
            self._link(f"h{n}", self.host(n), n)
        self._link("c", self.client, CLIENT_NET)
        return self

    def _link(self, lb_side: str, other: str, net: int) -> None:
        # Created inside lb with its peer moved straight into the other namespace: short,
        # fixed interface names, never in the root namespace.
        ip("-n", self.lb, "link", "add", lb_side, "type", "veth", "peer", "name", "eth0",
           "netns", other)
        ip("-n", self.lb, "addr", "add", f"10.123.{net}.1/24", "dev", lb_side)
        ip("-n", self.lb, "link", "set", lb_side, "up")
        ip("-n", other, "addr", "add", f"10.123.{net}.2/24", "dev", "eth0")
        ip("-n", other, "link", "set", "eth0", "up")

    def destroy(self) -> None:
        for name in reversed(self.created):
            remove(name)
        self.created.clear()

    def leftovers(self) -> list[str]:
        """Our namespaces that still exist."""
        return [name for name in namespaces() if name.startswith(self.prefix)]
