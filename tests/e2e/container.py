"""A real systemd booted in a container, for the end-to-end tests.

PID 1 on the test machines is not systemd, so the tests boot one: a Debian root file system
of each release in :data:`RELEASES` (bookworm and trixie, whichever the host runs) made by
``debootstrap`` (cached under :data:`CACHE_DIR`, keyed by release and contents, so only the
first run pays for it), booted by ``systemd-nspawn`` with a private
network, and driven with ``nsenter`` into the container's namespaces (``machinectl`` and
``systemd-run -M`` need a registered machine, which these hosts cannot provide).

Each boot sees its own copy of the cached tree: an overlay with a scratch upper layer
(``--volatile=overlay``; a full copy where overlayfs is missing), so a test can install
packages and edit files without changing the cache, and nothing is copied up front.

The container has no network: the Debian packages that echod's .deb depends on are put
into the root file system when it is built.

The same cache holds a second kind of tree per release, :data:`DEV_INCLUDE`: that
release's python3 with echod's libraries, pytest and lintian, for the core tests against the
release's own packages (``tests/debian-libs.sh``, ``make test-trixie``) and its lintian.

Run ``python3 tests/e2e/container.py boot --suite trixie`` to build (or find) the cached tree
and boot it once, printing how long each step took; ``rootfs --suite S [--dev | --bench]``
prints the tree's path (building it first), ``tarball --suite S`` a base tarball of it for
piuparts.
This module uses only the standard library, so Debian's own python3 runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

#: The Debian releases echod is tested on, oldest first (Debian 12 and 13).
RELEASES: tuple[str, ...] = ("bookworm", "trixie")
#: The release a caller gets when it names none.
SUITE = RELEASES[0]
#: What the root file system holds: enough to boot systemd, and the Debian packages the
#: echod .deb depends on or recommends (there is no network inside to fetch them at install
#: time). man-db lets ``systemd-analyze verify`` check the units' Documentation= pages;
#: logrotate (suggested) lets piuparts check /etc/logrotate.d/echod.
#: What echod needs and uses from the release, in both trees (the .deb's Depends and its
#: Recommends but argcomplete, which only the system tree has: it completes a shell).
ECHOD_PACKAGES: tuple[str, ...] = (
    "python3",
    "python3-yaml",
    "python3-daemon",
    "python3-structlog",
    "python3-prometheus-client",
    "python3-uvloop",
    "python3-setproctitle",
)
INCLUDE: tuple[str, ...] = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "procps",
    *ECHOD_PACKAGES,
    "python3-argcomplete",
    "man-db",
    "logrotate",
)
#: The tree the core tests run in with a release's own python3 and libraries (no systemd
#: boot: a command under nspawn): echod's dependencies, pytest, the tools the integration
#: tests call (ss, groff) and lintian, to check the package with that release's rules.
DEV_INCLUDE: tuple[str, ...] = (
    *ECHOD_PACKAGES,
    "python3-pytest",
    "python3-pytest-timeout",
    "iproute2",
    "procps",
    "groff-base",
    "lintian",
)
#: What the benchmark's smoke test needs on top (the commit, the chart): the whole of
#: ``make test-fast`` runs in DEV_INCLUDE + BENCH_INCLUDE (matplotlib doubles the tree).
BENCH_INCLUDE: tuple[str, ...] = ("git", "python3-matplotlib")
#: Packages debootstrap cannot configure in its own order (lintian's many Perl modules fail
#: with "Failure while configuring base packages" on trixie): apt-get installs them inside
#: the fresh tree afterwards, with the host's network, before the tree is cached.
APT_AFTER = frozenset({"lintian"})
CACHE_DIR = Path(os.environ.get("ECHOD_E2E_CACHE", "/var/cache/echod-e2e"))
#: Where every test container's copy of the tree lives; copies are removed after use.
WORK_DIR = Path(os.environ.get("ECHOD_E2E_WORKDIR", "/var/tmp"))
HOST_TOOLS = {"systemd-nspawn": "systemd-container", "debootstrap": "debootstrap"}
#: What commands run inside see: never the caller's environment (NOTIFY_SOCKET & co.).
INSIDE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}
DEFAULT_MIRROR = "http://deb.debian.org/debian"


class ContainerError(RuntimeError):
    """The container could not be built, booted or driven; the message says why."""


def log(message: str) -> None:
    """Progress on stderr (pytest shows it with -s or on failure)."""
    print(f"[e2e] {message}", file=sys.stderr, flush=True)


# --- the host ------------------------------------------------------------------------------


def ensure_host_tools(tools: dict[str, str] = HOST_TOOLS) -> None:
    """Install the packages of ``tools`` (command: package; by default systemd-nspawn and
    debootstrap) with apt-get if a command is missing."""
    missing = sorted({pkg for tool, pkg in tools.items() if shutil.which(tool) is None})
    if not missing:
        return
    log(f"installing {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Other apt-get runs (a parallel build of the .deb) hold the lock for a while.
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300"]
    install = [*apt, "install", "-y", "--no-install-recommends", *missing]
    result = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        # A fresh machine may have no package lists yet.
        subprocess.run([*apt, "update"], env=env, capture_output=True, check=False)
        result = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ContainerError(f"apt-get install {' '.join(missing)} failed:\n{result.stderr}")


def debian_mirror(suite: str = SUITE, sources_dir: Path = Path("/etc/apt/sources.list.d")) -> str:
    """The Debian mirror apt already uses for ``suite`` (not -security, not -updates).

    A host of one release has no line for the other: the mirror of any release in
    :data:`RELEASES` serves them all.
    """
    candidates = sorted(sources_dir.glob("*.sources")) + sorted(sources_dir.glob("*.list"))
    candidates.append(Path("/etc/apt/sources.list"))
    for wanted in (suite, *RELEASES):
        for path in candidates:
            with contextlib.suppress(OSError):
                text = path.read_text(encoding="utf-8")
                mirror = _mirror_in(text, deb822=path.suffix == ".sources", suite=wanted)
                if mirror:
                    return mirror
    return DEFAULT_MIRROR


def host_release(os_release: Path = Path("/etc/os-release")) -> str | None:
    """The Debian release the host runs (``VERSION_CODENAME``), None if it is not Debian."""
    try:
        fields = dict(
            line.partition("=")[::2] for line in os_release.read_text().splitlines() if line
        )
    except OSError:
        return None
    if fields.get("ID", "").strip('"') != "debian":
        return None
    return fields.get("VERSION_CODENAME", "").strip('"') or None


def _mirror_in(text: str, *, deb822: bool, suite: str) -> str | None:
    if deb822:
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(
                (key.strip().lower(), value.strip())
                for key, _, value in (line.partition(":") for line in stanza.splitlines())
                if not key.startswith("#")
            )
            if (
                "deb" in fields.get("types", "").split()
                and suite in fields.get("suites", "").split()
            ):
                return fields.get("uris", "").split()[0] if fields.get("uris") else None
        return None
    for line in text.splitlines():
        words = re.sub(r"\[[^]]*\]", "", line).split()
        if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
            return words[1]
    return None


# --- the cached root file system -------------------------------------------------------------


def cache_key(include: Sequence[str] = INCLUDE, suite: str = SUITE) -> str:
    """A short digest of what the tree holds; another release or include list is another tree."""
    text = "\n".join([suite, "minbase", *sorted(include)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_rootfs(
    include: Sequence[str] = INCLUDE, timeout: float = 900, suite: str = SUITE
) -> Path:
    """The cached tree of ``suite`` for ``include``, built first if it is not there yet.

    A lock file serialises concurrent builders; a half-built tree is never mistaken for a
    finished one, since the build happens in a scratch folder renamed into place at the end.
    """
    if suite not in RELEASES:
        raise ContainerError(f"unknown release {suite!r}: one of {', '.join(RELEASES)}")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    target = CACHE_DIR / f"{suite}-{cache_key(include, suite)}"
    if target.is_dir():
        return target
    with open(CACHE_DIR / f".lock-{target.name}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_dir():
            return target
        ensure_host_tools()
        scratch = Path(tempfile.mkdtemp(prefix=".build-", dir=CACHE_DIR))
        try:
            first = [p for p in include if p not in APT_AFTER]
            _debootstrap(scratch / "rootfs", first, timeout, suite)
            _apt_install(scratch / "rootfs", [p for p in include if p in APT_AFTER], timeout)
            _prepare(scratch / "rootfs")
            shutil.rmtree(target, ignore_errors=True)
            (scratch / "rootfs").rename(target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def _debootstrap(rootfs: Path, include: Sequence[str], timeout: float, suite: str) -> None:
    mirror = debian_mirror(suite)
    command = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(include)}",
        suite,
        str(rootfs),
        mirror,
    ]
    log(f"building the root file system ({' '.join(command)}); about a minute")
    started = time.monotonic()
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise ContainerError(f"debootstrap took longer than {timeout:.0f} s") from exc
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
        raise ContainerError(f"debootstrap failed ({result.returncode}):\n{tail}")
    log(f"root file system built in {time.monotonic() - started:.0f} s")


def _apt_install(rootfs: Path, packages: Sequence[str], timeout: float) -> None:
    """``apt-get install`` of ``packages`` inside ``rootfs`` (under nspawn, not booted)."""
    if not packages:
        return
    script = (
        "apt-get update -qq && apt-get install -y -qq --no-install-recommends "
        f"{' '.join(packages)} && apt-get clean"
    )
    command = [
        "systemd-nspawn", "--quiet", "-D", str(rootfs), "-M", f"echod-build-{os.getpid()}",
        "--register=no", "--keep-unit", "--pipe", "--setenv=DEBIAN_FRONTEND=noninteractive",
        "--", "sh", "-c", script,
    ]  # fmt: skip
    log(f"installing {' '.join(packages)} in the new tree")
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False,
            stdin=subprocess.DEVNULL, env={"PATH": INSIDE_ENV["PATH"], "LANG": "C.UTF-8"},
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise ContainerError(f"apt-get install took longer than {timeout:.0f} s") from exc
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
        raise ContainerError(f"apt-get install {' '.join(packages)} failed:\n{tail}")


def _prepare(rootfs: Path) -> None:
    """Make the fresh tree boot cleanly and quietly inside nspawn."""
    (rootfs / "etc/hostname").write_text("echod-e2e\n")
    # An empty machine-id is filled in at boot; a missing one makes systemd complain.
    (rootfs / "etc/machine-id").write_text("")
    # No console login prompt: nothing reads it, and it only clutters the boot log.
    (rootfs / "etc/systemd/system").mkdir(parents=True, exist_ok=True)
    for unit in ("console-getty.service", "getty@.service"):
        with contextlib.suppress(FileNotFoundError):
            (rootfs / "etc/systemd/system" / unit).unlink()
        (rootfs / "etc/systemd/system" / unit).symlink_to("/dev/null")
    # debootstrap leaves its download cache behind; the copies need not carry it.
    for deb in (rootfs / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()


def copy_tree(source: Path, destination: Path) -> None:
    """A private copy of the cached tree (reflinked where the file system allows it)."""
    result = subprocess.run(
        ["cp", "-a", "--reflink=auto", str(source), str(destination)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise ContainerError(f"copying {source} failed: {result.stderr}")


# --- a booted container ---------------------------------------------------------------------


class Container:
    """One systemd-nspawn container: :meth:`boot`, :meth:`run` commands, :meth:`poweroff`.

    Construction only records the arguments; :meth:`boot` does the work. Only the nspawn
    process this object started is ever signalled.
    """

    def __init__(
        self, rootfs: Path, name: str, console_log: Path, *, volatile: bool = False
    ) -> None:
        """``volatile``: boot on an overlay of ``rootfs`` and discard all changes at exit."""
        self.rootfs = rootfs
        self.name = name
        self.console_log = console_log
        self.volatile = volatile
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None
        self.boot_seconds: float | None = None

    # Methods for the caller.

    def boot(self, timeout: float = 60) -> None:
        """Start the container and wait until systemd says the system is up.

        Raises :class:`ContainerError` (with the console output) if it does not come up.
        """
        started = time.monotonic()
        command = [
            "systemd-nspawn",
            "-D",
            str(self.rootfs),
            "-M",
            self.name,
            "--register=no",
            "--keep-unit",
            "--private-network",
            "--console=pipe",
            *(["--volatile=overlay"] if self.volatile else []),
            "-b",
        ]
        with open(self.console_log, "wb") as console:
            self.nspawn = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env={"PATH": INSIDE_ENV["PATH"], "LANG": "C.UTF-8"},
                start_new_session=True,
            )
        deadline = started + timeout
        self.leader = self._find_leader(deadline)
        state = self._wait_system_running(deadline)
        self.boot_seconds = time.monotonic() - started
        if state not in ("running", "degraded"):
            raise ContainerError(f"system state {state!r} after boot\n{self.diagnostics()}")
        if state == "degraded":
            failed = self.run("systemctl", "--failed", "--no-legend", check=False).stdout
            log(f"container is degraded; failed units:\n{failed}")

    def run(
        self,
        *command: str,
        check: bool = True,
        input: str | bytes | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` inside the container as root; text output, a clean environment."""
        if self.leader is None:
            raise ContainerError("the container is not booted")
        data = input.decode() if isinstance(input, bytes) else input
        try:
            result = subprocess.run(
                ["nsenter", "-t", str(self.leader), "-a", "--", *command],
                input=data,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=INSIDE_ENV,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ContainerError(f"{' '.join(command)} took longer than {timeout} s") from exc
        if check and result.returncode != 0:
            raise ContainerError(
                f"{' '.join(command)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def path(self, inside: str) -> Path:
        """The host's view of a path inside the running container (through /proc)."""
        if self.leader is None:
            raise ContainerError("the container is not booted")
        return Path(f"/proc/{self.leader}/root") / inside.lstrip("/")

    def put(self, source: Path, inside: str) -> None:
        """Copy a host file into the running container."""
        shutil.copyfile(source, self.path(inside))

    def diagnostics(self) -> str:
        """The tail of the console log, for failure messages."""
        try:
            lines = self.console_log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no console log)"
        return "console (last 40 lines):\n" + "\n".join(lines[-40:])

    def poweroff(self, timeout: float = 30) -> None:
        """Shut the container down cleanly; escalate to signals on our nspawn if it hangs."""
        nspawn = self.nspawn
        if nspawn is None:
            return
        if nspawn.poll() is None and self.leader is not None:
            with contextlib.suppress(ContainerError, OSError):
                self.run("systemctl", "poweroff", "--no-block", check=False, timeout=10)
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None and nspawn.poll() is None:
                log(f"container {self.name} did not stop, sending {sig.name} to {nspawn.pid}")
                nspawn.send_signal(sig)
            try:
                nspawn.wait(timeout=timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        self.nspawn = None
        self.leader = None

    # Internals.

    def _find_leader(self, deadline: float) -> int:
        """The container's PID 1: the child of our nspawn that is PID 1 in its namespace."""
        assert self.nspawn is not None
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise ContainerError(
                    f"systemd-nspawn exited {self.nspawn.returncode} during boot\n"
                    f"{self.diagnostics()}"
                )
            for pid in _children(self.nspawn.pid):
                if _namespace_pid(pid) == 1 and _exe_name(pid) == "systemd":
                    return pid
            _pause()
        raise ContainerError(f"no container init appeared\n{self.diagnostics()}")

    def _wait_system_running(self, deadline: float) -> str:
        """``systemctl is-system-running --wait``, retried while the bus is not up yet."""
        state = "unknown"
        while time.monotonic() < deadline:
            remaining = max(1.0, deadline - time.monotonic())
            try:
                result = self.run(
                    "systemctl", "is-system-running", "--wait", check=False, timeout=remaining
                )
            except ContainerError:
                break
            state = result.stdout.strip() or result.stderr.strip()
            if state in ("running", "degraded", "maintenance", "stopping"):
                return state
            _pause()
        return state


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(word) for word in path.read_text().split()]
    except (OSError, ValueError):
        return _children_by_scan(pid)


def _children_by_scan(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(entry.name))
    return found


def _namespace_pid(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    return None


def _exe_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _pause() -> None:
    # Nothing to block on while another process boots: a short bounded back-off.
    time.sleep(0.05)


def overlay_supported() -> bool:
    """Whether the kernel offers overlayfs (for ``--volatile=overlay``)."""
    try:
        return "\toverlay\n" in Path("/proc/filesystems").read_text()
    except OSError:
        return False


@contextlib.contextmanager
def booted(name: str = "echod-e2e", timeout: float = 60, suite: str = SUITE) -> Iterator[Container]:
    """A container of ``suite`` on a private view of its cached tree, powered off and
    cleaned up after."""
    source = cached_rootfs(suite=suite)
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="echod-e2e-", dir=WORK_DIR))
    name = f"{name}-{suite}-{os.getpid()}"
    if overlay_supported():
        container = Container(source, name, workdir / "console.log", volatile=True)
    else:
        container = Container(workdir / "rootfs", name, workdir / "console.log")
    try:
        if not container.volatile:
            copy_tree(source, container.rootfs)
        container.boot(timeout=timeout)
        yield container
    finally:
        container.poweroff()
        shutil.rmtree(workdir, ignore_errors=True)


