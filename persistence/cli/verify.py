"""The `verify` command: does one store hold what another holds, field for field?

It runs `verify_migration` on two stores it only reads: after a copy (a `migrate` that
was killed half way, an `import` into a store a service writes to), before moving a
service over, or any time two stores should agree. Its exit status says whether they
do, so a script can act on it.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from persistence.cli.output import (
    ConfigOption,
    JsonOption,
    Target,
    UrlOption,
    VerboseOption,
    echo_json,
    fail,
    opened_store,
    run,
    say,
    warn,
)
from persistence.cli.transfer import FromOption, other_store, progress_bar, source_option
from persistence.config import StorageConfig
from persistence.formats import one_line
from persistence.storage import SessionStorage
from persistence.transfer.unfinished import copy_json, unfinished_copies
from persistence.transfer.verification import verify_migration

# Mismatches listed one by one on the terminal; --json lists up to MISMATCH_LIMIT.
SHOWN_MISMATCHES = 20

# The totals that are mismatches, in the order the summary names them.
_MISMATCH_TOTALS = tuple(
    f"{problem}_{kind}s"
    for problem in ("missing", "extra", "differing", "misordered")
    for kind in ("session", "message", "file")
    if not (problem == "misordered" and kind != "session")
)
_NAMES = {"session": "session", "message": "message", "file": "file record"}


def mismatch_line(entry: dict[str, Any]) -> str:
    """One mismatch of a verification report as a line: what, where, and how."""
    line = f"{_NAMES.get(entry['kind'], entry['kind'])} {entry['id']!r}"
    if "session_id" in entry:
        line += f" of session {entry['session_id']!r}"
    problem = entry["problem"]
    if problem == "missing":
        line += ": missing from the destination"
    elif problem == "extra":
        line += ": only in the destination"
    elif problem == "out_of_order":
        line += ": its messages are in another order in the destination"
    elif "missing_keys" in entry:
        line += f": the destination's metadata lacks the keys {entry['missing_keys']!r}"
    else:
        line += f": {entry.get('field', 'a field')} differs"
        if "source" in entry:
            line += f" (source {entry['source']!r}, destination {entry['destination']!r})"
    return one_line(line)


def mismatch_totals(report: dict[str, Any]) -> str:
    """The report's mismatches counted by kind: `2 missing sessions, 1 differing message`."""
    parts = []
    for name in _MISMATCH_TOTALS:
        if count := report.get(name, 0):
            problem, kind = name.split("_", 1)
            noun = _NAMES[kind.removesuffix("s")]
            parts.append(f"{count:,} {problem} {noun}{'s' if count != 1 else ''}")
    return ", ".join(parts)


def _checked(report: dict[str, Any]) -> str:
    return (
        f"{report['sessions_checked']:,} session(s), {report['messages_checked']:,}"
        f" message(s) and {report['files_checked']:,} file record(s)"
    )


def _extra(report: dict[str, Any]) -> str:
    extra = [
        f"{report[name]:,} {noun}"
        for name, noun in (
            ("extra_sessions", "session(s)"),
            ("extra_messages", "message(s)"),
            ("extra_files", "file record(s)"),
        )
        if report.get(name)
    ]
    return f"; it also holds {' and '.join(extra)} of its own" if extra else ""


def verify(
    ctx: typer.Context,
    destination_url: Annotated[
        str,
        typer.Option("--to", help="The store compared with the source (read, never written)."),
    ],
    source_url: FromOption = None,
    additive: Annotated[
        bool,
        typer.Option(
            "--additive",
            help="The destination may hold more (a copy into a store that held data):"
            " records only it holds, and fields it wrote since, are counted, not failed.",
        ),
    ] = False,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Sessions read per batch from each store.")
    ] = 500,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    url: UrlOption = None,
    verbose: VerboseOption = 0,
) -> None:
    """Compare two stores: every session, message and file record (reads only; exit 1 if
    they differ)."""

    async def work(source: SessionStorage, cfg: StorageConfig, target: Target) -> None:
        destination_config = other_store(destination_url, cfg, source_named)
        async with opened_store(destination_config, "--to", read_only=True) as destination:
            with progress_bar("Verifying", stopped="nothing was written") as update:
                report = await verify_migration(
                    source,
                    destination,
                    additive=additive,
                    batch_size=batch_size,
                    progress_callback=update,
                )
            unfinished = await unfinished_copies(destination)
        if as_json:
            echo_json({**report, "unfinished_copies": [copy_json(c) for c in unfinished]})
        elif report["ok"]:
            say(
                f"Verified: {destination_config.display_url} holds what {cfg.display_url}"
                f" holds, {_checked(report)} compared in {report['duration_seconds']:.1f} s"
                f"{_extra(report)}",
            )
        else:
            for entry in report["mismatches"][:SHOWN_MISMATCHES]:
                say(mismatch_line(entry))
            if report["mismatch_count"] > SHOWN_MISMATCHES:
                listed = len(report["mismatches"])
                say(
                    f"... and {report['mismatch_count'] - SHOWN_MISMATCHES:,} more"
                    f" (--json lists {listed:,})"
                )
        for copy in () if as_json else unfinished:
            warn(f"{destination_config.display_url}: {copy.shown()}")
        if not report["ok"]:
            fail(
                f"{destination_config.display_url} differs from {cfg.display_url}:"
                f" {mismatch_totals(report)}"
            )

    source, source_named = source_option(ctx, source_url, url)
    run(
        ctx,
        (config, source, verbose),
        work,
        must_exist=True,
        read_only=True,
        store_named=source_named,
    )


def register(app: typer.Typer) -> None:
    """Adds the `verify` command to the app."""
    app.command("verify")(verify)
