"""Build the bench's C programs with the system compiler, at run time, into a build directory.

No binary is committed: bench/run.py compiles bench/baselines/epoll_echo.c and bench/loadgen.c
with ``cc -O2`` (``$CC`` if set) into its temporary directory. Without a compiler the C
baseline is reported as n/a and the Python load generator is used instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SOURCES = {
    "epoll_echo": BENCH / "baselines" / "epoll_echo.c",
    "loadgen": BENCH / "loadgen.c",
}
BUILD_TIMEOUT = 120.0  # seconds per program


@dataclass(frozen=True)
class Built:
    """A program that was built (path set) or why it was not (reason set)."""

    name: str
    path: Path | None
    reason: str = ""


def compiler() -> str | None:
    """The C compiler to use: $CC, else cc, else gcc; None if there is none."""
    for candidate in (os.environ.get("CC"), "cc", "gcc"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def build(name: str, outdir: Path) -> Built:
    """Compile SOURCES[name] into outdir/name; never raises for a missing or failing compiler."""
    cc = compiler()
    if cc is None:
        return Built(name, None, "no C compiler (install gcc)")
    outdir.mkdir(parents=True, exist_ok=True)
    target = outdir / name
    argv = [cc, "-O2", "-Wall", "-o", str(target), str(SOURCES[name])]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Built(name, None, f"{cc} failed: {exc}")
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or ["no message"])[0]
        return Built(name, None, f"{cc} failed: {first[:200]}")
    return Built(name, target)
