"""Fixtures for the end-to-end tests: a booted systemd container with echod's .deb installed.

Every module runs once per Debian release in :data:`RELEASES` (bookworm, trixie): the
module-scoped ``release`` fixture is parametrized, and ``container`` boots that release, so
a test that uses ``container`` or ``installed`` (or asks for ``release``) runs on each, with
the release in its id (``test_start_and_echo[trixie]``). ``ECHOD_E2E_RELEASES=trixie``
(comma-separated) narrows the list, for a quick run by hand.

These tests need root, systemd-nspawn and overlayfs or disk for the container. A machine that
cannot boot the container fails them, loudly, with the reason: they are never skipped.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import container as ct

ROOT = Path(__file__).resolve().parents[2]
DEB_INSIDE = "/root/echod.deb"


def selected_releases() -> tuple[str, ...]:
    """The releases to test: all of :data:`ct.RELEASES`, or those in $ECHOD_E2E_RELEASES."""
    wanted = [r for r in os.environ.get("ECHOD_E2E_RELEASES", "").split(",") if r.strip()]
    unknown = sorted(set(wanted) - set(ct.RELEASES))
    if unknown:
        raise pytest.UsageError(f"ECHOD_E2E_RELEASES: unknown release(s) {', '.join(unknown)}")
    return tuple(r for r in ct.RELEASES if r in wanted) if wanted else ct.RELEASES


RELEASES = selected_releases()
#: What the container looked like right after the package was installed, before any test
#: changed it: "active" (the unit's state), "journal" (its log), "config" (/etc/echod.yaml).
#: It describes the container of the release being tested: each install replaces it.
after_install: dict[str, str] = {}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Booting and installing take longer than the suite's default per-test timeout, and
    # pytest-timeout counts session fixtures against the first test that uses them.
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.timeout(900))


@pytest.fixture(scope="session")
def echod_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package under test: $ECHOD_DEB if set (``make e2e`` builds it), else built now."""
    given = os.environ.get("ECHOD_DEB")
    if given:
        path = Path(given)
        if not path.is_file():
            pytest.fail(f"ECHOD_DEB={given} does not exist")
        return path
    out = tmp_path_factory.mktemp("deb")
    started = time.monotonic()
    result = subprocess.run(
        ["sh", str(ROOT / "packaging/build-deb.sh"), str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "LINTIAN": "0"},
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"packaging/build-deb.sh failed:\n{result.stdout}\n{result.stderr}")
    ct.log(f"built the .deb in {time.monotonic() - started:.1f} s")
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", params=RELEASES)
def release(request: pytest.FixtureRequest) -> str:
    """The Debian release this run of the module tests ("bookworm", "trixie")."""
    name: str = request.param
    return name


@pytest.fixture(scope="module")
def container(release: str) -> Iterator[ct.Container]:
    """A booted Debian ``release`` with systemd as PID 1, powered off at the end of the
    module (not of the session: the other tests must not see it among this process's
    children)."""
    if os.geteuid() != 0:
        pytest.fail("the systemd end-to-end tests need root (systemd-nspawn, nsenter)")
    try:
        with ct.booted("echod-e2e", suite=release) as booted:
            ct.log(f"{release} container booted in {booted.boot_seconds:.2f} s")
            yield booted
    except ct.ContainerError as exc:
        pytest.fail(f"cannot run a systemd container on this machine: {exc}")


@pytest.fixture(scope="module")
def installed(container: ct.Container, echod_deb: Path) -> ct.Container:
    """The container with echod installed the way an operator does: apt-get install ./deb.

    One .deb serves both releases: it is architecture-independent and depends on
    ``python3:any``, so the package built on the host installs on either.
    """
    container.put(echod_deb, DEB_INSIDE)
    started = time.monotonic()
    container.run("apt-get", "install", "-y", "--no-install-recommends", DEB_INSIDE, timeout=300)
    ct.log(f"installed the .deb in {time.monotonic() - started:.1f} s")
    active = container.run("systemctl", "is-active", "echod.service", check=False)
    after_install["active"] = active.stdout.strip()
    after_install["journal"] = container.run("journalctl", "-u", "echod", "--no-pager").stdout
    after_install["config"] = container.path("/etc/echod.yaml").read_text()
    return container
