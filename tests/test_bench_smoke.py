"""scripts/bench.py --quick runs every workload end to end (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests import servers

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ["w1", "w2", "w3", "w4", "w5", "w6", "w7", "w8", "w9"]
# A workload may be skipped only for these reasons, never fail or hang.
ACCEPTED_STATUSES = {"ok", "skipped", "n/a"}


def _failed_checks(result: Any, path: str = "") -> list[str]:
    """Paths of every correctness check (`"ok": false`) inside one workload's result."""
    if not isinstance(result, dict):
        return []
    failed = [path or "."] if result.get("ok") is False else []
    for key, value in result.items():
        failed += _failed_checks(value, f"{path}.{key}")
    return failed


def _backends() -> tuple[list[str], str | None]:
    url = os.environ.get("PERSISTENCE_TEST_POSTGRES_URL")
    if url:
        return ["sqlite", "postgresql"], url
    if "postgresql" in servers.REQUIRED:
        pytest.fail("PERSISTENCE_TEST_REQUIRE names postgresql but no URL is set")
    return ["sqlite"], None


def test_quick_benchmark_runs_every_workload_and_writes_json(tmp_path: Path) -> None:
    backends, pg_url = _backends()
    output = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick"]
    command += ["--json", str(output), "--backends", ",".join(backends)]
    if pg_url:
        command += ["--pg-url", pg_url]
    python_path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=python_path)
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path, check=False
    )

    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "| W1 |" in completed.stdout
    document = json.loads(output.read_text())
    assert document["params"]["workloads"] == WORKLOADS
    for backend in backends:
        for kind in ("raw", "persistence"):
            results = document["results"][backend][kind]
            assert sorted(results) == WORKLOADS, (backend, kind)
            for workload, result in results.items():
                where = f"{backend} {kind} {workload}"
                assert result["status"] in ACCEPTED_STATUSES, (where, result.get("reason"))
                assert not _failed_checks(result), (where, _failed_checks(result))
            assert results["w1"]["status"] == "ok"
            assert results["w8"]["status"] == "ok"
            assert results["w9"]["status"] == "ok"


@pytest.mark.sqlite
def test_the_pending_appends_measure_runs_and_checks_its_searches(tmp_path: Path) -> None:
    # The script raises if a search right after an append misses that message.
    command = [sys.executable, str(ROOT / "scripts" / "measure_pending_appends.py")]
    command += ["--appends", "40", "--synchronous", "NORMAL"]
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False
    )

    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads(completed.stdout)
    assert result["appends"] == 40
    assert set(result["appends_alone"]) == {"median_ms", "mean_ms", "p99_ms"}
    assert result["append_then_search"]["both_median_ms"] > 0
    assert list(tmp_path.iterdir()) == []
