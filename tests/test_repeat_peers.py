"""scripts/repeat_peers.py: the medians over runs of the peer harness, and each run's
ratio to the fastest peer (computed from run.py's JSON; no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "repeat_peers", ROOT / "scripts" / "repeat_peers.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(ratios: dict[str, dict[str, float]]) -> dict[str, Any]:
    """A run of the harness as its JSON has it: backends in results, ratios to raw."""
    backends = {
        "raw_sqlite": "sqlite",
        "agents_sqlite": "sqlite",
        "langchain_sqlite": "sqlite",
        "persistence_sqlite": "sqlite",
        "raw_asyncpg": "postgresql",
        "persistence_pg": "postgresql",
    }
    return {
        "results": {name: {"backend": backends[name]} for name in ratios},
        "ratios": ratios,
    }


def _sqlite_run(
    agents: tuple[float, float], langchain: tuple[float, float], ours: tuple[float, ...], pg: float
) -> dict[str, Any]:
    """A run with (load, bulk) ratios for the SQLite peers, (load, bulk, list) for ours,
    and the load ratio of ours on PostgreSQL."""
    return _run(
        {
            "raw_sqlite": {"w2_load_1000": 1.0, "w4_bulk": 1.0},
            "agents_sqlite": dict(zip(("w2_load_1000", "w4_bulk"), agents, strict=True)),
            "langchain_sqlite": dict(zip(("w2_load_1000", "w4_bulk"), langchain, strict=True)),
            "persistence_sqlite": dict(
                zip(("w2_load_1000", "w4_bulk", "w3_list"), ours, strict=True)
            ),
            "raw_asyncpg": {"w2_load_1000": 1.0},
            "persistence_pg": {"w2_load_1000": pg},
        }
    )


RUNS = [
    _sqlite_run(agents=(0.5, 1.0), langchain=(4.0, 0.8), ours=(0.4, 1.6, 1.2), pg=0.7),
    _sqlite_run(agents=(1.0, 0.5), langchain=(4.0, 2.0), ours=(1.5, 1.0, 2.0), pg=0.9),
    _sqlite_run(agents=(2.0, 1.0), langchain=(4.0, 2.0), ours=(1.0, 3.0, 1.4), pg=1.1),
]


def test_the_fastest_peer_is_taken_run_by_run_among_peers_of_the_same_backend() -> None:
    found = _script().against_fastest_peer(RUNS[0])

    # Loads: the Agents SDK is the fastest peer (0.5); the raw driver is none.
    assert found["persistence_sqlite"]["w2_load_1000"] == 0.4 / 0.5
    # Bulk: LangChain is the fastest peer of this run (0.8).
    assert found["persistence_sqlite"]["w4_bulk"] == 1.6 / 0.8
    # No peer lists, and no peer runs on PostgreSQL here: nothing to compare with.
    assert "w3_list" not in found["persistence_sqlite"]
    assert "persistence_pg" not in found
    assert set(found) == {"persistence_sqlite"}


def test_medians_are_over_runs_of_each_adapter_and_metric() -> None:
    summary = _script().summarise(RUNS)

    load = summary["vs_raw"]["persistence_sqlite"]["w2_load_1000"]
    assert load == {"runs": [0.4, 1.5, 1.0], "median": 1.0}
    assert summary["vs_raw"]["persistence_pg"]["w2_load_1000"]["median"] == 0.9
    against_peer = summary["vs_fastest_peer"]["persistence_sqlite"]
    assert against_peer["w2_load_1000"] == {"runs": [0.8, 1.5, 0.5], "median": 0.8}
    assert against_peer["w4_bulk"] == {"runs": [2.0, 2.0, 3.0], "median": 2.0}


def test_runs_the_harness_with_the_arguments_after_the_separator(tmp_path: Path) -> None:
    """A stand-in harness records its arguments and answers with one of the runs above."""
    calls = tmp_path / "calls.txt"
    harness = tmp_path / "run.py"
    harness.write_text(
        "import json, sys\n"
        f"open({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
        "out = sys.argv[sys.argv.index('--json') + 1]\n"
        f"json.dump({json.dumps(RUNS[0])}, open(out, 'w'))\n"
    )
    summary_file = tmp_path / "summary.json"
    command = [sys.executable, str(ROOT / "scripts" / "repeat_peers.py"), "--runs", "2"]
    command += ["--harness", str(harness), "--json", str(summary_file)]
    command += ["--", "--workloads", "w2", "--adapters", "raw_sqlite,persistence_sqlite"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)

    assert completed.returncode == 0, completed.stderr
    lines = calls.read_text().splitlines()
    assert len(lines) == 2
    assert all(
        line.startswith("--workloads w2 --adapters raw_sqlite,persistence_sqlite --json ")
        for line in lines
    )
    written = json.loads(summary_file.read_text())
    assert len(written["runs"]) == 2
    assert written["summary"]["vs_fastest_peer"]["persistence_sqlite"]["w4_bulk"]["runs"] == [
        2.0,
        2.0,
    ]
    assert "| persistence_sqlite | w4_bulk | 2.00 | 0 of 2 | 2.00, 2.00 |" in completed.stdout


def test_runs_stored_by_earlier_calls_are_summarised_together(tmp_path: Path) -> None:
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text(json.dumps({"runs": RUNS[:1], "summary": {}}))
    second.write_text(json.dumps({"runs": RUNS[1:], "summary": {}}))
    script = [sys.executable, str(ROOT / "scripts" / "repeat_peers.py")]
    combined = tmp_path / "combined.json"
    command = [*script, "--from-json", str(first), str(second), "--json", str(combined)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)

    assert completed.returncode == 0, completed.stderr
    written = json.loads(combined.read_text())
    assert written["runs"] == RUNS
    assert written["summary"] == _script().summarise(RUNS)
    # Loads against the fastest peer: 0.8, 1.5 and 0.5, ahead in two of the three runs.
    assert "| persistence_sqlite | w2_load_1000 | 0.80 | 2 of 3 | 0.80, 1.50, 0.50 |" in (
        completed.stdout
    )

    refused = subprocess.run(
        [*script, "--from-json", str(first), "--", "--workloads", "w2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 2
    assert "--from-json runs no harness" in refused.stderr
