#!/usr/bin/env python3
"""Benchmark of `persistence` against the raw drivers, in the same run (issue 8).

Every (backend, target, workload) runs in a fresh worker process on a fresh store
(a temp SQLite file, or a PostgreSQL database created and dropped), so imports, caches
and peak RSS never leak from one measurement into the next. `raw` is the same work
written by hand on aiosqlite / asyncpg over an equivalent schema, with the same
durability (WAL + synchronous=FULL on SQLite).

    python scripts/bench.py                          # SQLite + PostgreSQL, issue 8 sizes
    python scripts/bench.py --quick --json out.json  # smoke run, under a minute
    python scripts/bench.py --workloads w1,w2 --backends sqlite
    python scripts/bench.py --mongodb-url mongodb://localhost:27017
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit.common import RESULT_TAG, Skip, peak_rss_mb
from benchkit.report import markdown, summary

ALL_WORKLOADS = ("w1", "w2", "w3", "w4", "w5", "w6", "w7", "w8", "w9")
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"

FULL: dict[str, Any] = {
    "msg_bytes": 300,
    "repeats": 15,
    "appends": 50,
    "w1_sizes": [10, 1000, 10000],
    "w2_sizes": [1000, 10000],
    "w2_noise": 100_000,
    "w3_sizes": [10_000, 100_000],
    "w4_total": 100_000,
    "w4_chunk": 1000,
    "w5_processes": 2,
    "w5_tasks": 4,
    "w5_count": 50,
    "w6_sizes": [10_000, 100_000],
    "w6_stale": 100,
    "w7_sizes": [1000, 20_000],
    "w7_messages": 50,
    "w8_messages": 100_000,
    "w9_sizes": [100, 100_000],
    "worker_timeout": 3600.0,
}
QUICK: dict[str, Any] = {
    "repeats": 3,
    "appends": 10,
    "w1_sizes": [10, 200],
    "w2_sizes": [200],
    "w2_noise": 1000,
    "w3_sizes": [200, 500],
    "w4_total": 2000,
    "w4_chunk": 500,
    "w5_count": 5,
    "w6_sizes": [100, 300],
    "w6_stale": 10,
    "w7_sizes": [20],
    "w7_messages": 5,
    "w8_messages": 2000,
    "w9_sizes": [100, 2000],
    "worker_timeout": 120.0,
}
SIZE_OPTIONS = ("w1_sizes", "w2_sizes", "w3_sizes", "w6_sizes", "w7_sizes", "w9_sizes")
COUNT_OPTIONS = ("w2_noise", "w4_total", "w5_count", "w7_messages", "w8_messages", "repeats")


# ----------------------------------------------------------------------------- worker


async def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Runs one workload on one target in a fresh store; returns its result."""
    from benchkit.processes import w5_concurrent, w7_transfer
    from benchkit.stores import fresh_store
    from benchkit.targets import make_target, unavailable_reason
    from benchkit.workloads import WORKLOADS

    kind, backend, workload, p, urls = (
        job[k] for k in ("kind", "backend", "workload", "p", "urls")
    )
    reason = unavailable_reason(kind, backend)
    if reason:
        return {"status": "unavailable", "reason": reason}
    if workload == "w5" and backend != "sqlite":
        return {"status": "n/a", "reason": "W5 is SQLite only"}
    target = make_target(kind, backend, urls)
    target.check_workload(workload)
    started = time.perf_counter()
    if workload == "w7":
        out = await w7_transfer(target, p, urls)
    else:
        async with fresh_store(backend, urls, f"{kind}_{workload}") as location:
            await target.open(location)
            if workload == "w5":
                out = await w5_concurrent(target, p, location)
            else:
                try:
                    out = await WORKLOADS[workload](target, p)
                finally:
                    await target.close()
    return out | {
        "status": "ok",
        "load_average": os.getloadavg(),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "worker_s": round(time.perf_counter() - started, 2),
    }


def worker_main(raw_job: str) -> None:
    try:
        result = asyncio.run(run_job(json.loads(raw_job)))
    except Skip as skip:
        result = {"status": "skipped", "reason": str(skip)}
    except Exception as exc:  # reported in the table, never a hang
        traceback.print_exc()
        result = {"status": "error", "reason": f"{type(exc).__name__}: {str(exc)[:400]}"}
    print(RESULT_TAG + json.dumps(result, default=str), flush=True)


def child_main(raw_spec: str) -> None:
    from benchkit.processes import child_main as run

    result = asyncio.run(run(json.loads(raw_spec)))
    print(RESULT_TAG + json.dumps(result, default=str), flush=True)


# ----------------------------------------------------------------------------- orchestrator


def spawn_worker(job: dict[str, Any]) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    timeout = job["p"]["worker_timeout"]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)  # the worker and any children it started
        process.communicate()
        return {"status": "timeout", "reason": f"worker exceeded {timeout:.0f} s"}
    lines = [line for line in out.splitlines() if line.startswith(RESULT_TAG)]
    if not lines:
        tail = " | ".join((err or out).strip().splitlines()[-3:])
        return {"status": "error", "reason": tail[-600:]}
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_TAG) :])
    return result


