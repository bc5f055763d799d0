"""echod@.service instances and configuration drop-ins under a real systemd (in a container).

Two instances serve side by side on their own ports, each with its own runtime directory and
pidfile; a drop-in for one is applied by reloading that one alone; the shipped conffile, all
commented out, means the code's defaults, and an operator's edit pins only what it sets.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e import container as ct
from tests.e2e.conftest import ROOT
from tests.e2e.test_systemd import echo_once, journal_cursor, systemctl
from tests.support import wait_for

NAMES = ("a", "b")
PORTS = {"a": 9101, "b": 9102}
DEADLINE = 30.0
MAX_SECURITY_EXPOSURE = 2.0


def unit(name: str) -> str:
    return f"echod@{name}.service"


def prop(container: ct.Container, name: str, unit_name: str) -> str:
    return systemctl(container, "show", "-P", name, unit_name)


def events(container: ct.Container, unit_name: str, cursor: str, event: str) -> list[Any]:
    """The unit's journal entries after ``cursor`` whose ECHOD_EVENT is ``event``."""
    out = container.run(
        "journalctl", "-u", unit_name, "-o", "json", "--no-pager", f"--after-cursor={cursor}"
    ).stdout
    entries = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [e for e in entries if e.get("ECHOD_EVENT") == event]


def start(container: ct.Container, unit_name: str) -> None:
    result = container.run("systemctl", "start", unit_name, check=False, timeout=120)
    journal = container.run("journalctl", "-u", unit_name, "-n", "30", "--no-pager").stdout
    assert result.returncode == 0, f"{result.stderr}\n{journal}"
    assert prop(container, "ActiveState", unit_name) == "active", journal


def inside(container: ct.Container, *command: str) -> Any:
    """Run a command inside; the completed process, whatever its exit status."""
    return container.run(*command, check=False)


@pytest.fixture
def instances(installed: ct.Container) -> Iterator[ct.Container]:
    """Instances a and b configured on their own ports (not started); all removed after."""
    for name in NAMES:
        settings = {"port": PORTS[name], "shutdown_timeout": 2}
        installed.path(f"/etc/echod/{name}.yaml").write_text(yaml.safe_dump(settings))
    yield installed
    systemctl(installed, "stop", *map(unit, NAMES), check=False)
    systemctl(installed, "reset-failed", *map(unit, NAMES), check=False)
    for name in NAMES:
        installed.run("rm", "-rf", f"/etc/echod/{name}.yaml", f"/etc/echod/{name}.d")


def test_template_and_directories_are_installed(installed: ct.Container) -> None:
    """The .deb ships echod@.service (not enabled) and the directories /etc/echod{,.d}/."""
    c = installed
    listed = c.run("dpkg", "-L", "echod").stdout.splitlines()
    assert {"/usr/lib/systemd/system/echod@.service", "/etc/echod", "/etc/echod.d"} <= set(listed)
    assert c.path("/etc/echod").is_dir() and c.path("/etc/echod.d").is_dir()
    assert systemctl(c, "is-enabled", unit("x"), check=False) == "disabled"


