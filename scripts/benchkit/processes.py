"""Workloads that need processes of their own.

W5: two OS processes, four tasks each, appending to SQLite at once.
W7: peak RSS of export, import and migrate, each measured in a fresh process.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchkit.common import RESULT_TAG, Texts, median_ms, peak_rss_mb, timed
from benchkit.stores import fresh_store
from benchkit.target import Target
from benchkit.targets import make_target

BENCH = Path(__file__).resolve().parent.parent / "bench.py"


def start_child(spec: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(BENCH), "--child", json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def child_result(process: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    out, err = process.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith(RESULT_TAG)]
    if not lines:
        raise RuntimeError(f"child failed: {err.strip()[-600:]}")
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_TAG) :])
    return result


def run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    process = start_child(spec)
    try:
        return child_result(process, timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def child_main(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["role"] == "w5":
        return await w5_child(spec)
    return await w7_child(spec)


# ----------------------------------------------------------------------------- W5


async def w5_child(spec: dict[str, Any]) -> dict[str, Any]:
    target = make_target(spec["kind"], "sqlite", {})
    await target.open(spec["location"])
    handles = [await target.create_session() for _ in range(spec["tasks"])]
    print("READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    errors: dict[str, int] = {}
    latencies: list[float] = []

    async def task(handle: Any, seed: int) -> None:
        texts = Texts(spec["msg_bytes"], seed)
        for _ in range(spec["count"]):
            role, content = texts.one()
            try:
                elapsed, _ = await timed(lambda r=role, c=content: target.append(handle, r, c))
                latencies.append(elapsed)
            except Exception as exc:  # counted and reported, never fatal
                kind = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
                errors[kind] = errors.get(kind, 0) + 1

    started = time.time()
    await asyncio.gather(*(task(handle, seed) for seed, handle in enumerate(handles)))
    finished = time.time()
    loaded = sum([await target.load(handle) for handle in handles])
    await target.close()
    return {
        "ok": len(latencies),
        "errors": errors,
        "started": started,
        "finished": finished,
        "median_ms": median_ms(latencies) if latencies else None,
        "loaded": loaded,
        "peak_rss_mb": peak_rss_mb(),
    }


async def w5_concurrent(target: Target, p: dict[str, Any], location: str) -> dict[str, Any]:
    """2 processes x 4 tasks, each task appending `w5_count` messages to its own session."""
    # The parent made the schema: the children measure steady state, not its creation.
    await target.append(await target.create_session(), "user", "setup")
    await target.close()
    spec = {"role": "w5", "kind": target.kind, "location": location, "tasks": p["w5_tasks"]}
    spec |= {"count": p["w5_count"], "msg_bytes": p["msg_bytes"]}
    children = [start_child(spec) for _ in range(p["w5_processes"])]
    try:
        for child in children:
            assert child.stdout is not None and child.stdin is not None
            line = child.stdout.readline()
            if not line.startswith("READY"):
                raise RuntimeError(f"W5 child did not start: {line!r}")
        for child in children:
            assert child.stdin is not None
            child.stdin.write("GO\n")
            child.stdin.flush()
        results = [child_result(child, p["worker_timeout"]) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    return summarise_w5(results, p)


def summarise_w5(results: list[dict[str, Any]], p: dict[str, Any]) -> dict[str, Any]:
    appended = sum(result["ok"] for result in results)
    wall = max(r["finished"] for r in results) - min(r["started"] for r in results)
    errors: dict[str, int] = {}
    for result in results:
        for kind, count in result["errors"].items():
            errors[kind] = errors.get(kind, 0) + count
    expected = p["w5_processes"] * p["w5_tasks"] * p["w5_count"]
    loaded = sum(result["loaded"] for result in results)
    medians = [r["median_ms"] for r in results if r["median_ms"] is not None]
    return {
        "appends_per_s": round(appended / wall, 1) if wall > 0 else None,
        "appended": appended,
        "expected": expected,
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "loaded": loaded,
        "lost": appended - loaded,
        "ok": appended == expected == loaded,
        "median_append_ms": statistics.median(medians) if medians else None,
        "wall_s": round(wall, 3),
        "child_peak_rss_mb": max(r["peak_rss_mb"] for r in results),
    }


# ----------------------------------------------------------------------------- W7


async def w7_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One transfer operation in a fresh process: its peak RSS is the operation's."""
    urls, backend = spec["urls"], spec["backend"]
    source = make_target(spec["kind"], backend, urls)
    await source.open(spec["source"])
    destination = None
    if spec["destination"]:
        destination = make_target(spec["kind"], backend, urls)
        await destination.open(spec["destination"])
    rss_open = peak_rss_mb()
    path = Path(spec["file"])
    if spec["operation"] == "export":
        seconds, report = await timed(lambda: source.export_json(path))
    elif spec["operation"] == "import":
        assert destination is not None
        seconds, report = await timed(lambda: destination.import_json(path))
    else:
        assert destination is not None
        seconds, report = await timed(lambda: source.migrate_to(destination))
    for target in (source, destination):
        if target is not None:
            await target.close()
    return {
        "seconds": round(seconds, 2),
        "rss_after_open_mb": round(rss_open, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "report": {k: v for k, v in report.items() if isinstance(v, int | float | str | bool)},
    }


async def w7_size(
    target: Target, p: dict[str, Any], urls: dict[str, str], sessions: int, folder: Path
) -> dict[str, Any]:
    """Seeds a source store of `sessions` sessions, then runs each operation in a child."""
    out: dict[str, Any] = {}
    async with fresh_store(target.backend, urls, f"w7src{sessions}") as source:
        await target.open(source)
        seed_s, _ = await timed(
            lambda: target.seed_sessions(sessions, p["w7_messages"], Texts(p["msg_bytes"]))
        )
        await target.close()
        out["seed_s"] = round(seed_s, 2)
        path = folder / f"export-{sessions}.json"
        for operation in target.transfer_operations():
            async with fresh_store(target.backend, urls, f"w7{operation}{sessions}") as dest:
                spec = {"role": "w7", "kind": target.kind, "backend": target.backend}
                spec |= {"urls": urls, "source": source, "file": str(path)}
                spec |= {
                    "operation": operation,
                    "destination": "" if operation == "export" else dest,
                }
                out[operation] = await asyncio.to_thread(run_child, spec, p["worker_timeout"])
        out["file_mb"] = round(path.stat().st_size / 2**20, 1) if path.exists() else None
    return out


async def w7_transfer(target: Target, p: dict[str, Any], urls: dict[str, str]) -> dict[str, Any]:
    """Peak RSS of export, import and migrate at 1k and 20k sessions of 50 messages."""
    operations = target.transfer_operations()
    per_size: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-w7-") as folder:
        for sessions in p["w7_sizes"]:
            per_size[str(sessions)] = await w7_size(target, p, urls, sessions, Path(folder))
    spread = {}
    for operation in operations:
        peaks = [per_size[str(s)][operation]["peak_rss_mb"] for s in p["w7_sizes"]]
        spread[operation] = round(max(peaks) - min(peaks), 1)
    return {"per_size": per_size, "rss_spread_mb": spread, "operations": list(operations)}
