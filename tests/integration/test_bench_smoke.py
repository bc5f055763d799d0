"""Smoke test of the benchmark suite: a quick interleaved run of bench/run.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVERS = ("c_epoll", "classic_thread", "echod_thread")
SCENARIOS = ("1KiB-c10", "churn-64B-c10", "idle-10k")
ROUNDS = 2
MASS_CLOSE = 200
HAVE_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    argv = [sys.executable, str(ROOT / "bench" / "run.py"), "--quick"]
    argv += ["--servers", ",".join(SERVERS), "--scenarios", ",".join(SCENARIOS)]
    argv += ["--rounds", str(ROUNDS), "--mass-close", str(MASS_CLOSE), "--out", str(out)]
    with subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            # SIGTERM first, so that run.py can stop the servers it started.
            proc.terminate()
            try:
                stdout, stderr = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
            pytest.fail(f"bench/run.py timed out\n{stdout}{stderr}")
    # c_epoll is a baseline: without a compiler it is n/a, and run.py exits 1 for that.
    if HAVE_CC:
        assert proc.returncode == 0, stdout + stderr
    return out


def report(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / "bench.json").read_text())
    return data


@pytest.mark.timeout(180)
def test_markdown_table_has_a_row_per_server(quick_run: Path) -> None:
    """bench.md's throughput table has one row per server and a column per scenario."""
    markdown = (quick_run / "bench.md").read_text()
    table = markdown.split("## Throughput", 1)[1].split("\n## ", 1)[0]
    header = next(line for line in table.splitlines() if line.startswith("| server |"))
    for scenario in SCENARIOS:
        assert scenario in header
    for server in SERVERS:
        row = next(line for line in table.splitlines() if line.startswith(f"| {server} |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == len(SCENARIOS) + 2  # server, scenarios, start-up
        if server == "c_epoll" and not HAVE_CC:
            continue
        assert "n/a" not in cells[1 : 1 + len(SCENARIOS)], row
        # CPU per operation beside the throughput, for the load scenarios.
        assert "µs" in cells[1] and "µs" in cells[2], row


@pytest.mark.timeout(180)
def test_every_echoed_byte_was_verified(quick_run: Path) -> None:
    """Every run compared every byte it sent, with no mismatch and no error."""
    markdown = (quick_run / "bench.md").read_text()
    assert "Byte verification: passed" in markdown
    data = report(quick_run)
    for server in SERVERS:
        if server == "c_epoll" and not HAVE_CC:
            continue
        for scenario in SCENARIOS:
            run = data["results"][server][scenario]
            assert run["status"] == "ok", run
            assert run["verified"], run
            assert run["mismatches"] == 0
            assert run["verified_bytes"] == run["sent_bytes"] > 0
            assert run["server_cpu_us_per_rt"] is not None


@pytest.mark.timeout(180)
def test_load_scenarios_are_interleaved_rounds(quick_run: Path) -> None:
    """Each load scenario ran once per round against every server, by the C client if built."""
    data = report(quick_run)
    assert data["client"] == ("bench/loadgen.c" if HAVE_CC else "bench/loadgen.py")
    for server in ("classic_thread", "echod_thread"):
        for scenario in ("1KiB-c10", "churn-64B-c10"):
            slices = data["results"][server][scenario]["slices"]
            assert len(slices) == ROUNDS
            assert all(s["value"] > 0 and s["cpu_us"] > 0 for s in slices), slices


@pytest.mark.timeout(180)
def test_mass_close_retires_every_connection(quick_run: Path) -> None:
    """Both thread servers retired the connections closed at once; echod's stop was counted."""
    data = report(quick_run)
    for server in ("classic_thread", "echod_thread"):
        run = data["mass_close"][server]
        assert run["status"] == "ok", run
        assert run["connections"] == MASS_CLOSE
        assert run["retire_s"] is not None, run
        assert run["probe_failures"] == 0, run
    stop = data["mass_close"]["echod_thread"]["stop"]
    assert {"open", "finished", "cut", "adds_up"} <= stop.keys(), stop
    # Only connections still open when the workers heard of the stop are counted, in both.
    assert stop["adds_up"] and 0 <= stop["open"] <= MASS_CLOSE, stop


@pytest.mark.timeout(180)
def test_chart_is_a_png(quick_run: Path) -> None:
    """bench.png is written and is a PNG image."""
    assert (quick_run / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
