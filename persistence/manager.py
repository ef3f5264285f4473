"""SessionManager: auto-save, a bounded LRU cache, expiry, statistics and exports."""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from persistence import formats
from persistence.clock import utc_now
from persistence.errors import PersistenceError
from persistence.models import ChatSession, Status
from persistence.storage import SessionStorage

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Saved:
    """What the store held of a session when the manager last wrote or read it."""

    message_count: int
    last_message_id: str | None
    updated_at: datetime
    status: Status
    model: str
    metadata: dict[str, Any]


def _snapshot(session: ChatSession) -> _Saved:
    return _Saved(
        message_count=len(session.messages),
        last_message_id=session.messages[-1].message_id if session.messages else None,
        updated_at=session.updated_at,
        status=session.status,
        model=session.model,
        metadata=copy.deepcopy(session.metadata),
    )


@dataclass(slots=True)
class _Entry:
    session: ChatSession
    saved: _Saved | None  # None: never written by this manager nor read from the store

    def dirty(self) -> bool:
        saved, session = self.saved, self.session
        if saved is None:
            return True
        last = session.messages[-1].message_id if session.messages else None
        return (
            len(session.messages) != saved.message_count
            or last != saved.last_message_id
            or session.updated_at != saved.updated_at
            or session.status != saved.status
            or session.model != saved.model
            or session.metadata != saved.metadata
        )


