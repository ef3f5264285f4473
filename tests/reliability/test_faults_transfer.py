"""Faults while moving data: SIGKILL during an import and a migration, disk full
during exports and backups."""

from __future__ import annotations

import asyncio
import json
import random
import signal
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import pytest

from persistence import (
    ChatSession,
    PostgreSQLSessionStorage,
    SQLiteSessionStorage,
    UploadedFileRecord,
)
from persistence.clock import utc_now
from persistence.transfer import export_to_json, import_from_json, migrate_storage, verify_migration
from tests.reliability.conftest import Figures, Scale
from tests.reliability.support import (
    killed_on_exit,
    postgresql_state,
    sqlite_state,
    start_child,
    wait_ready,
)

MakeStorage = Callable[..., Awaitable[PostgreSQLSessionStorage]]


async def _source(path: Path, sessions: int = 150, big_last: bool = False) -> None:
    now = utc_now()
    async with SQLiteSessionStorage(path) as storage:
        for index in range(sessions):
            session = ChatSession.create("transfer", session_id=f"t-{index:04d}")
            for turn in range(6):
                session.add_message("user", f"session {index} turn {turn} " + "m" * 500)
            await storage.save_session(session)
        for index in range(20):
            await storage.save_file_record(
                UploadedFileRecord(
                    file_id=f"f-{index}",
                    gemini_file_name=f"files/{index}",
                    gemini_file_uri=f"https://example.invalid/{index}",
                    display_name=f"file {index}",
                    size=index,
                    mime_type="text/plain",
                    uploaded_at=now,
                    expires_at=now + timedelta(days=1),
                )
            )
        if big_last:
            session = ChatSession.create("transfer", session_id="t-big")
            session.add_message("user", "b" * 200_000)
            await storage.save_session(session)


async def _kill_rounds(
    scale: Scale, start: Callable[[int], object], check: Callable[[int], Awaitable[None]]
) -> int:
    """Starts the child, kills it at a random point, checks the store; returns completions."""
    rng = random.Random(424242)
    finished = 0
    for round_ in range(scale.n(20, 200)):
        with killed_on_exit(start(round_)) as child:  # type: ignore[type-var]
            wait_ready(child)
            await asyncio.sleep(rng.uniform(0.0, 0.5))
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
            finished += child.returncode == 0
        await check(round_)
    return finished


@pytest.mark.sqlite
async def test_sigkill_during_import_leaves_a_sound_store_and_a_rerun_completes_it(
    tmp_path: Path, scale: Scale, figures: Figures
) -> None:
    source_path, export, destination = (
        tmp_path / "src.db",
        tmp_path / "all.json",
        tmp_path / "dst.db",
    )
    await _source(source_path)
    async with SQLiteSessionStorage(source_path) as source:
        await export_to_json(source, export)

    async def check(round_: int) -> None:
        state = sqlite_state(destination)
        assert state.problems == [], f"after kill {round_ + 1}"

    finished = await _kill_rounds(
        scale, lambda _: start_child("import", destination, export, 5), check
    )
    async with (
        SQLiteSessionStorage(source_path) as source,
        SQLiteSessionStorage(destination) as target,
    ):
        await import_from_json(target, export, batch_size=5)
        verified = await verify_migration(source, target)
    assert verified["ok"], verified["mismatches"][:5]
    assert sqlite_state(destination).problems == []
    figures["kills"] = scale.n(20, 200)
    figures["killed_mid_import"] = scale.n(20, 200) - finished
    figures["verified_after_rerun"] = True


@pytest.mark.postgresql
async def test_sigkill_during_migration_leaves_a_sound_store_and_a_rerun_completes_it(
    tmp_path: Path, make_postgresql: MakeStorage, scale: Scale, figures: Figures
) -> None:
    source_path = tmp_path / "src.db"
    await _source(source_path)
    destination = await make_postgresql(min_pool_size=1, max_pool_size=2)
    url = destination.url.render_as_string(hide_password=False)

    async def check(round_: int) -> None:
        state = await postgresql_state(url)
        assert state.problems == [], f"after kill {round_ + 1}"

    finished = await _kill_rounds(
        scale, lambda _: start_child("migrate", source_path, url, 5), check
    )
    async with SQLiteSessionStorage(source_path) as source:
        result = await migrate_storage(source, destination, verify=True, batch_size=5)
        verified = await verify_migration(source, destination)
    assert result["verified"] and verified["ok"], verified["mismatches"][:5]
    assert (await postgresql_state(url)).problems == []
    figures["kills"] = scale.n(20, 200)
    figures["killed_mid_migration"] = scale.n(20, 200) - finished
    figures["verified_after_rerun"] = True


@pytest.mark.sqlite
async def test_disk_full_during_exports_and_backups_leaves_no_partial_file(
    tmp_path: Path, figures: Figures
) -> None:
    db, out = tmp_path / "full.db", tmp_path / "out"
    out.mkdir()
    await _source(db, sessions=60, big_last=True)
    before = sqlite_state(db)
    child = start_child("exportfull", db, out, 96 * 1024)
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 0, stderr
    outcome = json.loads(stdout.strip().splitlines()[-1])
    for name in ("export_to_json", "backup_storage"):
        assert outcome[name] is not None, f"{name} succeeded past the file size limit"
        kind, message, library_error = outcome[name]
        assert library_error, f"{name}: {kind}: {message}"
    # Found by attack: the backup's error ("back up database failed: ...") named no file.
    assert outcome["backup_storage"][1].endswith(f"; no backup was written into {out / 'backups'}")
    # The manager's export_to_file documents OSError for a file it cannot write.
    assert outcome["export_to_file"] is not None
    assert outcome["export_to_file"][0] in ("OSError", "MigrationError"), outcome
    leftovers = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert leftovers in ([], ["backups"]), leftovers
    after = sqlite_state(db)
    assert after.problems == [] and after.messages == before.messages
    figures["errors"] = "; ".join(f"{k}: {v[0]}: {v[1]}" for k, v in outcome.items() if v)
    figures["partial_files"] = 0
