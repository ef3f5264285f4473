#!/usr/bin/env python3
"""The peer harness run again and again: each workload's ratios as medians over runs.

`../shared/bench/run.py` measures each adapter in a process of its own, once. On this
machine a process now and then runs a whole workload 1.5-2x slower than the same code
in the next process (a phase of the host, not of the code: every step slows alike,
the thread's statements as much as the collector), so one run decides "ahead" or
"behind" by which process drew the slow phase. This script runs the harness `--runs`
times with the same arguments and reports, per adapter and workload, the ratio to the
raw driver of each run (run.py's own `ratios`) and their median, and for each of this
project's adapters its ratio to the fastest peer of its backend in each run and in how
many runs it was ahead of that peer.

Run it with an interpreter that has the peers' requirements; arguments after `--` go
to run.py unchanged:

    <peers venv>/bin/python scripts/repeat_peers.py --runs 7 --json out.json -- \\
        --adapter-python persistence_=$(which python) \\
        --adapters raw_sqlite,agents_sqlite,persistence_sqlite --workloads w1,w2 \\
        --pg-url postgresql://postgres@127.0.0.1:5432/postgres

`--from-json` summarises the runs that earlier `--json` files hold, together, without
running the harness: two sets of runs of the same code give one set of medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OURS = "persistence_"
RAW = "raw_"


def run_harness(harness: Path, python: str, argv: list[str], out: Path) -> dict[str, Any]:
    """One run of run.py with `argv`; its JSON (results, params, ratios)."""
    subprocess.run(
        [python, str(harness), *argv, "--json", str(out)],
        cwd=harness.parent,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def against_fastest_peer(run: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per project adapter and metric: its ratio over the lowest peer ratio of its
    backend in this run (> 1: slower than the fastest peer). Raw drivers are no peers."""
    backends = {name: result["backend"] for name, result in run["results"].items()}
    fastest: dict[tuple[str, str], float] = {}
    for name, ratios in run["ratios"].items():
        if not name.startswith((OURS, RAW)):
            for metric, ratio in ratios.items():
                key = (backends[name], metric)
                fastest[key] = min(ratio, fastest.get(key, ratio))
    found: dict[str, dict[str, float]] = {}
    for name, ratios in run["ratios"].items():
        if name.startswith(OURS):
            for metric, ratio in ratios.items():
                best = fastest.get((backends[name], metric))
                if best is not None:
                    found.setdefault(name, {})[metric] = ratio / best
    return found


def _over_runs(tables: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Per adapter and metric: the value of each table (run) that has it, and their median."""
    values: dict[str, dict[str, list[float]]] = {}
    for table in tables:
        for name, metrics in table.items():
            for metric, value in metrics.items():
                values.setdefault(name, {}).setdefault(metric, []).append(value)
    return {
        name: {
            metric: {"runs": found, "median": statistics.median(found)}
            for metric, found in metrics.items()
        }
        for name, metrics in values.items()
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every run's ratios and the medians over runs, by adapter and metric."""
    return {
        "vs_raw": _over_runs([run["ratios"] for run in runs]),
        "vs_fastest_peer": _over_runs([against_fastest_peer(run) for run in runs]),
    }


def markdown(summary: dict[str, Any], runs: int) -> str:
    lines = [f"# The peer harness, {runs} runs: medians of the per-run ratios", ""]
    lines += ["## Slowdown against the raw driver (1.0 = raw, lower is faster)", ""]
    lines += ["| adapter | metric | median | runs |", "|---|---|---|---|"]
    for name, metric, cell, values in _rows(summary["vs_raw"]):
        lines.append(f"| {name} | {metric} | {cell['median']:.2f} | {values} |")
    lines += ["", "## Against the fastest peer of the backend (< 1: ahead of it)", ""]
    lines += ["| adapter | metric | median | ahead in | runs |", "|---|---|---|---|---|"]
    for name, metric, cell, values in _rows(summary["vs_fastest_peer"]):
        ahead = f"{sum(value < 1 for value in cell['runs'])} of {len(cell['runs'])}"
        lines.append(f"| {name} | {metric} | {cell['median']:.2f} | {ahead} | {values} |")
    lines.append("")
    return "\n".join(lines)


def _rows(table: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any], str]]:
    """Each adapter's metrics of a summary table, with the runs' values as text."""
    for name, metrics in table.items():
        for metric, cell in metrics.items():
            yield name, metric, cell, ", ".join(f"{value:.2f}" for value in cell["runs"])


def stored_runs(paths: list[Path]) -> list[dict[str, Any]]:
    """The runs that files written by `--json` hold, in the order given."""
    return [run for path in paths for run in json.loads(path.read_text())["runs"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--harness",
        type=Path,
        default=ROOT.parent / "shared" / "bench" / "run.py",
        help="the peer harness (default: ../shared/bench/run.py)",
    )
    parser.add_argument("--json", type=Path, help="write every run and the summary here")
    parser.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        metavar="FILE",
        help="summarise the runs these --json files hold instead of running the harness",
    )
    parser.add_argument("harness_args", nargs=argparse.REMAINDER, help="-- then run.py's")
    args = parser.parse_args()
    passed = args.harness_args[1:] if args.harness_args[:1] == ["--"] else args.harness_args
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.from_json and passed:
        parser.error("--from-json runs no harness: give it no harness arguments")
    if args.from_json:
        runs = stored_runs(args.from_json)
    else:
        runs = []
        with tempfile.TemporaryDirectory() as scratch:
            for index in range(args.runs):
                print(f"run {index + 1} of {args.runs}", file=sys.stderr, flush=True)
                scratch_file = Path(scratch) / "r.json"
                runs.append(run_harness(args.harness, sys.executable, passed, scratch_file))
    summary = summarise(runs)
    print(markdown(summary, len(runs)))
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