def test_template_verifies_and_is_as_hardened_as_the_service(installed: ct.Container) -> None:
    """`systemd-analyze verify` is silent on an instance; its exposure equals echod.service's."""
    result = inside(
        installed, "systemd-analyze", "verify", "/usr/lib/systemd/system/echod@x.service"
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    scores = {}
    for name in ("echod.service", unit("x")):
        out = installed.run("systemd-analyze", "security", "--no-pager", name).stdout
        match = re.search(rf"Overall exposure level for {re.escape(name)}: ([0-9.]+)", out)
        assert match, out
        scores[name] = float(match.group(1))
    ct.log(f"systemd-analyze security: {scores}")
    assert scores[unit("x")] == scores["echod.service"] <= MAX_SECURITY_EXPOSURE


def test_two_instances_serve_side_by_side(instances: ct.Container) -> None:
    """echod@a and echod@b serve their own ports, with their own pidfiles and directories."""
    c = instances
    for name in NAMES:
        start(c, unit(name))
    for name in NAMES:
        assert echo_once(c, PORTS[name], f"to {name}") == f"to {name}\n"
        pid = prop(c, "MainPID", unit(name))
        assert c.path(f"/run/echod-{name}/echod.pid").read_text().strip() == pid
        assert f"/etc/echod/{name}.yaml" in prop(c, "Environment", unit(name))
    assert prop(c, "MainPID", unit("a")) != prop(c, "MainPID", unit("b"))
    # The package's own echod.service runs on beside them, on the default port.
    assert echo_once(c, 9999, "main") == "main\n"
    # `echod status` by hand finds an instance through the same two variables as its unit.
    status = inside(
        c,
        "env",
        "ECHOD_CONFIG=/etc/echod/b.yaml",
        "ECHOD_PIDFILE=/run/echod-b/echod.pid",
        "echod",
        "status",
    )
    assert status.returncode == 0, status.stderr
    assert f"(pid {prop(c, 'MainPID', unit('b'))})" in status.stdout
    # Stopping one removes its runtime directory only; the other keeps its pidfile and serves.
    systemctl(c, "stop", unit("a"))
    assert not c.path("/run/echod-a").exists()
    assert c.path("/run/echod-b/echod.pid").is_file()
    assert echo_once(c, PORTS["b"], "b alone") == "b alone\n"


def test_dropin_reload_applies_to_one_instance(instances: ct.Container) -> None:
    """A drop-in for echod@a applied by `systemctl reload echod@a` moves a; b is untouched."""
    c = instances
    for name in NAMES:
        start(c, unit(name))
    b_pid = prop(c, "MainPID", unit("b"))
    cursor = journal_cursor(c)
    c.run("mkdir", "-p", "/etc/echod/a.d")
    c.path("/etc/echod/a.d/10-port.yaml").write_text("# moved\nport: 9111\n")
    checked = c.run("echod", "--config", "/etc/echod/a.yaml", "check-config").stdout
    assert "port: 9111  # from /etc/echod/a.d/10-port.yaml:2\n" in checked
    systemctl(c, "reload", unit("a"))
    reload = wait_for(
        lambda: events(c, unit("a"), cursor, "reload"), timeout=DEADLINE, what="a's reload"
    )[0]
    assert json.loads(reload["ECHOD_CHANGES"]) == {"port": ["9101", "9111"]}
    assert echo_once(c, 9111, "a moved") == "a moved\n"
    wait_for(lambda: echo_once(c, PORTS["a"]) is None, what="a's old port to close")
    # The other instance neither reloaded nor restarted, and serves its own port.
    assert events(c, unit("b"), cursor, "reload") == []
    assert prop(c, "MainPID", unit("b")) == b_pid
    assert echo_once(c, PORTS["b"], "b stays") == "b stays\n"


def defaults_dump(c: ct.Container) -> str:
    """The embedded defaults as check-config prints them, without its comment header."""
    out = c.run("echod", "check-config", "--defaults").stdout
    return "".join(line for line in out.splitlines(keepends=True) if not line.startswith("#"))


def test_shipped_conffile_means_the_code_defaults(installed: ct.Container) -> None:
    """The installed /etc/echod.yaml sets nothing: check-config shows the defaults and says so."""
    c = installed
    shipped = c.path("/etc/echod.yaml").read_text()
    assert yaml.safe_load(shipped) is None  # every line a comment
    result = c.run("echod", "check-config")
    assert "it sets nothing: every setting is at its default" in result.stderr
    assert "# from " not in result.stdout
    assert result.stdout.endswith(defaults_dump(c))


def test_edited_conffile_pins_only_what_it_sets(installed: ct.Container) -> None:
    """Uncommenting one setting of the shipped file sets it alone: the rest follow the code."""
    c = installed
    path = c.path("/etc/echod.yaml")
    shipped = path.read_text()
    try:
        path.write_text(shipped.replace("\n#port: 9999\n", "\nport: 9998\n"))
        result = c.run("echod", "check-config")
        set_lines = [line for line in result.stdout.splitlines() if "# from " in line]
        assert len(set_lines) == 1
        assert re.fullmatch(r"port: 9998  # from /etc/echod\.yaml:\d+", set_lines[0])
        expected = defaults_dump(c).replace("port: 9999\n", "port: 9998\n")
        assert re.sub(r"  # from .*", "", result.stdout).endswith(expected)
    finally:
        path.write_text(shipped)


# --- last: an upgrade that changes a default (it leaves the newer package installed) -------------

#: The default the newer package changes, and its value there.
CHANGED, NEW_DEFAULT = "idle_timeout", 301


def build_newer_deb(workdir: Path) -> Path:
    """The same echod with a later version whose idle_timeout default is 301, as a .deb."""
    tree = workdir / "src"
    shutil.copytree(
        ROOT,
        tree,
        ignore=shutil.ignore_patterns(".git", ".venv", "dist", "build", "__pycache__", ".*_cache"),
    )
    init = tree / "echod/__init__.py"
    version = re.search(r'__version__ = "(.*)"', init.read_text())
    assert version
    newer = f"{version.group(1)}+newdefault"
    init.write_text(init.read_text().replace(version.group(0), f'__version__ = "{newer}"'))
    settings = tree / "echod/settings.py"
    row = re.compile(r'(\n        "idle_timeout",\n        "number",\n        )300\.0,')
    text, count = row.subn(rf"\g<1>{NEW_DEFAULT}.0,", settings.read_text())
    assert count == 1, "the idle_timeout row of SETTINGS has changed shape"
    settings.write_text(text)
    changelog = tree / "packaging/debian/changelog"
    changelog.write_text(
        f"echod ({newer}) unstable; urgency=medium\n\n  * idle_timeout defaults to"
        f" {NEW_DEFAULT} s.\n\n -- echod maintainers <maintainers@echod.example.org>"
        "  Tue, 01 Dec 2026 12:00:00 +0000\n\n" + changelog.read_text()
    )
    # The shipped conffile follows the table, so it changes too, as in a real release.
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run(
        [sys.executable, "-m", "echod.docgen", "--write", "--root", str(tree)],
        cwd=tree, env=env, check=True, capture_output=True, timeout=60,
    )
    started = time.monotonic()
    result = subprocess.run(
        ["sh", str(tree / "packaging/build-deb.sh"), str(workdir / "out")],
        capture_output=True, text=True, env={**os.environ, "LINTIAN": "0"},
        timeout=600, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    ct.log(f"built the newer .deb in {time.monotonic() - started:.1f} s")
    return Path(result.stdout.strip().splitlines()[-1])


def test_upgrade_brings_a_new_default_to_an_edited_conffile(
    installed: ct.Container, tmp_path: Path
) -> None:
    """An operator who set only port keeps it across an upgrade and gets the new idle_timeout."""
    c = installed
    path = c.path("/etc/echod.yaml")
    assert f"\n#{CHANGED}: 300\n" in path.read_text()
    edited = path.read_text().replace("\n#port: 9999\n", "\nport: 9998\n")
    path.write_text(edited)
    before = c.run("echod", "check-config").stdout
    assert f"\n{CHANGED}: 300\n" in before
    newer = build_newer_deb(tmp_path)
    c.put(newer, "/root/echod-newer.deb")
    # What configuration management does with a changed conffile: keep the operator's.
    c.run(
        "apt-get", "install", "-y", "-o", "Dpkg::Options::=--force-confold",
        "/root/echod-newer.deb", timeout=300,
    )
    assert c.run("dpkg-query", "-W", "-f=${Version}", "echod").stdout.endswith("+newdefault")
    assert path.read_text() == edited
    assert f"\n#{CHANGED}: {NEW_DEFAULT}\n" in c.path("/etc/echod.yaml.dpkg-dist").read_text()
    after = c.run("echod", "check-config").stdout
    assert f"\n{CHANGED}: {NEW_DEFAULT}\n" in after  # the new default, no "from" comment
    assert re.search(r"\nport: 9998  # from /etc/echod\.yaml:\d+\n", after)
    systemctl(c, "restart", "echod.service")
    assert echo_once(c, 9998, "upgraded") == "upgraded\n"