def base_tarball(suite: str = SUITE, timeout: float = 600) -> Path:
    """A gzipped tarball of the cached e2e tree of ``suite``, as piuparts takes for its base.

    It is cached beside the tree, under the tree's key. Its apt sources are empty: everything
    the package needs is already in it, and piuparts must not go to the network for it.
    """
    tree = cached_rootfs(suite=suite)
    target = tree.with_name(f"{tree.name}.tgz")
    if target.is_file():
        return target
    with open(CACHE_DIR / f".lock-{target.name}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            return target
        scratch = target.with_name(f".build-{target.name}")
        started = time.monotonic()
        # The tree's sources.list, replaced by an empty one (appended last, so it wins).
        empty = Path(tempfile.mkdtemp(prefix=".build-", dir=CACHE_DIR))
        try:
            (empty / "etc/apt").mkdir(parents=True)
            (empty / "etc/apt/sources.list").write_text("")
            result = subprocess.run(
                [
                    "tar",
                    "-czf",
                    str(scratch),
                    "--exclude=./etc/apt/sources.list",
                    "-C",
                    str(tree),
                    ".",
                    "-C",
                    str(empty),
                    "./etc/apt/sources.list",
                ],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            if result.returncode != 0:
                raise ContainerError(f"tar of {tree} failed: {result.stderr}")
            scratch.rename(target)
        finally:
            shutil.rmtree(empty, ignore_errors=True)
            scratch.unlink(missing_ok=True)
        log(f"base tarball {target} made in {time.monotonic() - started:.0f} s")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """Build or find the cached trees; boot one once and report the times."""
    parser = argparse.ArgumentParser(prog="tests/e2e/container.py", description=main.__doc__)
    parser.add_argument("action", choices=("boot", "rootfs", "tarball"), nargs="?", default="boot")
    parser.add_argument("--suite", choices=RELEASES, default=SUITE)
    parser.add_argument("--dev", action="store_true", help="the tree of DEV_INCLUDE (rootfs)")
    parser.add_argument("--bench", action="store_true", help="--dev, and BENCH_INCLUDE too")
    args = parser.parse_args(argv)
    started = time.monotonic()
    if args.action == "rootfs":
        include = INCLUDE
        if args.dev or args.bench:
            include = DEV_INCLUDE + (BENCH_INCLUDE if args.bench else ())
        print(cached_rootfs(include, suite=args.suite))
        return 0
    if args.action == "tarball":
        print(base_tarball(args.suite))
        return 0
    source = cached_rootfs(suite=args.suite)
    log(f"root file system: {source} ({time.monotonic() - started:.1f} s)")
    with booted(suite=args.suite) as container:
        log(f"booted in {container.boot_seconds:.2f} s")
        print(container.run("systemctl", "--version").stdout.splitlines()[0])
        print(container.run("systemctl", "is-system-running", check=False).stdout.strip())
    log(f"total {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
