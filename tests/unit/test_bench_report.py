"""bench/run.py's report: the faster of each baseline pair, the one excused flaw, the
workers scenario's section."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

# Appended, not first: bench/profile.py must not shadow the standard library's profile.
sys.path.append(str(Path(__file__).resolve().parents[2] / "bench"))

import loadgen
import run

CHURN = next(s for s in loadgen.SCENARIOS if s.name == "churn-64B-c10")
PINGPONG = next(s for s in loadgen.SCENARIOS if s.name == "1KiB-c10")
IDLE = next(s for s in loadgen.SCENARIOS if s.name == "idle-10k")


def entry(kind: str, value: float, cpu: float = 10.0, **extra: Any) -> dict[str, Any]:
    """A run's entry as bench_interleaved() makes it, with what the report reads."""
    base: dict[str, Any] = {
        "status": "ok",
        "kind": kind,
        "size": 64 if kind == "churn" else 1024,
        "conn_per_s": value,
        "rt_per_s": value,
        "server_cpu_us_per_rt": cpu,
        "verified": True,
        "mismatches": 0,
        "round_trips": 100,
        "sent_bytes": 6400,
        "verified_bytes": 6400,
        "error_samples": [],
    }
    return {**base, **extra}


def test_faster_baseline_is_chosen_per_scenario() -> None:
    """The faster of a pair is taken scenario by scenario; idle: less memory per connection."""
    runs = {
        "classic_thread": {
            CHURN.name: entry("churn", 3000),
            PINGPONG.name: entry("pingpong", 90_000),
            IDLE.name: {"status": "ok", "kind": "idle", "pss_per_conn_kib": 20.0},
        },
        "tutorial_thread": {
            CHURN.name: entry("churn", 3100),
            PINGPONG.name: entry("pingpong", 80_000),
            IDLE.name: {"status": "ok", "kind": "idle", "pss_per_conn_kib": 18.0},
        },
    }
    assert run.faster_baseline(runs, "thread", CHURN) == "tutorial_thread"
    assert run.faster_baseline(runs, "thread", PINGPONG) == "classic_thread"
    assert run.faster_baseline(runs, "thread", IDLE) == "tutorial_thread"
    assert run.faster_baseline({}, "thread", CHURN) is None


def test_ratio_rows_name_the_baseline_they_used() -> None:
    """A mode's row against "faster thread" names the server each cell compares with."""
    results = {
        "echod_thread": {CHURN.name: entry("churn", 3000, cpu=300.0)},
        "classic_thread": {CHURN.name: entry("churn", 2000, cpu=400.0)},
        "tutorial_thread": {CHURN.name: entry("churn", 2500, cpu=200.0)},
    }
    report = {"results": results, "servers": list(results)}
    rows = "\n".join(run._ratio_section(report, [CHURN]))
    assert "| echod_thread / faster thread | 1.20x (tutorial) |" in rows
    assert "| echod_thread / faster thread (CPU) | 0.67x (tutorial) |" in rows
    assert "| tutorial_thread / classic_thread | 1.25x |" in rows


@pytest.mark.parametrize(
    ("server", "changes", "excused"),
    [
        ("tutorial_process", {}, True),
        ("classic_process", {}, False),
        ("tutorial_process", {"mismatches": 1}, False),
        ("tutorial_process", {"verified_bytes": 6336}, False),
        ("tutorial_process", {"error_samples": ["connect: Connection refused"]}, False),
    ],
)
def test_only_the_known_flaw_with_every_byte_back_is_excused(
    server: str, changes: dict[str, Any], excused: bool
) -> None:
    """The tutorial process server's drain timeout is excused only with every byte echoed."""
    flawed = entry(
        "pingpong",
        1000,
        verified=False,
        error_samples=["connections still open after the drain: Connection timed out"],
    )
    assert run.excused(server, {**flawed, **changes}) is excused


def test_workers_section_says_why_it_did_not_run() -> None:
    """On a machine with too few CPUs the workers section says so, with how many there are."""
    report = {"workers_n": {"cpus": 2, "n": 2, "results": {}, "skipped": "this machine has 2"}}
    assert run._workers_section(report, [CHURN])[-1] == "Not run: this machine has 2."


def test_workers_section_compares_echod_with_the_bare_servers() -> None:
    """With results, the section gives echod against the N bare servers, and CPU."""
    results = {
        "echod_async_w4": {CHURN.name: entry("churn", 9000, cpu=150.0)},
        "bare_uvloop_x4": {CHURN.name: entry("churn", 18000, cpu=60.0)},
    }
    report = {"workers_n": {"cpus": 4, "n": 4, "results": results}}
    lines = run._workers_section(report, [CHURN])
    assert "| ratio | 0.50x |" in lines
    assert "| ratio (CPU) | 0.40x |" in lines
