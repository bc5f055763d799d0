"""echod's .deb checked the way Debian checks packages, on each release in turn.

- lintian of the release itself: the host's lintian for the host's release, the lintian in a
  root file system of the other release (``tests/in-debian.sh``) for the other;
- piuparts (install, then purge, then compare the file system with the base) on a base
  tarball of the release's cached e2e tree, which already holds every dependency: its apt
  sources are empty, so piuparts needs no network. piuparts runs in a mount namespace of its
  own, so whatever it mounted in its chroot is gone when it is, even if it is killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e import container as ct

ROOT = Path(__file__).resolve().parents[2]
LINTIAN_TIMEOUT = 300.0
PIUPARTS_TIMEOUT = 600.0
#: Host tools these tests use, and their packages.
TOOLS = {"lintian": "lintian", "piuparts": "piuparts", "unshare": "util-linux"}


@pytest.fixture(scope="module")
def host_tools() -> None:
    """lintian and piuparts on the host, installed with apt-get if they are missing."""
    try:
        ct.ensure_host_tools(TOOLS)
    except ct.ContainerError as exc:
        pytest.fail(str(exc))


def run_bounded(command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in a process group of its own; on timeout, kill the whole group."""
    with subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            out, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            pytest.fail(f"{command[0]} took longer than {timeout:.0f} s")
    return subprocess.CompletedProcess(command, process.returncode, out, "")


def test_lintian_is_clean(release: str, echod_deb: Path, host_tools: None) -> None:
    """The release's own lintian reports no error and no warning on the .deb."""
    lintian = ["lintian", "--fail-on", "error,warning", "--tag-display-limit", "0"]
    if release == ct.host_release():
        command = [*lintian, str(echod_deb)]
    else:
        inside = f"/tmp/{echod_deb.name}"
        command = [
            "bash", str(ROOT / "tests/in-debian.sh"), "--bind-ro", f"{echod_deb}:{inside}",
            release, *lintian, inside,
        ]  # fmt: skip
    started = time.monotonic()
    result = run_bounded(command, LINTIAN_TIMEOUT)
    tags = [line for line in result.stdout.splitlines() if line[:2] in ("E:", "W:")]
    ct.log(f"lintian ({release}) in {time.monotonic() - started:.1f} s:\n{result.stdout}")
    assert (result.returncode, tags) == (0, []), result.stdout


def test_piuparts_install_and_purge(
    release: str, echod_deb: Path, host_tools: None, tmp_path: Path
) -> None:
    """piuparts installs the .deb on a clean base of the release and purges it without trace."""
    base = ct.base_tarball(release)
    command = [
        "unshare", "--mount", "--propagation", "private", "--",
        "piuparts", "--basetgz", str(base), "--distribution", release,
        "--no-upgrade-test", "--keep-sources-list", "--no-eatmydata",
        # debconf 1.5.87 (trixie) leaves this directory behind after any configuration;
        # newer piuparts ignore it by themselves, bookworm's 1.1.7 does not.
        "--ignore", "/var/cache/debconf/tmp.ci/",
        # logrotate's state, written by piuparts' own run of /etc/logrotate.d/echod: here
        # logrotate is in the base, where piuparts would install it and purge it again.
        "--ignore", "/var/lib/logrotate/status",
        "--tmpdir", str(tmp_path), "--log-file", str(tmp_path / "piuparts.log"),
        str(echod_deb),
    ]  # fmt: skip
    started = time.monotonic()
    result = run_bounded(command, PIUPARTS_TIMEOUT)
    log = (tmp_path / "piuparts.log").read_text(errors="replace")
    ct.log(f"piuparts ({release}) in {time.monotonic() - started:.1f} s")
    assert result.returncode == 0, "\n".join(log.splitlines()[-60:])
    assert "PASS: Installation and purging test." in log
    # Its chroot is gone: nothing of it is left under tmp_path but the log.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["piuparts.log"]
