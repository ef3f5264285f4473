"""The printed table: medians per backend, ratio to raw, peak RSS per worker."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Getter = Callable[[dict[str, Any]], float | None]

# (workload, label, getter, how to read it): "time" and "rss" are lower-is-better,
# "rate" higher-is-better, "growth" a ratio within one target.
Row = tuple[str, str, Getter, str]

TARGETS = {
    "w1": "<= 1.5x raw; growth t(10k)/t(10) <= 1.2",
    "w2": "on SQLite about 0.75x raw; >= fastest peer",
    "w3": "<= 1.5x raw; t(100k) <= 1.2x t(10k)",
    "w4": ">= fastest peer msgs/s",
    "w5": "0 errors, 0 lost; >= fastest peer",
    "w6": "100k within 1.2x of 10k",
    "w7": "1k and 20k peaks within 50 MB",
    "w8": "rare <= 1.5x raw; common 50 of 50k+ <= 5 ms",
    "w9": "t(newest 20 of 100k) <= 2x t(of 100)",
}


def _dig(*keys: str) -> Getter:
    def get(result: dict[str, Any]) -> float | None:
        value: Any = result
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return value if isinstance(value, int | float) else None

    return get


def rows_for(p: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for n in p["w1_sizes"]:
        rows.append(
            ("w1", f"append at N={n:,} (ms)", _dig("per_size", str(n), "median_ms"), "time")
        )
    rows.append(("w1", "growth t(max N)/t(min N)", _dig("growth"), "growth"))
    for n in p["w2_sizes"]:
        rows.append(
            ("w2", f"load {n:,} messages (ms)", _dig("per_size", str(n), "median_ms"), "time")
        )
    for n in p["w3_sizes"]:
        rows.append(
            ("w3", f"list 100 of {n:,} (ms)", _dig("per_size", str(n), "median_ms"), "time")
        )
    rows.append(("w3", "growth t(max)/t(min)", _dig("growth"), "growth"))
    rows.append(("w4", f"bulk insert {p['w4_total']:,} (msgs/s)", _dig("msgs_per_s"), "rate"))
    rows.append(("w4", "then the first search (ms)", _dig("first_search_ms"), "time"))
    rows.append(
        ("w4", "bulk + first search (msgs/s)", _dig("with_first_search_msgs_per_s"), "rate")
    )
    rows.append(("w5", "2 proc x 4 tasks (appends/s)", _dig("appends_per_s"), "rate"))
    rows.append(("w5", "errors + lost appends", _w5_failures, "growth"))
    for n in p["w6_sizes"]:
        rows.append(
            ("w6", f"startup, {n:,} sessions (ms)", _dig("per_size", str(n), "first_ms"), "time")
        )
    rows.append(("w6", "growth t(max)/t(min)", _dig("growth"), "growth"))
    for operation in ("export", "import", "migrate"):
        for n in p["w7_sizes"]:
            label = f"{operation} {n:,} sessions peak RSS (MB)"
            rows.append(("w7", label, _dig("per_size", str(n), operation, "peak_rss_mb"), "rss"))
    for name in ("rare", "common"):
        rows.append(("w8", f"search, {name} word (ms)", _dig(name, "median_ms"), "time"))
    half = p["w8_messages"] // 2
    rows.append(
        (
            "w8",
            f"search, common word, 50 of {half:,} (ms)",
            _dig("common_half", "median_ms"),
            "time",
        )
    )
    for n in p["w9_sizes"]:
        label = f"newest 20 of {n:,} messages (ms)"
        rows.append(("w9", label, _dig("per_size", str(n), "median_ms"), "time"))
    rows.append(("w9", "growth t(max)/t(min)", _dig("growth"), "growth"))
    return rows


def _w5_failures(result: dict[str, Any]) -> float | None:
    if "errors" not in result:
        return None
    return float(result["errors"] + max(0, result["expected"] - result["loaded"]))


def _ratio(raw: float | None, ours: float | None, how: str) -> float | None:
    if raw is None or ours is None or how == "growth" or not raw or not ours:
        return None
    return raw / ours if how == "rate" else ours / raw


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if value else "0"


def _cell(workload: dict[str, Any] | None, getter: Getter) -> tuple[str, float | None]:
    if workload is None:
        return "-", None
    if workload.get("status") != "ok":
        return str(workload.get("status", "-")), None
    value = getter(workload)
    return _number(value), value


def _rss(workload: dict[str, Any] | None) -> str:
    if not workload or workload.get("status") != "ok":
        return "-"
    return f"{workload.get('peak_rss_mb', 0):.0f}"


def summary(results: dict[str, Any], p: dict[str, Any]) -> list[dict[str, Any]]:
    """Every table row as numbers: backend, workload, measure, raw, persistence, ratio."""
    rows = []
    for backend, by_kind in results.items():
        raw, ours = by_kind.get("raw", {}), by_kind.get("persistence", {})
        for workload_id, label, getter, how in rows_for(p):
            if workload_id not in p["workloads"]:
                continue
            raw_text, raw_value = _cell(raw.get(workload_id), getter)
            our_text, our_value = _cell(ours.get(workload_id), getter)
            rows.append(
                {
                    "backend": backend,
                    "workload": workload_id,
                    "measure": label,
                    "raw": raw_value,
                    "persistence": our_value,
                    "ratio": _ratio(raw_value, our_value, how),
                    "cells": (raw_text, our_text),
                    "rss": (_rss(raw.get(workload_id)), _rss(ours.get(workload_id))),
                }
            )
    return rows


def backend_table(backend: str, rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        f"## {backend}",
        "",
        "| id | measure | raw | persistence | ratio | target | peak RSS MB raw / ours |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for row in rows:
        if row["backend"] != backend:
            continue
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        workload_id = row["workload"]
        lines.append(
            f"| {workload_id.upper()} | {row['measure']} | {row['cells'][0]} | {row['cells'][1]}"
            f" | {ratio} | {TARGETS[workload_id]} | {row['rss'][0]} / {row['rss'][1]} |"
        )
    return [*lines, ""]


def notes(results: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """One line per workload that did not run or did not check out, with its reason."""
    out = []
    for backend, by_kind in results.items():
        for kind, workloads in by_kind.items():
            for workload_id, result in workloads.items():
                where = f"{backend} {kind} {workload_id.upper()}"
                if result.get("status") != "ok":
                    out.append(f"- {where}: {result.get('status')}: {result.get('reason')}")
                elif not all_checks_pass(result):
                    out.append(f"- {where}: a correctness check failed (see JSON 'ok' fields)")
    return out


def all_checks_pass(result: Any) -> bool:
    if isinstance(result, dict):
        return result.get("ok", True) is not False and all(
            all_checks_pass(value) for value in result.values()
        )
    return True


def markdown(results: dict[str, Any], p: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        f"# bench.py - {meta['started']} - {meta['machine']}",
        "",
        "Medians. ratio = persistence / raw for times and raw / persistence for rates:"
        " 1.00x = raw, higher = slower. Growth rows compare sizes within one target.",
        "",
    ]
    rows = summary(results, p)
    for backend in results:
        lines += backend_table(backend, rows)
    extra = notes(results)
    if extra:
        lines += ["Notes:", *extra, ""]
    return "\n".join(lines)