class SessionManager:
    """The everyday front of a store: cached sessions, auto-save, expiry and exports.

    The cache keeps at most `max_cached_sessions` sessions, least recently used
    first out; a session with unsaved changes is saved before it leaves.
    """

    def __init__(
        self,
        storage: SessionStorage,
        auto_save_enabled: bool = True,
        expiry_hours: float = 72,
        max_cached_sessions: int = 1000,
    ) -> None:
        if not expiry_hours > 0:
            raise ValueError(f"expiry_hours: must be > 0, got {expiry_hours}")
        if max_cached_sessions < 1:
            raise ValueError(f"max_cached_sessions: must be >= 1, got {max_cached_sessions}")
        self.storage = storage
        self.auto_save_enabled = auto_save_enabled
        self.expiry_hours = expiry_hours
        self.max_cached_sessions = max_cached_sessions
        self._cache: OrderedDict[str, _Entry] = OrderedDict()

    @property
    def cached_session_ids(self) -> list[str]:
        """The ids in the cache, least recently used first."""
        return list(self._cache)

    def has_unsaved_changes(self, session_id: str) -> bool:
        """Whether the cached copy of the session holds changes the store lacks."""
        entry = self._cache.get(session_id)
        return entry is not None and entry.dirty()

    async def _write(self, entry: _Entry) -> None:
        await self.storage.save_session(entry.session)
        entry.saved = _snapshot(entry.session)

    async def _remember(self, session: ChatSession, saved: _Saved | None) -> _Entry:
        """Caches the session as most recently used, evicting (and saving) beyond the bound."""
        entry = self._cache.get(session.session_id)
        if entry is not None and entry.session is session:
            if saved is not None:
                entry.saved = saved
        else:
            if entry is not None and entry.dirty():
                # Another object of the same session: keep what it holds before replacing it.
                await self._write(entry)
            entry = _Entry(session, saved)
            self._cache[session.session_id] = entry
        self._cache.move_to_end(session.session_id)
        while len(self._cache) > self.max_cached_sessions:
            victim_id, victim = next(iter(self._cache.items()))
            if victim.dirty():
                # Saved before it goes: on failure it stays cached and the error surfaces.
                # Other tasks may use the cache during the save, so look again after it.
                await self._write(victim)
                continue
            del self._cache[victim_id]
        return entry

    async def startup(self) -> dict[str, Any]:
        """Recovers after a restart: expiry sweep, expired file records, cache warm-up.

        The warm-up loads the most recently updated active sessions, at most
        `max_cached_sessions`, so its cost does not grow with the store.

        Raises:
            PersistenceError: if the backend fails.
        """
        expired = await self.cleanup_expired_sessions()
        files_deleted = await self.storage.delete_expired_files()
        room = self.max_cached_sessions - len(self._cache)
        page = await self.storage.list_sessions(status="active", limit=max(room, 0))
        wanted = [s.session_id for s in page if s.session_id not in self._cache]
        loaded = await self.storage.load_sessions(wanted) if wanted else []
        # Each goes to the front, oldest last: the most recently updated is the least
        # likely to be evicted, and sessions already in use stay ahead of them all.
        for session in loaded:
            if session.session_id not in self._cache:
                self._cache[session.session_id] = _Entry(session, _snapshot(session))
                self._cache.move_to_end(session.session_id, last=False)
        # Per status only: counting messages would scan the whole store.
        by_status = await self.storage.count_sessions()
        result = {
            "backend": self.storage.backend_name,
            "active_sessions": by_status.get("active", 0),
            "expired_sessions": expired,
            "expired_files_deleted": files_deleted,
            "total_sessions": sum(by_status.values()),
            "cached_sessions": len(self._cache),
        }
        logger.info("startup: %s", result)
        return result

    async def create_session(
        self, model: str, metadata: dict[str, Any] | None = None
    ) -> ChatSession:
        """Starts a new session, saved at once when auto-save is on.

        Raises:
            pydantic.ValidationError: if a value cannot be stored faithfully.
            PersistenceError: if the backend fails.
        """
        session = ChatSession.create(model, metadata=metadata)
        entry = await self._remember(session, None)
        if self.auto_save_enabled:
            await self._write(entry)
        logger.debug("created session %s (%s)", session.session_id, model)
        return session

    async def get_session(self, session_id: str) -> ChatSession | None:
        """Returns the session (from the cache, else the store), or None.

        Raises:
            PersistenceError: if the backend fails.
        """
        entry = self._cache.get(session_id)
        if entry is None:
            loaded = await self.storage.load_session(session_id)
            if loaded is None:
                return None
            # Another task may have cached it while this one was loading.
            entry = self._cache.get(session_id)
            if entry is None:
                entry = await self._remember(loaded, _snapshot(loaded))
        self._cache.move_to_end(session_id)
        return entry.session

    async def save_session(self, session: ChatSession) -> bool:
        """Saves the session now, whatever the auto-save setting, and caches it.

        Raises:
            InvalidDataError: if a message belongs to another session.
            PersistenceError: if the backend fails.
        """
        entry = await self._remember(session, None)
        await self._write(entry)
        return True

    async def delete_session(self, session_id: str) -> bool:
        """Deletes the session and its messages from the store and drops it from the cache.

        Returns:
            False if the store did not hold it.

        Raises:
            PersistenceError: if the backend fails.
        """
        self._cache.pop(session_id, None)
        return await self.storage.delete_session(session_id)

    async def auto_save(self, session: ChatSession) -> bool:
        """Saves the session if auto-save is on; with auto-save off writes nothing.

        Returns:
            True if the session was written.

        Raises:
            PersistenceError: if the backend fails.
        """
        if not self.auto_save_enabled:
            return False
        entry = self._cache.get(session.session_id)
        if entry is not None and entry.session is session and not entry.dirty():
            self._cache.move_to_end(session.session_id)
            return True
        return await self.save_session(session)

    async def archive_session(self, session_id: str) -> bool:
        """Marks the session archived in the store (and in the cache).

        Returns:
            False if there is no such session.

        Raises:
            PersistenceError: if the backend fails.
        """
        entry = self._cache.get(session_id)
        if entry is not None and entry.dirty():
            entry.session.status = "archived"
            await self._write(entry)
            return True
        changed = await self.storage.set_status([session_id], "archived")
        if entry is not None:
            entry.session.status = "archived"
            if entry.saved is not None:
                entry.saved.status = "archived"
        if changed:
            return True
        return entry is not None or await self.storage.load_session(session_id) is not None

    async def cleanup_expired_sessions(self) -> int:
        """Marks active sessions not updated for `expiry_hours` expired, in the store.

        One statement in the database, whatever the size of the store; cached copies
        follow. With auto-save on, cached changes are saved first so that a session in
        use is judged by its latest activity.

        Returns:
            How many sessions this sweep expired.

        Raises:
            PersistenceError: if the backend fails.
        """
        if self.auto_save_enabled:
            await self._save_dirty()
        cutoff = utc_now() - timedelta(hours=self.expiry_hours)
        expired = await self.storage.expire_sessions(cutoff)
        for entry in self._cache.values():
            session = entry.session
            if session.status == "active" and session.updated_at < cutoff:
                session.status = "expired"
                if entry.saved is not None and entry.saved.status == "active":
                    entry.saved.status = "expired"
        if expired:
            logger.info("expired %d sessions not updated since %s", expired, cutoff.isoformat())
        return expired

    async def export_session(self, session_id: str, format: str = "json") -> str | None:
        """Renders the session as json, text or markdown; None if there is no such session.

        Raises:
            InvalidDataError: for an unknown format.
            PersistenceError: if the backend fails.
        """
        formats.check_format(format)
        session = await self.get_session(session_id)
        return None if session is None else formats.render(session, format)

    async def export_to_file(
        self, session_id: str, output_path: str | Path, format: str = "json"
    ) -> bool:
        """Writes the export atomically (temp file + rename); False if there is no such session.

        Raises:
            InvalidDataError: for an unknown format.
            OSError: if the file cannot be written.
            PersistenceError: if the backend fails.
        """
        rendered = await self.export_session(session_id, format)
        if rendered is None:
            return False
        await asyncio.to_thread(write_atomically, Path(output_path), rendered)
        return True

    async def get_statistics(self) -> dict[str, Any]:
        """Counts the store's sessions, messages and files inside the database.

        Raises:
            PersistenceError: if the backend fails.
        """
        counts = await self.storage.count()
        by_status = counts.sessions_by_status
        return {
            "backend": self.storage.backend_name,
            "total_sessions": counts.total_sessions,
            "active_sessions": by_status.get("active", 0),
            "archived_sessions": by_status.get("archived", 0),
            "expired_sessions": by_status.get("expired", 0),
            "total_messages": counts.messages,
            "total_files": counts.files,
            "expired_files": counts.expired_files,
            "cached_sessions": len(self._cache),
            "unsaved_sessions": sum(1 for entry in self._cache.values() if entry.dirty()),
            "auto_save_enabled": self.auto_save_enabled,
            "expiry_hours": self.expiry_hours,
        }

    async def _save_dirty(self) -> list[tuple[str, PersistenceError]]:
        failures: list[tuple[str, PersistenceError]] = []
        for session_id, entry in list(self._cache.items()):
            if not entry.dirty():
                continue
            try:
                await self._write(entry)
            except PersistenceError as exc:
                logger.error("could not save session %s: %s", session_id, exc)
                failures.append((session_id, exc))
        return failures

    async def shutdown(self) -> None:
        """Saves every cached session with changes, then empties the cache.

        Every save is attempted even when one fails; the sessions that failed stay
        cached, so calling `shutdown()` again retries them.

        Raises:
            PersistenceError: after trying them all, if any session could not be saved.
        """
        failures = await self._save_dirty()
        failed = {session_id for session_id, _ in failures}
        for session_id in [sid for sid in self._cache if sid not in failed]:
            del self._cache[session_id]
        if failures:
            detail = "; ".join(f"{sid}: {exc}" for sid, exc in failures[:5])
            raise PersistenceError(
                f"shutdown: {len(failures)} session(s) could not be saved ({detail})"
            ) from failures[0][1]


def write_atomically(path: Path, text: str) -> None:
    """Writes `text` to `path` through a temp file in the same directory and a rename.

    Raises:
        OSError: if the directory cannot be written.
    """
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
