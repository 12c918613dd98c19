"""`make bench` runs: every row's code, shrunk to a few seconds. Nothing here is timed:
the numbers belong to `python -m bench`, where each is a ratio to a baseline."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_bench(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def rows(table: str) -> set[str]:
    return {line.split()[0] for line in table.splitlines() if line[:1].isdigit()}


def test_in_process_rows_run():
    table = run_bench("--only", "1,2,3,5,7,8", "-n", "2000", "--rounds", "1", "--tries", "40",
                      "--tasks", "40000")
    assert rows(table) == {"1a", "1b", "2a", "2b", "3a", "3b", "5a", "5b", "7",
                           "8a", "8b", "8c", "8d"}


@pytest.mark.server
def test_http_rows_run_under_gunicorn_with_the_python_load_client():
    table = run_bench("--only", "4,6", "--load", "python", "--http-rounds", "1",
                      "--http-seconds", "1", "--poll-seconds", "1", "--dashboards", "5")
    assert rows(table) == {"4a", "4b", "4c", "4d", "4e", "4f", "4g", "6a", "6b"}
    assert "bench.load.python_load" in table
    assert "all 2xx/3xx" in table


@pytest.mark.redis
@pytest.mark.skipif(not (shutil.which("redis-server") or Path("/usr/bin/redis-server").exists()),
                    reason="needs redis-server")
def test_rq_rows_run_on_a_private_redis():
    pytest.importorskip("rq")
    table = run_bench("--only", "9", "-n", "2000", "--rounds", "1", "--rq-tasks", "40",
                      "--rq-finished", "300")
    assert rows(table) == {"9a", "9b", "9c"}
    assert "QUEUE_HISTORY 1,000,000" in table


def test_operator_rows_run_on_a_small_sqlite_history():
    table = run_bench("--only", "10", "--rounds", "1", "--history-big", "20000",
                      "--history-small", "200", "--bulk", "300")
    assert rows(table) == {"10a", "10b", "10c", "10d"}
    assert "300 failed tasks" in table