def plan_jobs(args: argparse.Namespace, p: dict[str, Any], urls: dict[str, str]) -> list[Any]:
    # Workload-major, raw next to persistence: the pair runs close together in time.
    return [
        {"kind": kind, "backend": backend, "workload": workload, "p": p, "urls": urls}
        for workload in p["workloads"]
        for backend in args.backends
        for kind in args.targets
    ]


def run_all(jobs: list[dict[str, Any]], parallel: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for job in jobs:
        results.setdefault(job["backend"], {}).setdefault(job["kind"], {})

    def one(job: dict[str, Any]) -> None:
        started = time.perf_counter()
        result = spawn_worker(job)
        results[job["backend"]][job["kind"]][job["workload"]] = result
        reason = "" if result["status"] == "ok" else f" - {result.get('reason')}"
        print(
            f"[{job['workload']}] {job['backend']} {job['kind']}: {result['status']}"
            f" in {time.perf_counter() - started:.1f} s{reason}",
            file=sys.stderr,
            flush=True,
        )

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(one, jobs))
    return results


def versions() -> dict[str, str]:
    out = {}
    for name in ("persistence", "sqlalchemy", "aiosqlite", "asyncpg", "pydantic", "pymongo"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit(folder: Path) -> str | None:
    """The commit of the measured `persistence` checkout, if it is one."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=folder,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe_run(args: argparse.Namespace) -> dict[str, Any]:
    import persistence

    return {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{os.cpu_count()} CPUs ({cpu_model()}), Python {platform.python_version()}",
        "platform": platform.platform(),
        "command": " ".join(["python", "scripts/bench.py", *sys.argv[1:]]),
        "git_commit": git_commit(Path(persistence.__file__).parent),
        "persistence_path": str(Path(persistence.__file__).parent),
        "versions": versions(),
        "postgresql": args.pg_url.split("@")[-1],
        # Other work on the machine skews every timing: keep a record of how busy it was.
        "load_average_at_start": os.getloadavg(),
    }


# ----------------------------------------------------------------------------- command line


def comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def comma_ints(text: str) -> list[int]:
    return [int(item.replace("_", "")) for item in comma_list(text)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--json", type=Path, help="also write every number to this file")
    parser.add_argument(
        "--backends",
        type=comma_list,
        default=None,
        help="sqlite,postgresql (mongodb is added by --mongodb-url)",
    )
    parser.add_argument("--targets", type=comma_list, default=["raw", "persistence"])
    parser.add_argument("--workloads", type=comma_list, default=list(ALL_WORKLOADS))
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("BENCH_PG_URL", DEFAULT_PG),
        help="admin URL; each worker creates and drops its own database",
    )
    parser.add_argument("--mongodb-url", default=os.environ.get("BENCH_MONGODB_URL"))
    parser.add_argument(
        "--parallel", type=int, default=None, help="workers at once (default 1; 3 with --quick)"
    )
    parser.add_argument("--msg-bytes", type=int)
    parser.add_argument("--appends", type=int, help="timed appends per N in W1")
    parser.add_argument("--worker-timeout", type=float)
    for name in SIZE_OPTIONS:
        parser.add_argument("--" + name.replace("_", "-"), type=comma_ints, dest=name)
    for name in COUNT_OPTIONS:
        parser.add_argument("--" + name.replace("_", "-"), type=int, dest=name)
    parser.add_argument("--render", type=Path, help="print the table of an earlier --json file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def params_from(args: argparse.Namespace) -> dict[str, Any]:
    p = dict(FULL) | (QUICK if args.quick else {})
    for name in ("msg_bytes", "appends", "worker_timeout", *SIZE_OPTIONS, *COUNT_OPTIONS):
        value = getattr(args, name)
        if value is not None:
            p[name] = value
    unknown = set(args.workloads) - set(ALL_WORKLOADS)
    if unknown:
        raise SystemExit(f"unknown workloads: {', '.join(sorted(unknown))}")
    p["workloads"] = args.workloads
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    if args.child:
        child_main(args.child)
        return 0
    if args.render:
        document = json.loads(args.render.read_text())
        print(markdown(document["results"], document["params"], document["meta"]))
        return 0
    if args.backends is None:
        args.backends = ["sqlite", "postgresql"] + (["mongodb"] if args.mongodb_url else [])
    urls = {"postgresql": args.pg_url, "mongodb": args.mongodb_url or ""}
    p = params_from(args)
    meta = describe_run(args)
    parallel = args.parallel or (3 if args.quick else 1)
    started = time.perf_counter()
    results = run_all(plan_jobs(args, p, urls), parallel)
    meta["total_s"] = round(time.perf_counter() - started, 1)
    meta["load_average_at_end"] = os.getloadavg()
    print(markdown(results, p, meta))
    if args.json:
        document = {"meta": meta, "params": p, "summary": summary(results, p), "results": results}
        args.json.write_text(json.dumps(document, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
