"""Test support: a cgroup of the test's own, to put a real echod under a task or memory limit.

Works on cgroup v1 (a hierarchy per controller, e.g. /sys/fs/cgroup/pids and
/sys/fs/cgroup/memory, also in the hybrid layout) and on v2 (the unified hierarchy). Where
each controller is mounted is read from /proc/self/mountinfo, not assumed.

Where the cgroup is made: directly below the root of each hierarchy. On v2 that is the one
place that works with and without systemd as PID 1 for root: the root cgroup is exempt from
the "no processes in an inner cgroup" rule, so its ``cgroup.subtree_control`` can enable the
controller although processes live in it (systemd enables memory and pids there itself;
without systemd the helper enables what is missing). Below the test's own cgroup it would
fail wherever that cgroup has processes, which is where a test runs. A cgroup of one test is
named after the test's pid and a serial, and removed afterwards.

Nothing here kills by name: a cgroup's processes are the daemon a test put there and its
descendants, killed by pid, and only if the test's own clean-up left any.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.support import wait_for

_serial = itertools.count(1)


class Unavailable(Exception):
    """No cgroup with the wanted controllers can be made here; the message says why."""


def _mounts() -> tuple[dict[str, Path], Path | None]:
    """The v1 hierarchy of each controller, and the v2 mount (None: none)."""
    v1: dict[str, Path] = {}
    v2: Path | None = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) < 5 or len(tail) < 3:
                continue
            mount_root, point, fstype = fields[3], Path(fields[4]), tail[0]
            if mount_root != "/":
                continue  # a bind mount of a sub-tree: its root is not the hierarchy's
            if fstype == "cgroup2" and v2 is None:
                v2 = point
            elif fstype == "cgroup":
                for option in tail[2].split(","):
                    v1.setdefault(option, point)
    return v1, v2


def _read(path: Path) -> str:
    return path.read_text().strip()


def _write(path: Path, value: str) -> None:
    path.write_text(value)


class Cgroup:
    """One cgroup (one directory per hierarchy that holds one of ``controllers``).

    Methods for the caller: :meth:`create` (raises :class:`Unavailable`), :meth:`join_fn` (a
    ``preexec_fn`` that puts the started process in, before it forks anything), :meth:`add`,
    the limits and counts, and :meth:`remove`.
    """

    def __init__(self, controllers: tuple[str, ...]) -> None:
        self.controllers = controllers
        self.name = f"echod-test-{os.getpid()}-{next(_serial)}"
        #: controller -> the cgroup's directory in that controller's hierarchy
        self.dirs: dict[str, Path] = {}
        self.version = 0

    def create(self) -> Cgroup:
        if os.geteuid() != 0:
            raise Unavailable("cgroups need root here (no delegated sub-tree is looked for)")
        v1, v2 = _mounts()
        try:
            if all(c in v1 for c in self.controllers):
                self.version = 1
                for controller in self.controllers:
                    path = v1[controller] / self.name
                    path.mkdir()
                    self.dirs[controller] = path
            elif v2 is not None:
                self.version = 2
                self._enable_v2(v2)
                path = v2 / self.name
                path.mkdir()
                self.dirs = dict.fromkeys(self.controllers, path)
            else:
                raise Unavailable(f"no cgroup hierarchy has {', '.join(self.controllers)}")
        except OSError as exc:
            self.remove()
            raise Unavailable(f"cannot create a cgroup: {exc}") from exc
        return self

    def _enable_v2(self, root: Path) -> None:
        available = _read(root / "cgroup.controllers").split()
        missing = [c for c in self.controllers if c not in available]
        if missing:
            raise Unavailable(f"cgroup v2 at {root} lacks the {', '.join(missing)} controller")
        enabled = _read(root / "cgroup.subtree_control").split()
        for controller in self.controllers:
            if controller not in enabled:
                _write(root / "cgroup.subtree_control", f"+{controller}")

    def _file(self, controller: str, name: str) -> Path:
        return self.dirs[controller] / name

    def _proc_files(self) -> list[str]:
        return sorted({str(d / "cgroup.procs") for d in self.dirs.values()})

    # -- processes -------------------------------------------------------------------------

    def join_fn(self, then: Callable[[], None] | None = None) -> Callable[[], None]:
        """A ``preexec_fn``: the new process joins the cgroup before it runs (so everything it
        forks is born inside), then runs ``then`` (e.g. a setrlimit)."""
        files = self._proc_files()

        def join() -> None:
            pid = str(os.getpid()).encode()
            for name in files:
                fd = os.open(name, os.O_WRONLY)
                try:
                    os.write(fd, pid)
                finally:
                    os.close(fd)
            if then is not None:
                then()

        return join

    def add(self, pid: int) -> None:
        for name in self._proc_files():
            _write(Path(name), str(pid))

    def pids(self) -> list[int]:
        found: set[int] = set()
        for name in self._proc_files():
            with contextlib.suppress(FileNotFoundError):
                found.update(int(p) for p in Path(name).read_text().split())
        return sorted(found)

    def tasks(self) -> int:
        """Tasks (threads included) in the cgroup now: what pids.max counts."""
        return int(_read(self._file("pids", "pids.current")))

    # -- limits and counts -----------------------------------------------------------------

    def set_pids_max(self, limit: int | None) -> None:
        _write(self._file("pids", "pids.max"), "max" if limit is None else str(limit))

    def pids_max_hits(self) -> int:
        """How many forks or thread starts pids.max has failed so far."""
        return _key_count(self._file("pids", "pids.events"), "max")

    def set_memory_max(self, limit: int) -> None:
        """Limit memory to ``limit`` bytes, with no swap to escape to."""
        if self.version == 1:
            _write(self._file("memory", "memory.limit_in_bytes"), str(limit))
            with contextlib.suppress(FileNotFoundError):  # no swap accounting: no swap limit
                _write(self._file("memory", "memory.memsw.limit_in_bytes"), str(limit))
        else:
            _write(self._file("memory", "memory.max"), str(limit))
            with contextlib.suppress(FileNotFoundError):
                _write(self._file("memory", "memory.swap.max"), "0")

    def memory_usage(self) -> int:
        name = "memory.usage_in_bytes" if self.version == 1 else "memory.current"
        return int(_read(self._file("memory", name)))

    def oom_kills(self) -> int:
        """How many processes the OOM killer has killed in this cgroup."""
        if self.version == 1:
            return _key_count(self._file("memory", "memory.oom_control"), "oom_kill")
        return _key_count(self._file("memory", "memory.events"), "oom_kill")

    # -- clean-up --------------------------------------------------------------------------

    def remove(self, timeout: float = 10.0) -> None:
        """Kill (by pid) what the test left in the cgroup, then remove its directories."""
        if not self.dirs:
            return
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.controllers and "pids" in self.dirs:
            with contextlib.suppress(OSError):
                self.set_pids_max(None)  # let nothing be stuck for want of a task
        wait_for(lambda: not self.pids(), timeout, what=f"cgroup {self.name} empty")
        for path in set(self.dirs.values()):
            wait_for(lambda path=path: _rmdir(path), timeout, what=f"rmdir {path}")
        self.dirs = {}


def _rmdir(path: Path) -> bool:
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return False  # a task still leaving
        raise
    return True


def _key_count(path: Path, key: str) -> int:
    """The value of ``key`` in a flat-keyed cgroup file (``key value`` lines); 0 if absent."""
    for line in path.read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


@contextlib.contextmanager
def cgroup(*controllers: str) -> Iterator[Cgroup]:
    """A fresh cgroup with ``controllers``, removed afterwards; skips the test without one."""
    import pytest

    group = Cgroup(controllers)
    try:
        group.create()
    except Unavailable as exc:
        pytest.skip(str(exc))
    try:
        yield group
    finally:
        group.remove()
